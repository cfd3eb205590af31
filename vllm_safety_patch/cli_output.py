"""How the ``vsp`` command prints, for a person at a terminal and for a script reading a pipe.

- Help pages: typer (0.29) labels every parameter with its Python type, so a flag reads
  ``--json <bool>``, a list of files ``<list[Path]>`` and a required argument ``{file}`` in
  the usage line. :func:`tidy_help` makes them read as usage: ``FILE...``, ``--json``,
  ``--deltas <str>`` (repeatable options name their element type).
- Width: rich wraps and truncates at 80 columns when the output is not a terminal, so a
  piped table shows ``east-asi…``. :func:`fit_to_output` gives consoles that write to a
  pipe or a file a width no line reaches, unless ``COLUMNS`` says otherwise. Colour is
  already off there (rich detects the pipe).
- Progress: :func:`stage_progress` shows the stages of a long write on stderr, so stdout
  keeps only the result line a script reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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


def stage_progress(console: Console) -> Progress:
    """A spinner per stage with its elapsed time (stages without a known total)."""
    return Progress(
        SpinnerColumn(finished_text="done"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )


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
