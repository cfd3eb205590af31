"""``vsp serve`` (the launcher) and ``vsp deltas list|check|activate|rollout`` (the admin
client of a running server, through :mod:`vllm_safety_patch.cli.client`)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from vllm_safety_patch import settings
from vllm_safety_patch.cli.client import (
    API_KEY_VAR,
    DEFAULT_URL,
    admin_token,
    call,
    server_root,
)
from vllm_safety_patch.cli.common import PLAIN, ModelOption, console, error_console, fail
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.server.rollout import ACTIVATE_TIMEOUT_S, NoAnswerError

if TYPE_CHECKING:
    from vllm_safety_patch.serve import Launch

UrlOption = Annotated[
    str, typer.Option("--url", help="server URL, with or without /v1 (http://HOST:PORT[/v1])")
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help=f"admin token file (else env {settings.ADMIN_TOKEN.name}); for a server started "
        "with --api-key, also set env VLLM_API_KEY",
    ),
]


class ServeCommand(TyperCommand):
    """``vsp serve [OPTIONS] -- VLLM_ARGS``: only what follows ``--`` goes to vLLM.

    Anything else vsp serve does not know is refused here, in a second: handed to vLLM, a typo
    such as ``--delta`` would leave the default deltas in place and fail a minute later in
    vLLM's argument parser, with a page of usage text.
    """

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        cut = args.index("--") if "--" in args else len(args)
        own, vllm_args = args[:cut], args[cut + 1 :]
        unknown = super().parse_args(ctx, own)  # unknown options are kept, not raised
        if unknown and not ctx.resilient_parsing:
            fail(unknown_serve_argument(unknown[0], self.option_names(ctx)))
        ctx.args = vllm_args
        return ctx.args

    def option_names(self, ctx: typer.Context) -> list[str]:
        return [name for param in self.get_params(ctx) for name in param.opts if name[:2] == "--"]


def unknown_serve_argument(argument: str, known: list[str]) -> VSPError:
    """One line for an argument before ``--`` that vsp serve does not take."""
    if not argument.startswith("-"):
        return VSPError(
            f"vsp serve takes no argument '{argument}' (it takes options only)",
            f"vLLM's arguments go after '--': vsp serve [OPTIONS] -- {argument}",
        )
    name = argument.split("=", 1)[0]
    # 0.75, not difflib's 0.6: '--max-model-len' is no typo of '--model'.
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    after = f"vsp serve [OPTIONS] -- {name} ..."
    if close:
        return VSPError(
            f"vsp serve has no option {name}",
            f"did you mean {close[0]}? (a vLLM option goes after '--': {after})",
        )
    return VSPError(f"vsp serve has no option {name}", f"vLLM's own options go after '--': {after}")


# How root.py registers `vsp serve`.
SERVE_COMMAND: dict[str, Any] = {
    "cls": ServeCommand,
    "options_metavar": "[OPTIONS] [-- VLLM_ARGS...]",
    # Kept (not raised) so that ServeCommand refuses them in one line of its own.
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
}


def serve_command(
    ctx: typer.Context,
    model: ModelOption = None,
    deltas: Annotated[
        list[str] | None,
        typer.Option(
            "--deltas",
            help="all (default) | none | NAME[,NAME...] | FILE (repeatable); "
            f"env {settings.DELTAS.name} when not given",
        ),
    ] = None,
    delta_dir: Annotated[
        Path | None,
        typer.Option("--delta-dir", help="folder of named deltas (default: deltas/<model>/)"),
    ] = None,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-token-file",
            help=f"token for the admin routes (else env {settings.ADMIN_TOKEN.name})",
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="NAME[,NAME...] | FILE: also serve these deltas as per-request LoRA "
            "adapters, chosen by model name (vLLM multi-LoRA)",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the command and environment only")
    ] = False,
) -> None:
    """Serve with vLLM (OpenAI API), deltas merged at load; vLLM args go after --."""
    from vllm_safety_patch.models.catalogue import resolve_model
    from vllm_safety_patch.serve import build_launch, exec_launch, redact_argv

    try:
        launch = build_launch(
            # A catalogue name becomes its prepared folder (served under that name).
            model=None if model is None else resolve_model(model),
            deltas=deltas,
            delta_dir=delta_dir,
            admin_token_file=admin_token_file,
            lora=lora,
            host=host,
            port=port,
            extra=list(ctx.args),
        )
    except VSPError as error:
        fail(error)
    for note in launch.notes:
        error_console.print(f"note: {note}", soft_wrap=True, **PLAIN)
    error_console.print(startup_line(launch), soft_wrap=True, **PLAIN)
    for line in effect_lines(launch.deltas):
        error_console.print(line, soft_wrap=True, **PLAIN)
    if dry_run:
        argv = redact_argv(launch.argv, launch.secrets)  # keys, tokens: never printed
        print(json.dumps({"argv": argv, "env": launch_env(launch.env)}, indent=2))
        return
    exec_launch(launch)


deltas_app = typer.Typer(
    help="List or switch the deltas of a running 'vsp serve' server.", no_args_is_help=True
)


@deltas_app.command("list")
def deltas_list(
    url: UrlOption = DEFAULT_URL,
    # Accepted for old scripts and never read: the listing is open, so the admin token
    # is never sent to it.
    token_file: Annotated[Path | None, typer.Option("--token-file", hidden=True)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the server's JSON")] = False,
) -> None:
    """The server's delta folder, which deltas fit its model, and the active set."""
    try:
        status, payload = call("GET", f"{server_root(url)}/v1/safety/deltas", None, None)
    except VSPError as error:
        fail(error)
    if status != 200:
        refused(status, payload)
    if as_json:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    print_listing(payload)


@deltas_app.command("activate")
def deltas_activate(
    names: Annotated[
        list[str], typer.Argument(help="delta names in the server's folder; 'none' = base")
    ],
    url: UrlOption = DEFAULT_URL,
    token_file: TokenFileOption = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="switch, run the canary, restore: preview, never commit"),
    ] = False,
    no_canary: Annotated[
        bool, typer.Option("--no-canary", help="skip the canary (explicitly)")
    ] = False,
) -> None:
    """Switch the served deltas without a restart, once the canary passed (admin token).

    Exit 1 when the canary refused the set (its table says why), 2 on other refusals.
    """
    requested = [] if names == ["none"] else names
    body: dict[str, Any] = {"deltas": requested}
    if dry_run:
        body["dry_run"] = True
    if no_canary:
        body["canary"] = False
    try:
        token = admin_token(token_file)
        status, payload = call(
            "POST",
            f"{server_root(url)}/v1/safety/deltas/activate",
            body,
            token,
            timeout=ACTIVATE_TIMEOUT_S,
        )
        if status == 200 and not isinstance(payload.get("header"), str):
            raise NoAnswerError(
                f"the server answered HTTP 200 without naming what it serves: {payload}"[:300],
                "point --url at the server itself; check what it serves (vsp deltas list)",
            )
    except VSPError as error:
        fail(error)
    if payload.get("canary"):
        print_canary(payload["canary"])
    if status != 200:
        refused(status, payload, code=1 if status == 422 and payload.get("canary") else 2)
    switch = payload.get("switch")
    if dry_run:
        passed = bool(payload.get("canary", {}).get("passed"))
        console.print(
            f"dry run: the canary {'passed' if passed else 'FAILED'}; still serving "
            f"{payload['header']}",
            **PLAIN,
        )
        if not passed:
            raise typer.Exit(code=1)
        return
    console.print(f"active: {payload['header']}", **PLAIN)
    if switch:
        canary = switch.get("canary_seconds")
        console.print(
            f"reloaded {switch['tensors']} tensors: reload {switch['reload_seconds']:.3f} s, "
            + ("canary skipped, " if canary is None else f"canary {canary:.3f} s, ")
            + f"total {switch['total_seconds']:.3f} s",
            **PLAIN,
        )
    else:
        console.print("already active: nothing changed", **PLAIN)


@deltas_app.command("check")
def deltas_check(
    names: Annotated[
        list[str], typer.Argument(help="delta names in the server's folder; 'none' = base")
    ],
    url: UrlOption = DEFAULT_URL,
    token_file: TokenFileOption = None,
) -> None:
    """Read and verify a set on the server and its workers, without switching."""
    requested = [] if names == ["none"] else names
    try:
        token = admin_token(token_file)
        status, payload = call(
            "POST", f"{server_root(url)}/v1/safety/deltas/check", {"deltas": requested}, token
        )
    except VSPError as error:
        fail(error)
    if status != 200:
        refused(status, payload)
    change = "would switch to" if payload["changed"] else "already serves"
    console.print(f"ok: {change} {payload['requested_header']}", **PLAIN)


@deltas_app.command("rollout")
def deltas_rollout(
    names: Annotated[
        list[str], typer.Argument(help="delta names in the replicas' folders; 'none' = base")
    ],
    urls: Annotated[
        list[str],
        typer.Option("--url", help="one replica, http://HOST:PORT (repeat: every replica)"),
    ],
    replica_names: Annotated[
        list[str] | None,
        typer.Option("--name", help="what to call each replica in the log (one per --url)"),
    ] = None,
    token_file: TokenFileOption = None,
    no_canary: Annotated[
        bool, typer.Option("--no-canary", help="switch without the canaries (explicitly)")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the result as JSON at the end")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0.1,
            help="seconds to wait for each replica's switch (its canary included); a "
            "switch still running then is waited for and undone",
        ),
    ] = ACTIVATE_TIMEOUT_S,
) -> None:
    """Switch every replica to the same set, all or nothing (admin token).

    Checks every replica, switches them one at a time, each with its canary, and switches
    back those already switched if any fails. Exit 0: all switched; 1: failed, no
    replica changed; 3: a rollback failed too (the fleet is mixed; the log says where).
    """
    from vllm_safety_patch.server.rollout import replicas_from, rollout, summary

    requested = [] if names == ["none"] else names
    try:
        token = admin_token(token_file)
        replicas = replicas_from(urls, replica_names)
    except VSPError as error:
        fail(error)

    def log(line: str) -> None:
        error_console.print(line, soft_wrap=True, **PLAIN)

    result = rollout(
        replicas, requested, token, call, log, not no_canary, activate_timeout_s=timeout
    )
    if as_json:  # stdout holds the JSON only; the log and the summary go to stderr
        outcome = {**dataclasses.asdict(result), "consistent": result.consistent}
        print(json.dumps(outcome, indent=2))
    line = summary(result)
    if result.ok:
        (error_console if as_json else console).print(line, **PLAIN)
        return
    fail(line, code=1 if result.consistent else 3)


def print_canary(report: dict) -> None:
    """The canary's table: per language, refused/probed against the thresholds."""
    verdict = "passed" if report["passed"] else "FAILED"
    console.print(
        f"canary on {report['delta_set']}: {verdict} in {report['seconds']:.2f} s "
        f"({report['prompts']} prompts per language and kind, {report['max_tokens']} tokens)",
        **PLAIN,
    )
    table = Table("lang", "harmful refused", "fails at", "benign refused", "fails at", "verdict")
    for row in report["languages"]:
        table.add_row(
            *(
                Text(str(cell))
                for cell in (
                    row["language"],
                    f"{row['harmful_refused']}/{row['harmful_n']}" if row["harmful_n"] else "-",
                    _fails_at(row, "harmful", "min", "<="),
                    f"{row['benign_refused']}/{row['benign_n']}" if row["benign_n"] else "-",
                    _fails_at(row, "benign", "max", ">="),
                    row["verdict"] + (f": {row['reason']}" if row.get("reason") else ""),
                )
            )
        )
    console.print(table)


def _fails_at(row: dict, kind: str, bound: str, sign: str) -> str:
    """The count that fails the rule ("never": none of this many probes can), and what
    the rule tests against."""
    if row.get(f"{kind}_{bound}") is None or not row[f"{kind}_n"]:
        return "-"
    from vllm_safety_patch.delta.effect_review import percent

    source, rate = row[f"{kind}_source"], row.get(f"{kind}_reference")
    against = source if rate is None else f"{source} {percent(rate)}"
    if f"{kind}_fails_at" not in row:  # a server from before the field: the share
        return f"{bound} {percent(row[f'{kind}_{bound}'])} ({against})"
    fails = row[f"{kind}_fails_at"]
    return f"{'never' if fails is None else f'{sign} {fails}'} ({against})"


def startup_line(launch: Launch) -> str:
    """What is served, under which model name (what clients send), with which deltas."""
    names = ", ".join(path.name for path in launch.deltas) or "none (base weights)"
    if launch.served_name == str(launch.model):
        return f"serving {launch.model} with deltas: {names}"
    return f"serving {launch.model} as model '{launch.served_name}' with deltas: {names}"


def effect_lines(deltas: list[Path]) -> list[str]:
    """Per served delta: harmful and everyday-benign refusal per language, and its flags."""
    from vllm_safety_patch.delta.effect_review import before_after, review_effect
    from vllm_safety_patch.delta_view import read_delta_header

    lines = []
    for path in deltas:
        try:
            review = review_effect(read_delta_header(path).manifest)
        except VSPError:
            continue  # the launch already read it; the server names any problem
        sides = ", ".join(
            f"{row.lang} {before_after(row.harmful_before, row.harmful_after, '->')} / "
            + (
                before_after(row.benign_before, row.benign_after, "->")
                if row.benign_n
                else "not measured"
            )
            for row in review.languages
        )
        if sides:
            lines.append(f"{path.stem}: refused, harmful / everyday benign: {sides}")
        lines.extend(f"flag: {path.stem}: {flag}" for flag in review.flags)
    return lines


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """The variables that matter to the server, secrets left out."""
    secret = (settings.ADMIN_TOKEN.name, API_KEY_VAR)
    return {
        key: value
        for key, value in sorted(env.items())
        if key.startswith(("VLLM_", settings.PREFIX)) and key not in secret
    }


def refused(status: int, payload: dict, code: int = 2) -> NoReturn:
    error = payload.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    message = message or json.dumps(payload)[:500]
    if status == 401 and not isinstance(error, dict):  # vLLM's --api-key check, not ours
        have = "is not the server's --api-key" if os.environ.get(API_KEY_VAR) else "is not set"
        message = (
            f"{message} (the server was started with --api-key; {API_KEY_VAR} {have}). "
            f"Fix: export {API_KEY_VAR}=<the server's API key>"
        )
    fail(f"HTTP {status}: {message}", code=code)


def print_listing(payload: dict) -> None:
    console.print(f"model: {payload['model']}", **PLAIN)
    console.print(f"active: {payload['header']}", **PLAIN)
    table = Table(
        "name", "group", "languages", "delta base fingerprint", "sha256", "fits model",
        "benign flags", "active",
    )  # fmt: skip
    for item in payload["available"]:
        cells = (
            item["name"],
            item.get("group") or "-",
            ",".join(item.get("languages") or []) or "-",
            item.get("fingerprint") or "-",
            item.get("sha256") or "-",
            "yes" if item["matches_model"] else f"no: {item.get('problem')}",
            len(item.get("flags") or []) if item.get("group") else "-",
            "*" if item.get("active") else "",
        )
        table.add_row(*(Text(str(cell)) for cell in cells))  # data, never markup
    console.print(table)
    for item in payload["available"]:
        for flag in item.get("flags") or []:
            console.print(f"flag: {item['name']}: {flag}", **PLAIN)
    if not payload.get("hot_patch", True):
        console.print(f"hot patch unavailable: {payload.get('hot_patch_problem')}", **PLAIN)
    if payload.get("last_switch"):
        console.print(f"last switch: {payload['last_switch']['total_seconds']:.3f} s", **PLAIN)
