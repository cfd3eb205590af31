"""What every ``vsp`` command shares: one console for results and one for everything else
on stderr, the one error printer, the shared options and wording, and progress.

How ``vsp`` prints, for a person at a terminal and for a script reading a pipe:

- Errors: :func:`fail` prints one line, ``error: PROBLEM. Fix: FIX``, on stderr, no
  traceback, and exits 2 (or the code given).
- Help pages: typer (0.29) labels every parameter with its Python type, so a flag reads
  ``--json <bool>``, a list of files ``<list[Path]>`` and a required argument ``{file}`` in
  the usage line. :func:`tidy_help` makes them read as usage: ``FILE...``, ``--json``,
  ``--deltas <str>`` (repeatable options name their element type).
- Width: rich wraps and truncates at 80 columns when the output is not a terminal, so a
  piped table shows ``east-asi…``. :func:`fit_to_output` gives consoles that write to a
  pipe or a file a width no line reaches, unless ``COLUMNS`` says otherwise. Colour is
  already off there (rich detects the pipe).
- Progress: :class:`Stages` shows the stages of a long write on stderr, so stdout keeps only
  the result line a script reads; :func:`progress_columns` makes the bars of long runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from vllm_safety_patch.errors import VSPError

console = Console()  # results: what a script reads from stdout
error_console = Console(stderr=True)  # errors, notes, logs and progress of long writes
# Data (names, paths, manifest strings) is printed as it is: never markup, never highlighted.
PLAIN: dict[str, Any] = {"markup": False, "highlight": False}


def fail(error: VSPError | str, code: int = 2) -> NoReturn:
    """``error: ...`` in one line on stderr, then exit ``code``.

    One line, no traceback: a :class:`VSPError` already names the problem and the fix.
    """
    error_console.print(Text("error: ", style="bold red") + Text(str(error)), soft_wrap=True)
    raise typer.Exit(code=code)


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="catalogue name ('vsp model list') or HF safetensors checkpoint folder "
        "(default: the default model)",
    ),
]


def model_path(model: str | Path | None) -> Path:
    """A ``--model`` value: a catalogue name (its prepared folder) or a checkpoint folder."""
    from vllm_safety_patch.models.catalogue import resolve_model

    return resolve_model(model)


def row_span(text: str, option: str) -> range:
    """A ``START-STOP`` option's rows."""
    try:
        start, stop = (int(part) for part in text.split("-"))
    except ValueError:
        raise VSPError(f"{option} {text!r} is not START-STOP", "write it like 100-124") from None
    if not 0 <= start < stop:
        raise VSPError(f"{option} {text}: START must be below STOP", "swap or fix them")
    return range(start, stop)


def cells(*values: object) -> list[Text]:
    """Table cells that print their values as they are (data, never markup)."""
    return [Text(str(value)) for value in values]


# Two fingerprints, one function (models/fingerprint.py), over different tensors: the model's
# covers every MLP weight of the checkpoint; a delta records the one of the weights it edits,
# which is what verify, the loader and the server compare. Every printout names which.
MODEL_FINGERPRINT = "model fingerprint"
DELTA_FINGERPRINT = "delta base fingerprint"
FINGERPRINTS_NOTE = (
    f"({MODEL_FINGERPRINT}: config + every MLP weight of this checkpoint; a delta records "
    f"its own {DELTA_FINGERPRINT}, over the base weights it edits, which 'vsp verify' checks)"
)


# --- progress ----------------------------------------------------------------------------


def progress_columns() -> tuple:
    """A bar per task with its share done and elapsed time."""
    return (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )


def stage_progress(console: Console) -> Progress:
    """A spinner per stage with its elapsed time (stages without a known total)."""
    return Progress(
        SpinnerColumn(finished_text="done"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )


class Stages:
    """The stages of a long command on a terminal's stderr, each with its elapsed time (stdout
    keeps the result line). Cleared on failure, so an error stays one line; not shown when
    stderr is no terminal (a script's log gets no spinner frames)."""

    def __init__(self) -> None:
        self.progress = stage_progress(error_console)
        self.task: Any = None
        self.shown = error_console.is_terminal

    def __enter__(self) -> Stages:
        if self.shown:
            self.progress.start()
        return self

    def next(self, description: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, total=1, completed=1)
        self.task = self.progress.add_task(description, total=None)

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        if error_type is None and self.task is not None:
            self.progress.update(self.task, total=1, completed=1)
        else:
            self.progress.live.transient = True
        if self.shown:
            self.progress.stop()


# --- output to a terminal or a pipe, help pages ------------------------------------------

# Wider than any line vsp prints (a manifest's solver settings are about 1 kB).
PIPE_WIDTH = 100_000

_LIST_TYPE = re.compile(r"^<list\[(?P<element>.+)\]>$")


def fit_to_output(consoles: Iterable[Console]) -> None:
    """Consoles writing to a pipe or file: no wrapping, no truncation (unless COLUMNS is set)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return  # the user chose a width
    for console in consoles:
        if not console.is_terminal:
            console.width = PIPE_WIDTH


def tidy_help() -> None:
    """Help pages show what to type, not Python types (see the module docstring).

    typer has no setting for this, so its two display methods are replaced, for every
    command of the process (vsp's sub-apps included). ``tests/test_cli_scripting.py`` walks
    every help page, so a typer release that renames them fails there, not silently.
    """
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption.display_type_rich, "_vsp", False):
        return
    original = TyperOption.display_type_rich

    def option_type(self: TyperOption, ctx) -> str | None:
        if self.metavar is None and (self.is_flag or self.count):
            return None  # a flag takes no value: nothing to show
        shown = original(self, ctx)
        match = _LIST_TYPE.match(shown or "")
        if match:  # a repeatable option: each use takes one value
            return f"<{match.group('element').lower()}>"
        return shown

    def argument_type(self: TyperArgument, ctx) -> str | None:
        return None  # the name column already says FILE or FILE...

    def argument_usage(self: TyperArgument) -> str:
        name = (self.metavar or self.name or "ARG").upper()
        if self.nargs != 1:
            name += "..."
        return name if self.required else f"[{name}]"

    option_type._vsp = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = option_type  # type: ignore[method-assign]
    TyperArgument.display_type_rich = argument_type  # type: ignore[method-assign]
    TyperArgument._usage_display_name = argument_usage  # type: ignore[method-assign]
