"""The shipped deltas verify against the prepared default model; tampered copies do not.

Files solved before manifests recorded a tensor digest fail every test here that reads them
(read_delta refuses them) until ``vsp rehash deltas/<model>/*.safetensors`` records it;
``test_shipped_deltas_record_their_tensor_digest`` names the files and the command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.config import DEFAULT_MODEL_NAME, repo_deltas_dir
from vllm_safety_patch.delta import read_delta, verify_against_checkpoint
from vllm_safety_patch.delta.header import read_header
from vllm_safety_patch.delta.io import write_delta
from vllm_safety_patch.delta.manifest import MANIFEST_KEY
from vllm_safety_patch.errors import DeltaFormatError, DeltaMismatchError
from vllm_safety_patch.languages import MULTIJAIL_TARGETS
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.default_model import prepare_default_model

SHIPPED = sorted((repo_deltas_dir() / DEFAULT_MODEL_NAME).glob("*.safetensors"))


@pytest.fixture(scope="module")
def default_checkpoint() -> Checkpoint:
    return Checkpoint(prepare_default_model().path)  # idempotent: prepared by set-up


def test_shipped_deltas_record_their_tensor_digest() -> None:
    root = repo_deltas_dir().parent
    lacking = [
        str(path.relative_to(root))
        for path in SHIPPED
        if "tensors_sha256" not in json.loads(read_header(path).metadata[MANIFEST_KEY])
    ]
    assert not lacking, (
        "written before manifests recorded a tensor digest: in the repository root run "
        f"'.venv/bin/vsp rehash {' '.join(lacking)}'"
    )


def test_rehash_makes_a_copy_of_each_shipped_delta_verify(
    default_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """What `vsp rehash` does to the shipped files, done to copies: each then reads and
    verifies, and only the digest was added (tensors and manifest otherwise unchanged)."""
    copies = [Path(shutil.copy(path, tmp_path / path.name)) for path in SHIPPED]
    result = CliRunner().invoke(app, ["rehash", *(str(path) for path in copies)])
    assert result.exit_code == 0, result.output
    for original, copy in zip(SHIPPED, copies, strict=True):
        delta = read_delta(copy)
        verify_against_checkpoint([delta], default_checkpoint)
        before, after = load_file(original), load_file(copy)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[key], after[key]) for key in before), original.name
        recorded = json.loads(read_header(original).metadata[MANIFEST_KEY])
        recorded.setdefault("tensors_sha256", delta.manifest.tensors_sha256)
        assert delta.manifest.model_dump(mode="json") == recorded, original.name


def test_all_nine_languages_are_covered() -> None:
    languages = {lang for path in SHIPPED for lang in read_delta(path).manifest.languages}
    assert languages >= set(MULTIJAIL_TARGETS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_shipped_delta_verifies_and_carries_its_effect(
    path: Path, default_checkpoint: Checkpoint
) -> None:
    delta = read_delta(path)
    verify_against_checkpoint([delta], default_checkpoint)
    measured = {(row.metric, row.lang) for row in delta.manifest.measured_effect}
    for lang in ["en", *delta.manifest.languages]:
        assert ("refusal_rate", lang) in measured


def test_tampered_copies_are_refused(default_checkpoint: Checkpoint, tmp_path: Path) -> None:
    source = repo_deltas_dir() / DEFAULT_MODEL_NAME / "all.safetensors"
    delta = read_delta(source)
    header = read_header(source)
    name = next(key for key in sorted(header.tensors) if key.endswith(":B"))
    entry = header.tensors[name]
    middle = header.data_start + (entry.start + entry.end) // 2
    blob = bytearray(source.read_bytes())
    for position in range(middle, middle + 10):
        blob[position] ^= 0x01  # ten factor bytes: still finite, still parses
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(blob))
    with pytest.raises(DeltaFormatError, match="does not match the manifest's digest"):
        read_delta(flipped)
    fingerprint = delta.manifest.base_model.model_copy(update={"fingerprint": "0" * 64})
    forged = tmp_path / "forged.safetensors"
    write_delta(forged, delta.manifest.model_copy(update={"base_model": fingerprint}), delta.edits)
    with pytest.raises(DeltaMismatchError, match="fingerprint mismatch"):
        verify_against_checkpoint([read_delta(forged)], default_checkpoint)


SOLVE_CONFIGS = sorted(repo_deltas_dir().glob("solve*.toml"))


def test_every_shipped_delta_comes_from_one_committed_config() -> None:
    """`make deltas` regenerates each shipped file from the config that names its group:
    exactly one config names it, with the languages and settings its manifest records."""
    from vllm_safety_patch.solver.settings import DataSettings, SolverSettings, load_solve_config

    configs = {path.name: load_solve_config(path) for path in SOLVE_CONFIGS}
    assert "solve.toml" in configs
    for path in SHIPPED:
        manifest = read_delta(path).manifest
        owners = [name for name, config in configs.items() if manifest.group in config.groups]
        assert len(owners) == 1, (path.name, owners)
        config = configs[owners[0]]
        assert manifest.languages == config.groups[manifest.group], path.name
        recorded = {key: value for key, value in manifest.solver.items() if key != "method"}
        # A setting added after a delta was solved reads as its default, which is the
        # behaviour from before the setting existed (settings.py keeps it so).
        recorded = {
            **SolverSettings.model_validate(
                {key: value for key, value in recorded.items() if key != "data"}
            ).model_dump(mode="json"),
            "data": DataSettings.model_validate(recorded["data"]).model_dump(mode="json"),
        }
        expected = {
            **config.solver.model_dump(mode="json"),
            "data": config.data.model_dump(mode="json"),
        }
        assert recorded == expected, (path.name, owners[0])
