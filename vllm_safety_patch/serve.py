"""``vsp serve``: vLLM's OpenAI-compatible server with the safety deltas merged at load.

:func:`build_launch` turns the options into the exact command line and environment (pure,
testable); :func:`exec_launch` replaces this process with it, so signals reach vLLM directly.
The delta choice (``--deltas`` or ``VSP_DELTAS``) is checked here first, in seconds, rather
than by the loader after a minute of engine start-up.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_safety_patch import settings
from vllm_safety_patch.errors import ModelPrepareError, VSPError
from vllm_safety_patch.server.state import DELTA_SUFFIX, check_name
from vllm_safety_patch.settings import (
    CPU_KV_CACHE_GIB,
    default_model_dir,
    delta_dir_for,
    read_admin_token,
)

# `python -m` on the API server module: the `vllm` console script fails on CPU builds.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GENERAL_PLUGIN = "vllm_safety_patch"
ENDPOINT_PLUGIN = "vllm_safety_patch_server"
DELTAS_VAR = settings.DELTAS.name
DEFAULT_DELTAS = "all"
# vLLM's own general plugins, kept in the allow-list only when their settings are present.
VLLM_OPTIONAL_PLUGINS = {
    "lora_filesystem_resolver": "VLLM_LORA_RESOLVER_CACHE_DIR",
    "lora_hf_hub_resolver": "VLLM_LORA_RESOLVER_HF_REPO_LIST",
}
# Flags `vsp serve` owns: given again after `--`, vLLM would see two conflicting values.
OWNED_FLAGS = ("--model", "--load-format", "--model-loader-extra-config", "--host", "--port")
# vLLM flags whose values are secrets: never printed (vLLM's own log redacts them too).
SECRET_FLAGS = ("--api-key", "--hf-token")
# vLLM reads more flags from this YAML file (an API key among them, perhaps).
CONFIG_FLAG = "--config"
REDACTED = "***"
API_KEY_VAR = "VLLM_API_KEY"
# vLLM's Responses API store: background responses run in the engine after their HTTP call
# has returned, outside the switch gate (a canary could meet them, or they it).
RESPONSES_STORE_VAR = "VLLM_ENABLE_RESPONSES_API_STORE"


class ServeError(VSPError):
    """``vsp serve`` cannot build a valid launch."""


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    deltas: list[Path]
    model: Path
    delta_dir: Path
    notes: list[str]
    served_name: str  # the model name clients send (and vLLM's metric label)
    # Values never to print (API keys, HF token, admin token), as vLLM parses the command.
    secrets: tuple[str, ...] = field(default=(), repr=False)


def resolve_deltas(specs: Sequence[str], delta_dir: Path) -> list[Path]:
    """``none`` -> []; a plain name -> DIR/name.safetensors; anything path-like -> that file."""
    items = [item for spec in specs for item in settings.split_list(spec, "," + os.pathsep)]
    if items == ["none"]:
        return []
    if "none" in items:
        raise ServeError(
            "'none' was given together with other deltas", "use --deltas none on its own"
        )
    paths = []
    for item in items:
        looks_like_path = "/" in item or os.sep in item or item.endswith(DELTA_SUFFIX)
        if looks_like_path:
            path = Path(item).expanduser()
            if not path.is_file():
                raise ServeError(f"no delta file {path}", "check the path (vsp inspect FILE)")
            paths.append(path.resolve())
            continue
        try:
            check_name(item)
        except ValueError as error:
            raise ServeError(
                str(error), "pass a delta name, 'all', 'none' or a file path"
            ) from None
        path = delta_dir / f"{item}{DELTA_SUFFIX}"
        if not path.is_file():
            raise _unknown_delta(item, delta_dir)
        paths.append(path.resolve())
    return paths


def _similar_names(name: str, known: Sequence[str]) -> list[str]:
    """Names ``name`` was probably meant to be: same letters (``eastasian``), or close."""

    def letters(text: str) -> str:
        return "".join(char for char in text.casefold() if char.isalnum())

    same = [candidate for candidate in known if letters(candidate) == letters(name)]
    # 0.8, not difflib's 0.6: short names are all alike at 0.6 ('all' vs 'llama').
    return same or difflib.get_close_matches(name, known, n=1, cutoff=0.8)


def _unknown_delta(item: str, delta_dir: Path) -> ServeError:
    known = sorted(p.stem for p in delta_dir.glob(f"*{DELTA_SUFFIX}"))
    there = f" (there: {', '.join(known)})" if known else " (the folder has none)"
    similar = _similar_names(item, known)
    if similar:
        # A typo: point at the existing file, not at a 45-minute solve.
        return ServeError(
            f"no delta '{item}' in {delta_dir}: did you mean {similar[0]}?{there}",
            f"pass --deltas {similar[0]}",
        )
    return ServeError(
        f"no delta '{item}' in {delta_dir}{there}",
        "pick one of those with --deltas, or another folder with --delta-dir "
        f"(--deltas none: base weights); or solve it: vsp solve --out {delta_dir}"
        + ("" if item == DEFAULT_DELTAS else f" --groups {item}"),
    )


def plugin_allow_list(environ: Mapping[str, str]) -> str:
    """``VLLM_PLUGINS``: ours (general + endpoint), the user's, vLLM's own only if in use."""
    names = settings.split_list(environ.get("VLLM_PLUGINS"))
    names += [GENERAL_PLUGIN, ENDPOINT_PLUGIN]
    names += [name for name, var in VLLM_OPTIONAL_PLUGINS.items() if environ.get(var)]
    return ",".join(dict.fromkeys(names))


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in args)


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (``--flag A B``, ``--flag=A``; vLLM's lists take several)."""
    values, taking = [], False
    for arg in args:
        if arg.startswith("-"):
            taking = arg == flag
            if arg.startswith(f"{flag}="):
                values.append(arg.split("=", 1)[1])
        elif taking:
            values.append(arg)
    return values


def _flag_name(arg: str) -> str | None:
    """``--api_key=X`` -> ``--api-key``: a long option's name as vLLM's parser reads it
    (underscores are dashes there); None for anything else."""
    if not arg.startswith("--") or arg == "--":
        return None
    return "--" + arg[2:].split("=", 1)[0].replace("_", "-")


def may_name(arg: str, flag: str) -> bool:
    """Whether ``arg`` could give ``flag`` to vLLM: spelt out, with underscores, or cut short
    (argparse takes any unambiguous prefix: ``--api-k``)."""
    name = _flag_name(arg)
    return name is not None and len(name) > 2 and flag.startswith(name)


def flag_values_any(args: Sequence[str], flag: str) -> list[str]:
    """:func:`flag_values` for every spelling of ``flag`` vLLM takes (a fallback for
    arguments vLLM's parser refuses: the server will not start with them anyway)."""
    values, taking = [], False
    for arg in args:
        if arg.startswith("-"):
            taking = may_name(arg, flag) and "=" not in arg
            if may_name(arg, flag) and "=" in arg:
                values.append(arg.split("=", 1)[1])
        elif taking:
            values.append(arg)
    return values


def redact_argv(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    """``argv`` fit to print or log: every value of :data:`SECRET_FLAGS`, in any spelling
    vLLM takes, and every occurrence of ``secrets`` (the values vLLM parsed) replaced."""
    redacted, taking = [], False
    for arg in argv:
        if arg.startswith("-"):
            secret = any(may_name(arg, flag) for flag in SECRET_FLAGS)
            taking = secret and "=" not in arg
            if secret and "=" in arg:
                arg = f"{arg.split('=', 1)[0]}={REDACTED}"
        elif taking:
            arg = REDACTED
        for value in secrets:
            # Inside a longer argument only when long enough not to be any short word.
            if arg == value or (len(value) >= 8 and value in arg):
                arg = arg.replace(value, REDACTED)
        redacted.append(arg)
    return redacted


def _may_carry_secrets(args: Sequence[str]) -> bool:
    return any(
        _flag_name(arg) == CONFIG_FLAG or any(may_name(arg, flag) for flag in SECRET_FLAGS)
        for arg in args
    )


def vllm_secrets(args: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(API keys, other secret values) exactly as vLLM's own parser reads ``args`` (the
    server's arguments): every spelling, the last of repeats, ``--config FILE``. Parsed only
    when a flag might carry one (importing the parser costs seconds); None when vLLM would
    refuse the arguments itself."""
    if not _may_carry_secrets(args):
        return [], []
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(list(args))
    except (Exception, SystemExit):  # vLLM refuses them too, in its own words
        return None
    keys = [str(key) for key in (getattr(parsed, "api_key", None) or [])]
    token = getattr(parsed, "hf_token", None)
    return keys, [str(token)] if isinstance(token, str) else []


def served_model_name(model_dir: Path, extra: Sequence[str]) -> str:
    """The name clients send: the user's ``--served-model-name``, else the prepared model's
    short id (never a server path, which would also become vLLM's metric label), else the
    checkpoint path (vLLM's own default)."""
    given = flag_values(extra, "--served-model-name")
    if given:
        return given[0]
    from vllm_safety_patch.models.default_model import read_marker

    marker = read_marker(model_dir) or {}
    return str(marker.get("model") or model_dir)


def check_api_keys(keys: Sequence[str], environ: Mapping[str, str], admin: str | None) -> None:
    """Refuse an API key equal to the admin token. ``keys``: what vLLM parsed from its
    arguments (``args.api_key``); without one, vLLM takes VLLM_API_KEY, as here."""
    # vLLM's --api-key guards every /v1 route: a key equal to the admin token would hand the
    # weights to every API user.
    keys = [key for key in keys if key] or [environ.get(API_KEY_VAR, "")]
    if admin and any(key.strip() == admin for key in keys):
        raise ServeError(
            "the API key (--api-key in any spelling, --config, or VLLM_API_KEY) equals the "
            "admin token: every API user could change the served weights",
            "use two different secrets, e.g. a new admin token from 'openssl rand -hex 16'",
        )


def check_responses_store(environ: Mapping[str, str]) -> None:
    """Refuse vLLM's Responses API store: its background responses keep generating after
    their HTTP call returned, where the switch gate cannot hold them."""
    if environ.get(RESPONSES_STORE_VAR, "0").strip() not in ("", "0", "false", "False"):
        raise ServeError(
            f'{RESPONSES_STORE_VAR} is set: background responses ("background": true) '
            "would keep generating after their HTTP call returned, outside the switch gate, "
            "so a canary could probe the unproven set alongside them, or they could make "
            "every activation fail as busy",
            f"unset {RESPONSES_STORE_VAR} (vsp serve answers /v1/responses in the foreground only)",
        )


def _second_separator(extra: Sequence[str]) -> None:
    if "--" in extra:
        raise ServeError(
            "'--' appears twice: vLLM would refuse every argument after the second one",
            "give '--' once: vsp serve [OPTIONS] -- VLLM_ARGS",
        )


def _gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch or a broken driver: serve as on CPU
        return False


def build_launch(
    *,
    model: Path | None = None,
    deltas: Sequence[str] | None = None,
    delta_dir: Path | None = None,
    admin_token_file: Path | None = None,
    lora: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    gpu: bool | None = None,
    check: bool = True,
) -> Launch:
    """The command and environment for the server; raises :class:`VSPError` on any problem."""
    environ = dict(os.environ if environ is None else environ)
    notes: list[str] = []
    model_dir = (model or default_model_dir()).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        if model is None:
            raise ModelPrepareError(
                f"the default model is not prepared (no {model_dir})", "run 'vsp model prepare'"
            )
        raise ServeError(
            f"'{model_dir}' is not a model checkpoint (no config.json)",
            "pass the folder of an HF safetensors checkpoint to --model",
        )
    _second_separator(extra)
    for flag in OWNED_FLAGS:
        if _has_flag(extra, flag):
            raise ServeError(
                f"{flag} was given after '--'", f"use vsp serve's own option instead of {flag}"
            )
    if environ.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0", "false", "False"):
        raise ServeError(
            "VLLM_SERVER_DEV_MODE is set: it adds /collective_rpc, /update_weights and more, "
            "none of them authenticated, which would bypass the admin token",
            "unset VLLM_SERVER_DEV_MODE (vsp serve never serves in dev mode)",
        )
    check_responses_store(environ)
    delta_dir = (delta_dir or delta_dir_for(model_dir)).expanduser().resolve()
    if deltas:
        specs = list(deltas)
    elif settings.DELTAS.text(environ):
        specs = [settings.DELTAS.raw(environ) or ""]
        notes.append(f"deltas from {DELTAS_VAR}={specs[0]}")
    else:
        specs = [DEFAULT_DELTAS]
    paths = resolve_deltas(specs, delta_dir)
    if check and paths:
        _check_deltas(paths, model_dir)
    adapters = []
    if lora:
        from vllm_safety_patch.server.lora import prepare_adapters

        lora_paths = resolve_deltas(list(lora), delta_dir)
        adapters = prepare_adapters(lora_paths, model_dir, paths) if lora_paths else []

    env = dict(environ)
    # The loader reads VSP_DELTAS only without "deltas" in the extra config; we always pass
    # that key, so drop the variable rather than leave a second, ignored source of truth.
    env.pop(DELTAS_VAR, None)
    env["VLLM_PLUGINS"] = plugin_allow_list(environ)
    env[settings.DELTA_DIR.name] = str(delta_dir)
    token_file_var, token_var = settings.ADMIN_TOKEN_FILE.name, settings.ADMIN_TOKEN.name
    if admin_token_file is not None:
        token_file = admin_token_file.expanduser().resolve()
        # Read now so a bad file fails in a second, not after the engine started.
        admin = read_admin_token({}, token_file=token_file)
        env[token_file_var] = str(token_file)  # the path, never the token, in the env
        env.pop(token_var, None)  # the flag wins
    else:
        env.pop(token_file_var, None)
        admin = read_admin_token({k: v for k, v in environ.items() if k == token_var})
        if admin is None:
            notes.append(
                "no admin token: POST /v1/safety/deltas/activate will answer 403 "
                "(pass --admin-token-file FILE)"
            )
    check_server_settings(environ)
    served_name = served_model_name(model_dir, extra)

    argv = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model",
        str(model_dir),
        "--load-format",
        "vsp",
        "--model-loader-extra-config",
        json.dumps({"deltas": [str(path) for path in paths]}),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if served_name != str(model_dir) and not _has_flag(extra, "--served-model-name"):
        argv += ["--served-model-name", served_name]
    if not (_gpu_available() if gpu is None else gpu):
        # Measured on 2 CPU cores: fp32 runs ~4x faster than bf16 (no bf16 units) and eager
        # mode skips minutes of graph capture. The user's own flags after `--` win.
        if not _has_flag(extra, "--enforce-eager"):
            argv.append("--enforce-eager")
        if not _has_flag(extra, "--dtype"):
            argv += ["--dtype", "float32"]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if adapters:
        from vllm_safety_patch.server.lora import labels_env, lora_flags

        argv += lora_flags(adapters, lambda flag: _has_flag(extra, flag))
        env[settings.LORA_LABELS.name] = labels_env(adapters)
        names = ", ".join(a.name for a in adapters)
        notes.append(f"per-request LoRA deltas (ask for them by model name): {names}")
    else:
        env.pop(settings.LORA_LABELS.name, None)
    argv += list(extra)
    # vLLM's own parser says which API keys the server will take (every spelling, repeats,
    # --config); the API-server plugin checks the same again on what vLLM really parsed.
    parsed = vllm_secrets(argv[3:])
    keys, others = parsed or (flag_values_any(extra, "--api-key"), [])
    check_api_keys(keys, environ, admin)
    secrets = [*keys, *others, environ.get(API_KEY_VAR, ""), admin or ""]
    # Longest first, so that no secret is left half-printed by a shorter one inside it.
    secrets = sorted({value.strip() for value in secrets if value.strip()}, key=len, reverse=True)
    return Launch(argv, env, paths, model_dir, delta_dir, notes, served_name, tuple(secrets))


def check_server_settings(environ: Mapping[str, str]) -> None:
    """The API server's own settings (timeouts, canary), checked here in a second rather than
    by the server after a minute of engine start-up; the same parsers as the server's."""
    from vllm_safety_patch.server.canary import settings_from_env

    for variable in (
        settings.SWITCH_DRAIN_TIMEOUT_S,
        settings.SEND_STALL_TIMEOUT_S,
        settings.SHUTDOWN_TIMEOUT_S,
    ):
        variable.number(environ)
    settings_from_env(environ)


def _check_deltas(paths: Sequence[Path], model_dir: Path) -> None:
    from vllm_safety_patch.delta.io import read_delta
    from vllm_safety_patch.delta.merge import check_distinct
    from vllm_safety_patch.delta.verify import verify_against_checkpoint
    from vllm_safety_patch.models.checkpoint import Checkpoint

    deltas = [read_delta(path) for path in paths]
    check_distinct(deltas)
    verify_against_checkpoint(deltas, Checkpoint(model_dir))


def exec_launch(launch: Launch) -> None:  # pragma: no cover - replaces the process
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(launch.argv[0], launch.argv, launch.env)
