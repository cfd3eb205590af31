"""The commands the docs show stay true (issue 15, "docs that are true").

Every command line in a code block of the README and the other docs that a reader would type
is checked against the real CLI: each ``vsp`` line's subcommands and options must exist
(options after ``--`` belong to vLLM), each ``make`` target must be in the Makefile, each
``bench/*.py`` script must exist and take the options shown, and each complete ``vsp serve``
line (no placeholders) must start, as a dry run, in one line of output and exit 0.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from vllm_safety_patch.cli import app

REPO = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "deploy/README.md", "bench/README.md", "deltas/README.md"]
VSP = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.\./)?(?:\.venv/bin/)?vsp\s+(.*)$")
MAKE = re.compile(r"^make\s+([a-z][a-z-]*)")
BENCH = re.compile(r"^(?:\.venv/bin/)?python\s+(bench/[a-z_]+\.py)(.*)$")
PLACEHOLDER = re.compile(r"[\[\]|{}]|\.\.\.|\b[A-Z][A-Z_0-9]{1,}\b")


def code_lines(path: Path) -> list[str]:
    """Lines of fenced (```) and indented (4 spaces) code blocks, continuations joined and
    comments dropped."""
    lines, fenced, pending = [], False, ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = raw.startswith("    ") and not raw.lstrip().startswith(("-", "*", "|"))
        if not (fenced or indented):
            pending = ""
            continue
        text = pending + raw.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = re.sub(r"\s+#\s.*$", "", text).strip()
        if text:
            lines.append(text)
    return lines


def doc_commands(pattern: re.Pattern[str]) -> list[tuple[str, re.Match[str]]]:
    found = []
    for doc in DOCS:
        for line in code_lines(REPO / doc):
            match = pattern.match(line)
            if match:
                found.append((f"{doc}: {line}", match))
    return found


def option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return names


VSP_LINES = doc_commands(VSP)


def test_the_docs_show_vsp_commands() -> None:
    assert len(VSP_LINES) > 20  # the pattern still finds them


@pytest.mark.parametrize("where", [where for where, _ in VSP_LINES])
def test_every_documented_vsp_line_names_real_commands_and_options(where: str) -> None:
    match = dict(VSP_LINES)[where]
    words = match.group(1).replace("[", " ").replace("]", " ").split()
    command = typer.main.get_command(app)  # typer's own click: groups by duck typing
    while hasattr(command, "get_command") and words:
        sub = command.get_command(command.context_class(command), words[0])
        if sub is None:
            break
        command, words = sub, words[1:]
    assert not hasattr(command, "get_command") or not words or words[0].startswith("-"), (
        f"{where}: no command '{words[0] if words else ''}'"
    )
    known = option_names(command)
    for word in words:
        if word == "--":
            break  # the rest goes to vLLM
        if word.startswith("--"):
            option = word.split("=", 1)[0].split("|", 1)[0]
            assert option in known, f"{where}: {command.name} has no option {option}"


def test_every_documented_make_target_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = {
        line.split(":", 1)[0] for line in makefile.splitlines() if re.match(r"^[a-z-]+:", line)
    }
    for where, match in doc_commands(MAKE):
        assert match.group(1) in targets, where


def test_every_documented_bench_script_takes_its_options() -> None:
    helps: dict[str, str] = {}
    for where, match in doc_commands(BENCH):
        script = match.group(1)
        assert (REPO / script).is_file(), where
        if script not in helps:
            done = subprocess.run(
                [sys.executable, script, "--help"],
                cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, (where, done.stderr[-500:])
            helps[script] = done.stdout
        for option in re.findall(r"--[a-z][a-z-]*", match.group(2)):
            assert option in helps[script], f"{where}: {script} has no option {option}"


SERVE_LINES = [
    (where, match.group(1))
    for where, match in VSP_LINES
    if match.group(1).startswith("serve") and not PLACEHOLDER.search(match.group(1))
]


@pytest.mark.parametrize(("where", "args"), SERVE_LINES)
def test_complete_serve_lines_start_as_a_dry_run(where: str, args: str) -> None:
    """As written (with the prepared default model and the shipped deltas), up to the launch."""
    words = shlex.split(args)
    cut = words.index("--") if "--" in words else len(words)
    words = [*words[:cut], "--dry-run", *words[cut:]]
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "vsp"), *words],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"{where}\n{done.stderr[-1000:]}"
    assert '"argv"' in done.stdout, where
