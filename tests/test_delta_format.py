"""The delta file format: round trips, determinism, canonical neuron order, manifest schema."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_delta
from safetensors.torch import load
from test_delta_bad_files import drop_digest, flip_factor_bytes, reference_digest, with_manifest
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.delta import (
    Delta,
    DeltaManifest,
    EffectRow,
    TensorEdit,
    read_delta,
    write_delta,
)
from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.io import encode_delta
from vllm_safety_patch.delta.manifest import FORMAT_VERSION, MANIFEST_KEY
from vllm_safety_patch.errors import DeltaFormatError
from vllm_safety_patch.models.checkpoint import Checkpoint

EFFECT_ROWS = [
    EffectRow(
        metric="refusal_rate",
        suite="multijail",
        lang="th",
        split="multijail ids 160-209",
        n=50,
        before=0.42,
        after=0.96,
    ),
    EffectRow(
        metric="mgsm_accuracy",
        suite="mgsm",
        lang="bn",
        split="dev 0-49",
        n=50,
        before=0.3,
        after=0.3,
    ),
]


def assert_same_delta(left: Delta, right: Delta) -> None:
    """Equal manifests and bit-identical tensors (not merely close)."""
    assert left.manifest == right.manifest
    assert left.edits.keys() == right.edits.keys()
    for name, edit in left.edits.items():
        other = right.edits[name]
        assert edit.spec == other.spec
        for part in ("neurons", "B", "A"):
            mine, theirs = getattr(edit, part), getattr(other, part)
            assert mine.dtype == theirs.dtype, (name, part)
            assert torch.equal(mine, theirs), (name, part)


def raw_manifest(blob: bytes) -> dict:
    """The manifest JSON exactly as stored in the file's safetensors header."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    return json.loads(header["__metadata__"][MANIFEST_KEY])


# --- round trips and determinism -------------------------------------------------------------


def test_write_then_read_gives_equal_manifest_and_identical_tensors(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    delta, _ = make_delta(tiny_qwen2)
    path = write_delta(tmp_path / "d.safetensors", delta.manifest, delta.edits)
    assert_same_delta(read_delta(path), delta)


def test_read_of_make_delta_bytes_equals_the_delta(tiny_qwen2: Path, tmp_path: Path) -> None:
    delta, blob = make_delta(tiny_qwen2)
    path = tmp_path / "d.safetensors"
    path.write_bytes(blob)
    read = read_delta(path)
    assert_same_delta(read, delta)
    # The digest names the exact file bytes, and the source names the file.
    assert read.sha256 == hashlib.sha256(blob).hexdigest() == delta.sha256
    assert read.source == str(path)


def test_encoding_is_deterministic(tiny_qwen2: Path, tmp_path: Path) -> None:
    delta, blob = make_delta(tiny_qwen2)
    assert encode_delta(delta.manifest, delta.edits) == encode_delta(delta.manifest, delta.edits)
    # Rebuilding from the same inputs, and re-encoding what was read back, give the same bytes.
    # (Not via make_delta: its conftest helper draws A from the global RNG.)
    checkpoint = Checkpoint(tiny_qwen2)
    rebuilt = build_delta(
        group=delta.manifest.group,
        languages=delta.manifest.languages,
        model_id=delta.manifest.base_model.id,
        config=checkpoint.config,
        base_tensors=checkpoint.get_many(list(delta.edits)),
        edits=list(reversed(list(delta.edits.values()))),  # edit order does not matter
        solver=delta.manifest.solver,
    )
    assert rebuilt[1] == blob
    path = write_delta(tmp_path / "d.safetensors", delta.manifest, delta.edits)
    assert path.read_bytes() == blob
    again = read_delta(path)
    assert encode_delta(again.manifest, again.edits) == blob


def test_different_inputs_give_different_bytes(tiny_qwen2: Path) -> None:
    # Guards the determinism test against a constant encoder.
    assert make_delta(tiny_qwen2, seed=0)[1] != make_delta(tiny_qwen2, seed=1)[1]


def test_measured_effect_rows_survive_a_round_trip(tiny_qwen2: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint(tiny_qwen2)
    base, _ = make_delta(tiny_qwen2)
    edits = list(base.edits.values())
    delta, blob = build_delta(
        group="effects",
        languages=["th"],
        model_id="tiny",
        config=checkpoint.config,
        base_tensors=checkpoint.get_many([edit.name for edit in edits]),
        edits=edits,
        measured_effect=EFFECT_ROWS,
        description="with measured rows",
    )
    path = write_delta(tmp_path / "e.safetensors", delta.manifest, delta.edits)
    read = read_delta(path)
    assert read.manifest.measured_effect == EFFECT_ROWS
    assert read.manifest.description == "with measured rows"
    assert raw_manifest(blob)["measured_effect"][0]["after"] == 0.96


def test_manifest_json_uses_the_documented_keys(tiny_qwen2: Path) -> None:
    _, blob = make_delta(tiny_qwen2, languages=("th", "bn"))
    manifest = raw_manifest(blob)
    assert manifest["format"] == "vsp-delta"
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["languages"] == ["th", "bn"]
    assert "langs" not in manifest and "language" not in manifest
    assert len(manifest["base_model"]["fingerprint"]) == 64
    assert len(manifest["tensors_sha256"]) == 64


def test_manifest_json_is_canonical(tiny_qwen2: Path) -> None:
    delta, blob = make_delta(tiny_qwen2)
    text = delta.manifest.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert DeltaManifest.from_json(text, "test") == delta.manifest
    assert raw_manifest(blob) == json.loads(text)


def test_stored_tensors_have_the_documented_layout(tiny_qwen2: Path) -> None:
    delta, _ = make_delta(tiny_qwen2, k=8, rank=2)
    for edit in delta.edits.values():
        out_dim, in_dim = edit.spec.shape
        assert edit.neurons.dtype == torch.int64 and edit.neurons.shape == (8,)
        assert edit.B.dtype == edit.A.dtype == torch.float32
        if edit.spec.axis == "columns":
            assert (edit.B.shape, edit.A.shape) == ((out_dim, 2), (2, 8))
        else:
            assert (edit.B.shape, edit.A.shape) == ((8, 2), (2, in_dim))


# --- the tensor digest: recorded by every write ----------------------------------------------


def test_the_tensor_digest_follows_its_definition(tiny_qwen2: Path) -> None:
    delta, blob = make_delta(tiny_qwen2)
    assert delta.manifest.tensors_sha256 == reference_digest(load(blob))
    assert raw_manifest(blob)["tensors_sha256"] == delta.manifest.tensors_sha256
    # Another delta, another digest (guards against a constant).
    assert make_delta(tiny_qwen2, seed=1)[0].manifest.tensors_sha256 != (
        delta.manifest.tensors_sha256
    )


def test_a_rewrite_records_the_digest_of_what_it_writes(tiny_qwen2: Path, tmp_path: Path) -> None:
    delta, _ = make_delta(tiny_qwen2)
    path = tmp_path / "d.safetensors"
    # What 'vsp measure' does: the same edits under a manifest with measured_effect.
    measured = delta.manifest.model_copy(update={"measured_effect": EFFECT_ROWS})
    write_delta(path, measured, delta.edits)
    read = read_delta(path)
    assert read.manifest.measured_effect == EFFECT_ROWS
    assert read.manifest.tensors_sha256 == delta.manifest.tensors_sha256  # same tensors
    # Other edits under a manifest that carries the old digest (or none): the digest
    # written is that of the new tensors, never the stale one.
    other, other_blob = make_delta(tiny_qwen2, seed=1)
    for stale in (delta.manifest.tensors_sha256, None):
        manifest = other.manifest.model_copy(update={"tensors_sha256": stale})
        write_delta(path, manifest, other.edits)
        assert path.read_bytes() == other_blob
        assert read_delta(path).manifest.tensors_sha256 == reference_digest(load(other_blob))


# --- vsp rehash: the digest for files written before it existed ------------------------------


def rehash(*paths: Path):
    return CliRunner().invoke(app, ["rehash", *(str(path) for path in paths)])


@pytest.fixture
def older_file(tiny_qwen2: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """A delta as vsp wrote it before manifests carried a tensor digest, and the bytes the
    same delta has when written today."""
    _, blob = make_delta(tiny_qwen2)
    path = tmp_path / "older.safetensors"
    path.write_bytes(with_manifest(drop_digest)(blob))
    return path, blob


def test_rehash_records_the_digest_and_changes_nothing_else(older_file) -> None:
    path, today = older_file
    with pytest.raises(DeltaFormatError, match=f"'vsp rehash {path}'"):
        read_delta(path)
    result = rehash(path)
    assert result.exit_code == 0, result.output
    assert f"{path}: recorded tensor digest" in " ".join(result.stdout.split())
    # Byte for byte the file vsp writes today: same manifest, same tensors, plus the digest.
    assert path.read_bytes() == today
    assert read_delta(path).manifest.tensors_sha256 == reference_digest(load(today))


def test_rehash_of_a_file_with_its_digest_leaves_it_alone(older_file) -> None:
    path, today = older_file
    path.write_bytes(today)
    before = path.stat().st_mtime_ns
    result = rehash(path)
    assert result.exit_code == 0, result.output
    assert "already records tensor digest" in " ".join(result.stdout.split())
    assert path.read_bytes() == today and path.stat().st_mtime_ns == before


def test_rehash_never_restamps_changed_data_and_checks_every_file_first(
    older_file, tmp_path: Path
) -> None:
    path, today = older_file
    older = path.read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(flip_factor_bytes(today))
    result = rehash(path, flipped)  # the good older file comes first
    assert result.exit_code == 2, result.output
    assert f"{flipped}: the tensor data does not match the manifest's digest" in result.stderr
    assert flipped.read_bytes() == flip_factor_bytes(today)
    assert path.read_bytes() == older  # nothing rewritten: every file is checked first


def test_rehash_through_a_link_updates_the_file_it_names(older_file, tmp_path: Path) -> None:
    path, today = older_file
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert rehash(link).exit_code == 0
    assert link.is_symlink() and path.read_bytes() == today


# --- TensorEdit.build: the canonical (sorted) neuron order -----------------------------------


def dense_update(shape: tuple[int, int], axis: str, neurons, left, right) -> torch.Tensor:
    """The full-size update ``B @ A`` scattered onto ``neurons`` (reference, written out)."""
    dense = torch.zeros(shape)
    block = left @ right
    for position, neuron in enumerate(neurons.tolist()):
        if axis == "columns":
            dense[:, neuron] += block[:, position]
        else:
            dense[neuron, :] += block[position, :]
    return dense


@pytest.mark.parametrize("axis", ["columns", "rows"])
def test_build_sorts_neurons_and_permutes_factors(axis: str) -> None:
    shape = (6, 10) if axis == "columns" else (10, 6)
    neurons = torch.tensor([7, 2, 9, 0], dtype=torch.int32)
    generator = torch.Generator().manual_seed(3)
    # Small integers: every product and sum is exact, so equality is exact whatever the order.
    if axis == "columns":
        left = torch.randint(-4, 5, (6, 2), generator=generator).float()
        right = torch.randint(-4, 5, (2, 4), generator=generator).float()
    else:
        left = torch.randint(-4, 5, (4, 2), generator=generator).float()
        right = torch.randint(-4, 5, (2, 6), generator=generator).float()
    edit = TensorEdit.build("w", shape, axis, neurons, left, right)

    assert edit.neurons.tolist() == [0, 2, 7, 9]
    assert edit.neurons.dtype == torch.int64
    assert edit.spec.neurons == 4 and edit.spec.rank == 2 and edit.spec.axis == axis
    assert torch.equal(
        dense_update(shape, axis, edit.neurons, edit.B, edit.A),
        dense_update(shape, axis, neurons, left, right),
    )
    # The factor not indexed by neurons is left as given.
    if axis == "columns":
        assert torch.equal(edit.B, left)
    else:
        assert torch.equal(edit.A, right)


def test_build_casts_factors_to_float32() -> None:
    edit = TensorEdit.build(
        "w", (4, 8), "columns", torch.tensor([1, 0]), torch.ones(4, 1).double(), torch.ones(1, 2)
    )
    assert edit.B.dtype == edit.A.dtype == torch.float32


# --- write_delta is atomic ---------------------------------------------------------------------


def test_write_leaves_no_temp_file_behind(tiny_qwen2: Path, tmp_path: Path) -> None:
    delta, _ = make_delta(tiny_qwen2)
    folder = tmp_path / "deltas" / "nested"  # created on demand
    write_delta(folder / "d.safetensors", delta.manifest, delta.edits)
    assert sorted(p.name for p in folder.iterdir()) == ["d.safetensors"]


def test_overwrite_replaces_the_whole_file(tiny_qwen2: Path, tmp_path: Path) -> None:
    first, _ = make_delta(tiny_qwen2, seed=0)
    second, second_bytes = make_delta(tiny_qwen2, seed=1, layers=(1,))
    path = tmp_path / "d.safetensors"
    write_delta(path, first.manifest, first.edits)
    write_delta(path, second.manifest, second.edits)
    assert path.read_bytes() == second_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_refused_edits_write_nothing(tiny_qwen2: Path, tmp_path: Path) -> None:
    # encode_delta validates before the file system is touched: a bad edit leaves no file.
    delta, _ = make_delta(tiny_qwen2)
    name = next(iter(delta.edits))
    edit = delta.edits[name]
    poisoned = TensorEdit(spec=edit.spec, neurons=edit.neurons, B=edit.B * float("nan"), A=edit.A)
    path = tmp_path / "out" / "d.safetensors"
    with pytest.raises(DeltaFormatError, match="NaN/Inf"):
        write_delta(path, delta.manifest, {**delta.edits, name: poisoned})
    assert not path.exists()
    assert not path.parent.exists() or list(path.parent.iterdir()) == []


# --- manifest validation ---------------------------------------------------------------------


def _set(path: tuple, value) -> Callable[[dict], None]:
    def mutate(manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _duplicate_tensor(manifest: dict) -> None:
    manifest["tensors"].append(dict(manifest["tensors"][0]))
    manifest["neuron_count"] += manifest["tensors"][0]["neurons"]  # keep the totals consistent


MANIFEST_DEFECTS = [
    pytest.param(
        _set(("languages",), ["th", "xx"]), "unknown language code 'xx'", id="unknown-lang"
    ),
    pytest.param(_set(("languages",), []), "at least one language", id="empty-languages"),
    pytest.param(_set(("languages",), ["th", "th"]), "duplicates", id="duplicate-language"),
    pytest.param(_duplicate_tensor, "listed twice", id="duplicate-tensor"),
    pytest.param(_set(("tensors",), []), "at least one tensor", id="no-tensors"),
    pytest.param(_set(("neuron_count",), 33), "neuron_count is not the sum", id="neuron-count"),
    pytest.param(_set(("rank",), 3), "rank is not the largest", id="rank"),
    pytest.param(_set(("group",), "South East"), "group:", id="group-with-space"),
    pytest.param(_set(("group",), "-leading"), "group:", id="group-leading-dash"),
    pytest.param(_set(("group",), "g" * 65), "group:", id="group-too-long"),
    pytest.param(_set(("base_model", "fingerprint"), "ab" * 31), "64 lowercase hex", id="fp-short"),
    pytest.param(_set(("base_model", "fingerprint"), "AB" * 32), "64 lowercase hex", id="fp-upper"),
    pytest.param(
        _set(("base_model", "fingerprint"), "zz" * 32), "64 lowercase hex", id="fp-nonhex"
    ),
    pytest.param(
        _set(("tensors_sha256",), "zz" * 32), "64 lowercase hex", id="tensor-digest-nonhex"
    ),
    pytest.param(_set(("format_version",), 2), "format_version", id="future-version"),
    pytest.param(_set(("format",), "lora"), "format", id="other-format"),
    pytest.param(_set(("surprise",), 1), "surprise", id="unknown-key"),
    pytest.param(_set(("tensors", 0, "axis"), "diagonal"), "axis", id="bad-axis"),
    pytest.param(_set(("tensors", 0, "neurons"), 0), "neurons", id="zero-neurons"),
    pytest.param(_set(("tensors", 0, "neurons"), 500), "500 neurons but", id="neurons-exceed-dim"),
    pytest.param(_set(("tensors", 0, "shape"), [0, 192]), "non-positive", id="zero-dim-shape"),
]


@pytest.mark.parametrize(("mutate", "message"), MANIFEST_DEFECTS)
def test_manifest_validation_rejects(tiny_qwen2: Path, mutate, message: str) -> None:
    delta, _ = make_delta(tiny_qwen2)
    data = delta.manifest.model_dump(mode="json")
    mutate(data)
    with pytest.raises(DeltaFormatError) as caught:
        DeltaManifest.from_json(json.dumps(data), "edited.safetensors")
    text = str(caught.value)
    assert message in text
    assert text.startswith("edited.safetensors: the manifest is malformed")
    assert "Fix:" in text


def test_manifest_validation_accepts_the_unmutated_manifest(tiny_qwen2: Path) -> None:
    # The control for the table above: the same path with no mutation passes.
    delta, _ = make_delta(tiny_qwen2)
    data = delta.manifest.model_dump(mode="json")
    assert DeltaManifest.from_json(json.dumps(data), "ok") == delta.manifest
