"""The delta commands of the ``vsp`` CLI: inspect, verify, apply."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import make_delta
from safetensors.torch import load, save
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.delta import merge_deltas, read_delta
from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.export import MERGED_MARKER
from vllm_safety_patch.delta.manifest import MANIFEST_KEY
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import checkpoint_fingerprint

VSP = Path(sys.executable).parent / "vsp"  # the console script of this venv


def vsp(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def flat(text: str) -> str:
    """Output with rich's line wrapping undone (it wraps at the terminal width)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def good(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "sea.safetensors"
    path.write_bytes(make_delta(tiny_qwen2, group="south-east-asian", languages=("th", "vi"))[1])
    return path


def tampered(blob: bytes) -> bytes:
    header_len = int.from_bytes(blob[:8], "little")
    manifest = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"][MANIFEST_KEY])
    manifest["base_model"]["fingerprint"] = "0" * 64
    return save(load(blob), metadata={MANIFEST_KEY: json.dumps(manifest)})


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_prints_the_manifest(good: Path) -> None:
    result = vsp("inspect", good)
    assert result.exit_code == 0, result.output
    manifest = read_delta(good).manifest
    text = flat(result.stdout)
    assert "group south-east-asian" in text
    assert "languages: th, vi" in text
    assert manifest.base_model.fingerprint in text
    assert "4 tensors, 32 neurons, rank ≤ 2" in text
    assert all(tensor.name in text for tensor in manifest.tensors)


def test_inspect_json_is_the_manifest(good: Path) -> None:
    result = vsp("inspect", good, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["languages"] == ["th", "vi"]
    assert printed["format_version"] == 1
    assert printed == read_delta(good).manifest.model_dump(mode="json")


def test_inspect_shows_measured_effect(tiny_qwen2: Path, tmp_path: Path) -> None:
    from vllm_safety_patch.delta import EffectRow

    checkpoint = Checkpoint(tiny_qwen2)
    edits = list(make_delta(tiny_qwen2, layers=(1,))[0].edits.values())
    row = EffectRow(
        metric="refusal_rate",
        suite="multijail",
        lang="th",
        split="ids 0-9",
        n=10,
        before=0.1,
        after=0.9,
    )
    _, blob = build_delta(
        group="effects",
        languages=["th"],
        model_id="tiny",
        config=checkpoint.config,
        base_tensors=checkpoint.get_many([edit.name for edit in edits]),
        edits=edits,
        measured_effect=[row],
    )
    path = tmp_path / "effects.safetensors"
    path.write_bytes(blob)
    result = vsp("inspect", path)
    assert result.exit_code == 0, result.output
    assert "measured effect" in result.stdout and "0.900" in flat(result.stdout)


def test_inspect_of_a_corrupt_file_is_a_one_line_error(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:100])
    result = vsp("inspect", path, "--json")
    assert_one_line_error(result, "truncated inside the header")
    assert result.stdout == ""


def test_inspect_prints_manifest_strings_literally(tiny_qwen2: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint(tiny_qwen2)
    edits = list(make_delta(tiny_qwen2, layers=(1,))[0].edits.values())
    _, blob = build_delta(
        group="markup",
        languages=["th"],
        model_id="[/oops]",
        config=checkpoint.config,
        base_tensors=checkpoint.get_many([edit.name for edit in edits]),
        edits=edits,
    )
    path = tmp_path / "markup.safetensors"
    path.write_bytes(blob)
    result = vsp("inspect", path)
    assert result.exit_code == 0, repr(result.exception)
    assert "[/oops]" in result.stdout


# --- verify -----------------------------------------------------------------------------------


def assert_one_line_error(result: Result, phrase: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Fix:" in lines[0]
    assert phrase in lines[0]


def test_verify_accepts_a_delta_for_its_model(good: Path, tiny_qwen2: Path) -> None:
    result = vsp("verify", good, "--model", tiny_qwen2)
    assert result.exit_code == 0, result.output
    assert flat(result.stdout).startswith(f"ok {good}: 'south-east-asian' matches {tiny_qwen2}")
    assert result.stderr == ""


def test_verify_accepts_several_deltas(good: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    other.write_bytes(make_delta(tiny_qwen2, group="other", layers=(1,))[1])
    result = vsp("verify", good, other, "--model", tiny_qwen2)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok ") == 2


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("corrupt", "ends past the end of the file"),
        ("tampered-fingerprint", "fingerprint mismatch"),
        ("other-architecture", "solved for another architecture"),
        ("missing-file", "no such delta file"),
    ],
)
def test_verify_refuses_with_a_one_line_error(
    case: str, phrase: str, good: Path, tiny_qwen2: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    path, model = tmp_path / f"{case}.safetensors", tiny_qwen2
    if case == "corrupt":
        path.write_bytes(good.read_bytes()[:-10])
    elif case == "tampered-fingerprint":
        path.write_bytes(tampered(good.read_bytes()))
    elif case == "other-architecture":
        path, model = good, tiny_llama
    assert_one_line_error(vsp("verify", path, "--model", model), phrase)


def test_verify_stops_at_the_first_bad_delta_of_several(
    good: Path, tiny_qwen2: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\0" * 3)
    assert_one_line_error(vsp("verify", good, bad, "--model", tiny_qwen2), "only 3 bytes")


def test_verify_of_a_folder_without_a_model(good: Path, tmp_path: Path) -> None:
    assert_one_line_error(vsp("verify", good, "--model", tmp_path), "no config.json")


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors"])
def test_verify_against_a_damaged_model_is_a_one_line_error(
    damage: str, good: Path, tiny_qwen2: Path, tmp_path: Path
) -> None:
    model = shutil.copytree(tiny_qwen2, tmp_path / "damaged")
    (model / damage).write_text("{oops")
    result = vsp("verify", good, "--model", model)
    assert result.exit_code == 2, repr(result.exception)


# --- apply -----------------------------------------------------------------------------------


def test_apply_writes_a_merged_checkpoint(good: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = vsp("apply", good, "--out", out, "--model", tiny_qwen2)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in flat(result.stdout)
    assert (out / "config.json").is_file() and (out / MERGED_MARKER).is_file()
    merged, base = Checkpoint(out), Checkpoint(tiny_qwen2)
    assert merged.tensor_names() == base.tensor_names()
    expected = merge_deltas(base.get_many(base.tensor_names()), [read_delta(good)])
    for name in base.tensor_names():
        assert torch.equal(merged.get(name), expected.get(name, base.get(name))), name
    # The same delta now refuses the merged model: its edited tensors are other weights.
    assert_one_line_error(vsp("verify", good, "--model", out), "fingerprint mismatch")


def test_apply_of_a_bad_delta_writes_nothing(good: Path, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert_one_line_error(
        vsp("apply", good, "--out", out, "--model", tiny_llama), "another architecture"
    )
    assert list(tmp_path.iterdir()) == []


def test_apply_to_the_current_folder_is_a_one_line_error(
    good: Path, tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = vsp("apply", good, "--out", ".", "--model", tiny_qwen2)
    assert result.exit_code in (0, 2), repr(result.exception)


def test_apply_never_deletes_files_it_did_not_write(
    good: Path, tiny_qwen2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "precious.txt").write_text("not a checkpoint")
    vsp("apply", good, "--out", out, "--model", tiny_qwen2)
    assert (out / "precious.txt").read_text() == "not a checkpoint"


def test_apply_onto_the_base_model_leaves_the_base_intact(
    good: Path, tiny_qwen2: Path, tmp_path: Path
) -> None:
    model = shutil.copytree(tiny_qwen2, tmp_path / "base")
    before = checkpoint_fingerprint(Checkpoint(model), Checkpoint(model).tensor_names())
    vsp("apply", good, "--out", model, "--model", model)
    after = Checkpoint(model)
    assert checkpoint_fingerprint(after, after.tensor_names()) == before


# --- the installed console script ----------------------------------------------------------------


def test_console_script_runs(good: Path) -> None:
    # One real process: proves the `vsp` entry point is installed and wired to the app.
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [str(VSP), "inspect", str(good), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["languages"] == ["th", "vi"]
