"""The shipped deltas verify against the prepared default model; tampered copies do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vllm_safety_patch.config import DEFAULT_MODEL_NAME, repo_deltas_dir
from vllm_safety_patch.delta import read_delta, verify_against_checkpoint
from vllm_safety_patch.delta.io import write_delta
from vllm_safety_patch.errors import DeltaFormatError, DeltaMismatchError
from vllm_safety_patch.languages import MULTIJAIL_TARGETS
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.default_model import prepare_default_model

SHIPPED = sorted((repo_deltas_dir() / DEFAULT_MODEL_NAME).glob("*.safetensors"))


@pytest.fixture(scope="module")
def default_checkpoint() -> Checkpoint:
    return Checkpoint(prepare_default_model().path)  # idempotent: prepared by set-up


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
    flipped = tmp_path / "flipped.safetensors"
    shutil.copy(source, flipped)
    blob = bytearray(flipped.read_bytes())
    blob[-3] ^= 0xFF  # a factor byte: still parses, but the file is no longer what was solved
    flipped.write_bytes(bytes(blob))
    delta = read_delta(source)
    try:
        changed = read_delta(flipped)
        assert changed.sha256 != delta.sha256
    except DeltaFormatError:
        pass  # the flip produced NaN/Inf: refused as a damaged file, also fine
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
