"""The ``vsp`` command as a tool in scripts (issue 15): help pages, completion, JSON, output
through a pipe, one-line errors for bad paths, the solve guard, header-only commands
without torch, progress, named fingerprints; and ``make test`` setting up what it needs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
import typer
from click.testing import Result
from conftest import make_delta
from rich.console import Console
from safetensors.torch import load, save
from typer.testing import CliRunner

from vllm_safety_patch.cli import app, common
from vllm_safety_patch.cli.common import PIPE_WIDTH, fit_to_output
from vllm_safety_patch.config import repo_deltas_dir
from vllm_safety_patch.delta.manifest import MANIFEST_KEY
from vllm_safety_patch.errors import VSPError

REPO = Path(__file__).resolve().parent.parent
VSP = Path(sys.executable).parent / "vsp"  # the console script of this venv


def vsp(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args], prog_name="vsp")


def without_columns() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "COLUMNS"}


def assert_one_line_error(result: Result, *phrases: str) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Fix:" in lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def good(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scripting") / "south-east-asian.safetensors"
    path.write_bytes(make_delta(tiny_qwen2, group="south-east-asian", languages=("th", "vi"))[1])
    return path


@pytest.fixture()
def no_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)


# --- help pages and completion -----------------------------------------------------------------


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


def test_every_help_page_shows_what_to_type() -> None:
    paths = list(command_paths(typer.main.get_command(app)))
    assert ("verify",) in paths and ("deltas", "list") in paths and ("eval", "compare") in paths
    for path in paths:
        result = vsp(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        page = result.stdout
        assert "<bool>" not in page, (path, page)
        assert not re.search(r"\{\w+\}", page), (path, page)
        assert "list[" not in page, (path, page)
    verify_page = vsp("verify", "--help").stdout
    assert "vsp verify [OPTIONS] FILES..." in verify_page
    assert re.search(r"--json\s+print the result as JSON", verify_page)
    assert re.search(r"--deltas\s+<str>", vsp("serve", "--help").stdout)


def test_eval_help_does_not_require_a_command() -> None:
    page = vsp("eval", "--help").stdout
    usage = next(line for line in page.splitlines() if "Usage:" in line)
    assert "COMMAND" not in usage, usage
    assert "vsp eval [OPTIONS] [compare RUN_A RUN_B]" in usage


def test_shell_completion(tmp_path: Path) -> None:
    # Name the shell instead of letting typer detect it from the parent processes, which
    # fails ("Shell  not supported.") when no known shell is among them (a detached make).
    script = subprocess.run(
        [str(VSP), "--show-completion", "bash"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
    assert script.returncode == 0, script.stderr
    assert "_VSP_COMPLETE=complete_bash" in script.stdout
    env = {**os.environ, "_VSP_COMPLETE": "complete_bash", "COMP_WORDS": "vsp ver"}
    words = subprocess.run(
        [str(VSP)], capture_output=True, text=True, timeout=120, env={**env, "COMP_CWORD": "1"}
    )
    assert words.stdout.split() == ["verify"], (words.stdout, words.stderr)
    env["COMP_WORDS"] = "vsp verify --n"
    options = subprocess.run(
        [str(VSP)], capture_output=True, text=True, timeout=120, env={**env, "COMP_CWORD": "2"}
    )
    assert options.stdout.split() == ["--no-model"], (options.stdout, options.stderr)


# --- verify --json, --no-model and overlaps ------------------------------------------------------


def test_verify_json(good: Path, tiny_qwen2: Path) -> None:
    from vllm_safety_patch.delta import read_delta

    result = vsp("verify", good, "--model", tiny_qwen2, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    manifest = read_delta(good).manifest
    assert report["ok"] is True and report["model"] == str(tiny_qwen2)
    assert report["checked"] == "file and model" and report["overlaps"] == []
    [delta] = report["deltas"]
    assert delta == {
        "file": str(good),
        "group": "south-east-asian",
        "languages": ["th", "vi"],
        "sha256": read_delta(good).sha256,
        "delta_base_fingerprint": manifest.base_model.fingerprint,
    }


def test_verify_json_of_a_failure(good: Path, tiny_llama: Path) -> None:
    result = vsp("verify", good, "--model", tiny_llama, "--json")
    line = assert_one_line_error(result, "another architecture")
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert f"{report['problem']}. Fix: {report['fix']}" == line.removeprefix("error: ")


def test_verify_without_a_model(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSP_HOME", str(tmp_path / "empty-home"))  # no prepared model
    result = vsp("verify", "--no-model", good)
    assert result.exit_code == 0, result.output
    assert " ".join(result.stdout.split()).startswith(
        f"ok {good}: 'south-east-asian' header and manifest are valid (delta base fingerprint"
    )
    report = json.loads(vsp("verify", "--no-model", "--json", good).stdout)
    assert report["model"] is None and report["checked"] == "header"
    assert report["overlaps"] is None  # not checked: a header holds no neuron indices
    assert_one_line_error(vsp("verify", good), "default model is not prepared")
    assert_one_line_error(
        vsp("verify", "--no-model", "--model", tmp_path, good), "exclude each other"
    )


def test_verify_without_a_model_checks_the_tensor_layout(good: Path, tmp_path: Path) -> None:
    blob = good.read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    tensors = load(blob)
    tensors.pop(sorted(tensors)[0])
    short = tmp_path / "short.safetensors"
    short.write_bytes(save(tensors, metadata=metadata))
    assert_one_line_error(vsp("verify", "--no-model", short), "tensors do not match the manifest")


def test_overlaps_are_summarised(good: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    files = []
    for group in ("a", "b", "c", "d", "e"):  # same seed: every pair edits the same neurons
        files.append(tmp_path / f"{group}.safetensors")
        files[-1].write_bytes(make_delta(tiny_qwen2, group=group, seed=0)[1])
    result = vsp("verify", *files, "--model", tiny_qwen2)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 5 and result.stdout.count("ok ") == 5
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2, result.stderr
    assert warnings[0].startswith("overlap: 10 pairs of these 5 deltas edit common neurons")
    assert "(40 tensor overlaps, 320 neurons; --json lists each)" in warnings[0]
    report = json.loads(vsp("verify", *files, "--model", tiny_qwen2, "--json").stdout)
    assert len(report["overlaps"]) == 40
    assert report["overlaps"][0] == {
        "first": "a",
        "second": "b",
        "tensor": "model.layers.0.mlp.down_proj.weight",
        "shared_neurons": 8,
    }
    pair = vsp("verify", *files[:2], "--model", tiny_qwen2).stderr.strip().splitlines()
    assert pair[0] == "overlap: 'a' and 'b' both edit 32 neurons in 4 tensor(s)", pair


# --- output through a pipe -------------------------------------------------------------------


def test_fit_to_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    piped = Console(file=io.StringIO())
    terminal = Console(file=io.StringIO(), force_terminal=True, width=90)
    fit_to_output([piped, terminal])
    assert piped.width == PIPE_WIDTH and terminal.width == 90
    monkeypatch.setenv("COLUMNS", "50")
    chosen = Console(file=io.StringIO())
    fit_to_output([chosen])
    assert chosen.width == 50  # the user's choice stands


def test_piped_output_neither_wraps_nor_truncates(good: Path) -> None:
    from vllm_safety_patch.delta import read_delta

    done = subprocess.run(
        [str(VSP), "inspect", str(good)],
        capture_output=True,
        text=True,
        timeout=120,
        env=without_columns(),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    fingerprint = read_delta(good).manifest.base_model.fingerprint
    assert any(line.startswith(f"delta base fingerprint: {fingerprint} (") for line in lines)
    assert max(len(line) for line in lines) > 80  # nothing folded at 80 columns
    assert "…" not in done.stdout


class Listing(BaseHTTPRequestHandler):
    """A stand-in for a server's GET /v1/safety/deltas with long names and a long problem."""

    payload = {
        "model": "qwen2.5-coder-0.5b-instruct",
        "header": "south-east-asian@0123456789ab",
        "available": [
            {
                "name": name,
                "group": name,
                "languages": ["th", "vi", "jv"],
                "fingerprint": "0123456789ab",
                "sha256": "ba9876543210",
                "matches_model": name != "european",
                "problem": "solved for another architecture (hidden_size 896 vs 1024)",
                "active": name == "south-east-asian",
            }
            for name in ("south-east-asian", "east-asian", "european")
        ],
    }

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        body = json.dumps(self.payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def listing_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Listing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_deltas_list_piped_keeps_whole_names(listing_url: str, no_columns: None) -> None:
    result = vsp("deltas", "list", "--url", listing_url)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and rows[0].startswith("│ south-east-asian │ south-east-asian │")
    problem = "no: solved for another architecture (hidden_size 896 vs 1024)"
    assert any(problem in line for line in result.stdout.splitlines()), result.stdout


# --- files that are no delta, bad --out paths ------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "verify", "apply", "export"])
def test_a_json_file_is_not_called_damaged(command: str, tiny_qwen2: Path, tmp_path: Path) -> None:
    args = [command, tiny_qwen2 / "config.json"]
    if command in ("apply", "export"):
        args += ["--out", tmp_path / "out"]
    if command != "inspect":
        args += ["--model", tiny_qwen2]
    line = assert_one_line_error(vsp(*args), "not a safetensors delta (a JSON file)")
    assert "damaged" not in line


def test_a_text_file_is_not_called_damaged(tmp_path: Path) -> None:
    notes = tmp_path / "solve.toml"
    notes.write_text("[solver]\nlayers = [1, 2]\n")
    line = assert_one_line_error(vsp("inspect", notes), "not a safetensors delta (a text file)")
    assert "damaged" not in line


def test_other_binary_bytes_are_not_declared_a_damaged_delta(tmp_path: Path) -> None:
    """A PNG or random bytes may be any file: the fix says what to pass, then what if it was
    a delta; it does not assert that the file is damaged."""
    other = tmp_path / "picture.png"
    other.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    line = assert_one_line_error(vsp("inspect", other), "not a safetensors file")
    assert "the file is damaged" not in line
    assert "Fix: pass a delta .safetensors file written by 'vsp solve'" in line


def test_a_truncated_delta_is_still_damaged(good: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    assert_one_line_error(vsp("inspect", cut, "--json"), "damaged")


@pytest.mark.parametrize(
    ("command", "target", "phrase"),
    [
        ("export", "file", "is a file, not a folder"),
        ("apply", "file", "is a file, not a folder"),
        ("export", "under-file", "which is a file"),
        ("apply", "under-file", "which is a file"),
        ("export", "proc", "--out /proc/vsp-test"),
        ("apply", "proc", "--out /proc/vsp-test"),
    ],
)
def test_bad_out_paths_are_one_line(
    command: str, target: str, phrase: str, good: Path, tiny_qwen2: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    out = {
        "file": existing,
        "under-file": existing / "sub",
        "proc": Path("/proc/vsp-test"),
    }[target]
    if target == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    assert_one_line_error(vsp(command, good, "--out", out, "--model", tiny_qwen2), phrase)
    assert existing.read_text() == "keep me"
    assert sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.skipif(os.getuid() == 0, reason="root writes anywhere")
def test_an_out_path_in_an_unwritable_folder(good: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        result = vsp("export", good, "--out", locked / "out", "--model", tiny_qwen2)
        assert_one_line_error(result, f"{locked} is not writable")
    finally:
        locked.chmod(0o755)


# --- progress -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["apply", "export"])
def test_apply_and_export_show_their_stages_on_a_terminal(
    command: str, good: Path, tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=300)
    monkeypatch.setattr(common, "error_console", terminal)
    out = tmp_path / "out"
    result = vsp(command, good, "--out", out, "--model", tiny_qwen2)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}"  # stdout: the result line only
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "read and check" in shown
    expected = "merge, write" if command == "apply" else "write the PEFT adapter"
    assert expected in shown and "done" in shown


def test_no_progress_frames_in_a_pipe(good: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    result = vsp("export", good, "--out", tmp_path / "out", "--model", tiny_qwen2)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


# --- vsp solve: the shipped deltas and the default config ----------------------------------


@pytest.fixture()
def solve_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test gets wrong, no solve starts: it stops with a marker error instead."""
    from vllm_safety_patch.solver import pipeline

    def stop(*args: object, **kwargs: object) -> None:
        raise VSPError("stopped by the test before solving", "none needed")

    monkeypatch.setattr(pipeline, "solve", stop)


def test_solve_without_out_does_not_touch_the_shipped_deltas(
    tiny_qwen2: Path, solve_never_runs: None
) -> None:
    target = repo_deltas_dir() / tiny_qwen2.name
    assert not target.exists()
    line = assert_one_line_error(
        vsp("solve", "--model", tiny_qwen2), "without --out", "--overwrite-shipped"
    )
    assert str(target) in line
    inside = repo_deltas_dir() / "elsewhere"
    assert_one_line_error(
        vsp("solve", "--model", tiny_qwen2, "--out", inside),
        "inside the shipped deltas folder",
        "--overwrite-shipped",
    )
    assert not target.exists() and not inside.exists()


def test_solve_with_overwrite_shipped_goes_on(
    tiny_qwen2: Path, tmp_path: Path, solve_never_runs: None
) -> None:
    # A config that does not exist: the command stops at it, past the guard.
    missing = tmp_path / "missing.toml"
    result = vsp("solve", "--model", tiny_qwen2, "--overwrite-shipped", "--config", missing)
    assert_one_line_error(result, f"no solver config at {missing}")
    assert not (repo_deltas_dir() / tiny_qwen2.name).exists()


def test_solve_and_scan_find_the_default_config_from_any_folder(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, solve_never_runs: None
) -> None:
    from vllm_safety_patch.solver import prompts

    monkeypatch.chdir(tmp_path)  # no deltas/solve.toml here
    result = vsp("solve", "--model", tiny_qwen2, "--out", tmp_path / "out")
    assert_one_line_error(result, "stopped by the test before solving")

    def stop(*args: object, **kwargs: object) -> None:
        raise VSPError("scan stopped by the test once its config was read", "none needed")

    monkeypatch.setattr(prompts, "gather_solve_data", stop)
    assert_one_line_error(vsp("scan", "--model", tiny_qwen2), "scan stopped by the test")


def test_solve_help_and_make_deltas_name_the_flag() -> None:
    page = " ".join(vsp("solve", "--help").stdout.split())
    assert "--overwrite-shipped" in page and "replacing the shipped deltas" in page
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO), "deltas"], capture_output=True, text=True, timeout=60
    )
    solves = [line for line in dry.stdout.splitlines() if "vsp solve" in line]
    # one per committed config (deltas/solve*.toml), each told it may replace shipped files
    configs = sorted((REPO / "deltas").glob("solve*.toml"))
    assert len(solves) == len(configs) == 3, dry
    assert all("--overwrite-shipped" in line for line in solves), dry
    assert all(any(f"deltas/{c.name} " in line for line in solves) for c in configs), dry


# --- commands that read only a header: no torch --------------------------------------------

IMPORTS_TORCH = """
import sys
from typer.testing import CliRunner
from vllm_safety_patch.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print("torch" in sys.modules)
"""


def imports_torch(*args: str | Path) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def test_deltas_list_imports_no_torch(listing_url: str) -> None:
    assert not imports_torch("deltas", "list", "--url", listing_url)


@pytest.mark.parametrize("command", [("inspect",), ("inspect", "--json"), ("verify", "--no-model")])
def test_header_only_commands_import_no_torch(command: tuple[str, ...], good: Path) -> None:
    assert not imports_torch(*command, good)


# --- the two fingerprints -----------------------------------------------------------------------


def test_fingerprints_are_named(
    good: Path, tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_safety_patch.config import default_model_dir
    from vllm_safety_patch.models.default_model import MARKER

    monkeypatch.setenv("VSP_HOME", str(tmp_path))
    model = default_model_dir()
    model.mkdir(parents=True)
    (model / MARKER).write_text(json.dumps({"model": "m", "fingerprint": "6b" * 32}))
    info = " ".join(vsp("model", "info").stdout.split())
    assert f"model fingerprint: {'6b' * 32}" in info
    assert "a delta records its own delta base fingerprint" in info
    assert json.loads(vsp("model", "info", "--json").stdout)["fingerprint"] == "6b" * 32

    inspect = " ".join(vsp("inspect", good).stdout.split())
    assert "delta base fingerprint: " in inspect and ", fingerprint" not in inspect
    verify = " ".join(vsp("verify", good, "--model", tiny_qwen2).stdout.split())
    assert "(delta base fingerprint " in verify


# --- malformed manifests ------------------------------------------------------------------------


def test_a_malformed_manifest_error_says_each_thing_once(good: Path, tmp_path: Path) -> None:
    blob = good.read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    manifest = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"][MANIFEST_KEY])
    for tensor in manifest["tensors"]:  # four tensors, one mistake each
        tensor["axis"] = "diagonal"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(load(blob), metadata={MANIFEST_KEY: json.dumps(manifest)}))
    line = assert_one_line_error(vsp("inspect", bad), "the manifest is malformed")
    assert line.count("Input should be 'columns' or 'rows'") == 1, line
    assert all(f"tensors.{i}.axis" in line for i in range(4)), line


# --- make test sets up what the tests need; CI runs exactly it ---------------------------------


def test_make_test_sets_up_first() -> None:
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO), "test"], capture_output=True, text=True, timeout=60
    )
    steps = [line for line in dry.stdout.splitlines() if not line.startswith("make")]
    assert steps.index("bash scripts/setup.sh") == 0
    assert "bash scripts/test-tools.sh" in steps
    assert steps[-1].endswith("-m pytest -q")
    assert steps.index("bash scripts/test-tools.sh") < len(steps) - 1


def test_ci_runs_exactly_make_test() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    commands = [line for line in lines if not line.startswith(("set ", "cd ", "start=", "echo "))]
    assert commands == ["make test"], lines


def fake_bin(folder: Path, tools: dict[str, str]) -> dict[str, str]:
    """PATH of only ``id``, ``env`` and the given scripts (no real prometheus or apt-get)."""
    folder.mkdir()
    for real in ("id", "env"):
        (folder / real).symlink_to(shutil.which(real))
    for name, body in tools.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return {"PATH": str(folder), "HOME": str(folder)}


def test_tools_script_is_a_no_op_when_prometheus_is_there(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    env = fake_bin(
        tmp_path / "bin",
        {
            "prometheus": "exit 0",
            "promtool": "exit 0",
            "apt-get": f'echo "apt-get $*" >> {calls}',
            "sudo": f'echo "sudo $*" >> {calls}',
        },
    )
    done = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "test-tools.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not calls.exists()


def test_tools_script_installs_debians_prometheus(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    env = fake_bin(
        tmp_path / "bin",
        {
            "apt-get": f'echo "apt-get $*" >> {calls}',
            "sudo": f'echo "sudo" >> {calls}; exec "$@"',
        },
    )
    done = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "test-tools.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    recorded = [line for line in calls.read_text().splitlines() if line != "sudo"]
    assert recorded == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends prometheus",
    ]
    assert ("sudo" in calls.read_text().splitlines()) == (os.getuid() != 0)


def test_tools_script_without_apt_get_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "test-tools.sh")],
        capture_output=True,
        text=True,
        env=fake_bin(tmp_path / "bin", {}),
        timeout=60,
    )
    assert done.returncode == 0
    assert "no apt-get here" in done.stderr and "prometheus" in done.stderr


def test_the_delta_package_exports_what_it_names() -> None:
    import vllm_safety_patch.delta as delta

    assert sorted(delta.__all__) == sorted(delta._EXPORTS)
    assert all(getattr(delta, name) is not None for name in delta.__all__)
