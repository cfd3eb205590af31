"""A corpus of bad delta files, each made from a valid one, each refused with its own message."""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_delta
from safetensors.torch import load, load_file, save, save_file
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.delta import read_delta, verify_against_checkpoint
from vllm_safety_patch.delta.manifest import MANIFEST_KEY
from vllm_safety_patch.errors import DeltaFormatError, DeltaMismatchError
from vllm_safety_patch.models.checkpoint import Checkpoint

DOWN0 = "model.layers.0.mlp.down_proj.weight"  # axis "columns": [64, 192], neurons in [0, 192)
UP0 = "model.layers.0.mlp.up_proj.weight"  # axis "rows": [192, 64]
UP2 = "model.layers.2.mlp.up_proj.weight"


# --- building bad files from a valid one ----------------------------------------------------


def split_file(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON object, data section)."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def join_file(header: dict, data: bytes) -> bytes:
    """Write the safetensors bytes by hand: 8-byte LE length + JSON header + raw data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def manifest_of(blob: bytes) -> dict:
    return json.loads(split_file(blob)[0]["__metadata__"][MANIFEST_KEY])


def with_header(mutate: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    """Edit the header JSON by hand, keep the data bytes as they are."""

    def build(blob: bytes) -> bytes:
        header, data = split_file(blob)
        mutate(header)
        return join_file(header, data)

    return build


def with_tensors(mutate: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[bytes], bytes]:
    """Edit the stored tensors, keep the manifest (re-saved by the safetensors library)."""

    def build(blob: bytes) -> bytes:
        tensors = load(blob)
        mutate(tensors)
        return save(tensors, metadata=split_file(blob)[0]["__metadata__"])

    return build


def with_manifest_text(make_text: Callable[[dict], str]) -> Callable[[bytes], bytes]:
    """Replace the manifest string, keep the tensors."""

    def build(blob: bytes) -> bytes:
        return save(load(blob), metadata={MANIFEST_KEY: make_text(manifest_of(blob))})

    return build


def with_manifest(mutate: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def text(manifest: dict) -> str:
        mutate(manifest)
        return json.dumps(manifest, sort_keys=True)

    return with_manifest_text(text)


def _set(key: str, part: str, value: float | int, index: tuple = (0,)):
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{key}:{part}"][index] = value

    return mutate


def _replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]):
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = make(tensors[key]).contiguous()

    return mutate


def _drop(key: str):
    return lambda tensors: tensors.pop(key)


def _add(key: str):
    return lambda tensors: tensors.__setitem__(key, torch.zeros(2, 2))


def _dup_neuron(tensors: dict[str, torch.Tensor]) -> None:
    neurons = tensors[f"{DOWN0}:neurons"]
    neurons[1] = neurons[0]  # still non-decreasing: only the duplicate is wrong


def _overlapping_offsets(header: dict) -> None:
    # Both neuron vectors are 8 x int64: point the second at the first one's bytes.
    header[f"{UP0}:neurons"]["data_offsets"] = header[f"{DOWN0}:neurons"]["data_offsets"]


def _shape_lies(header: dict) -> None:
    header[f"{DOWN0}:A"]["shape"] = [4, 4]  # same byte count as the true [2, 8]


def _manifest_as_object(header: dict) -> None:
    header["__metadata__"][MANIFEST_KEY] = json.loads(header["__metadata__"][MANIFEST_KEY])


def _bad_group(manifest: dict) -> None:
    manifest["group"] = "Not A Group!"


def _future_version(manifest: dict) -> None:
    manifest["format_version"] = 2


def _data_start(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


@dataclass(frozen=True)
class Bad:
    """A defect: how to make it from valid bytes, and the phrase its message must contain."""

    build: Callable[[bytes], bytes]
    phrase: str


FORMAT_DEFECTS: dict[str, Bad] = {
    "empty": Bad(lambda blob: b"", "only 0 bytes"),
    "cut-in-length": Bad(lambda blob: blob[:5], "only 5 bytes"),
    "cut-in-header": Bad(
        lambda blob: blob[: _data_start(blob) // 2], "truncated inside the header"
    ),
    "cut-in-data": Bad(
        lambda blob: blob[: _data_start(blob) + 100], "ends past the end of the file"
    ),
    "cut-last-byte": Bad(lambda blob: blob[:-1], "ends past the end of the file"),
    "padded": Bad(lambda blob: blob + b"\0" * 16, "truncated or padded"),
    "random-bytes": Bad(lambda blob: random.Random(0).randbytes(4096), "is absurd"),
    "header-not-json": Bad(
        lambda blob: struct.pack("<Q", 12) + b"{not json!!}", "header is not UTF-8 JSON"
    ),
    "overlapping-offsets": Bad(with_header(_overlapping_offsets), "overlaps another"),
    "header-shape-lies": Bad(with_header(_shape_lies), "has shape [4, 4], manifest implies [2, 8]"),
    "manifest-not-a-string": Bad(with_header(_manifest_as_object), "map strings to strings"),
    "nan-in-factor": Bad(with_tensors(_set(DOWN0, "B", float("nan"))), "NaN/Inf"),
    "inf-in-factor": Bad(with_tensors(_set(UP0, "A", float("inf"), (1, 3))), "NaN/Inf"),
    "factor-shape": Bad(
        with_tensors(_replace(f"{DOWN0}:A", lambda t: torch.zeros(2, 9))),
        "has shape [2, 9], manifest implies [2, 8]",
    ),
    "float16-factor": Bad(
        with_tensors(_replace(f"{DOWN0}:B", lambda t: t.half())), "has dtype F16, the format"
    ),
    "int32-neurons": Bad(
        with_tensors(_replace(f"{UP0}:neurons", lambda t: t.int())), "has dtype I32, the format"
    ),
    "neuron-out-of-range": Bad(
        with_tensors(_set(DOWN0, "neurons", 192, (-1,))), "outside [0, 192)"
    ),
    "negative-neuron": Bad(with_tensors(_set(UP0, "neurons", -1)), "outside [0, 192)"),
    "duplicate-neuron": Bad(with_tensors(_dup_neuron), "duplicate indices"),
    "unsorted-neurons": Bad(
        with_tensors(_replace(f"{DOWN0}:neurons", lambda t: t.flip(0))), "is not sorted"
    ),
    # The right container without a manifest (what save_file writes; see also the test below).
    "no-manifest": Bad(lambda blob: save(load(blob)), "without a vsp manifest"),
    "manifest-not-json": Bad(with_manifest_text(lambda m: '{"group": "x",'), "not valid JSON"),
    "manifest-bad-group": Bad(with_manifest(_bad_group), "malformed (group:"),
    "manifest-future-version": Bad(with_manifest(_future_version), "malformed (format_version:"),
    "extra-tensor": Bad(with_tensors(_add("extra:B")), "unexpected: ['extra:B']"),
    "missing-tensor": Bad(with_tensors(_drop(f"{UP2}:A")), f"missing: ['{UP2}:A']"),
}


@pytest.fixture(scope="module")
def valid_blob(tiny_qwen2: Path) -> bytes:
    return make_delta(tiny_qwen2)[1]


def write_bad(case: str, blob: bytes, folder: Path) -> Path:
    path = folder / f"{case}.safetensors"
    path.write_bytes(FORMAT_DEFECTS[case].build(blob))
    return path


def problem_of(error: DeltaFormatError | DeltaMismatchError, path: Path) -> str:
    return error.problem.replace(str(path), "<file>")


def test_the_valid_file_is_accepted(valid_blob: bytes, tmp_path: Path) -> None:
    # The control: every bad file below differs from this one by a single defect.
    path = tmp_path / "good.safetensors"
    path.write_bytes(valid_blob)
    assert read_delta(path).manifest.group == "test-group"


@pytest.mark.parametrize("case", sorted(FORMAT_DEFECTS))
def test_bad_file_is_refused_with_a_specific_message(
    case: str, valid_blob: bytes, tmp_path: Path
) -> None:
    path = write_bad(case, valid_blob, tmp_path)
    with pytest.raises(DeltaFormatError) as caught:
        read_delta(path)
    message = str(caught.value)
    assert FORMAT_DEFECTS[case].phrase in message
    assert message.startswith(f"{path}: ")  # says which file
    assert "Fix:" in message
    # Specific: no other kind of defect's phrase fits this message. (Defects of one kind, such
    # as NaN and Inf, share a phrase on purpose; their messages differ by the tensor named.)
    own = FORMAT_DEFECTS[case].phrase
    others = {bad.phrase for bad in FORMAT_DEFECTS.values()} - {own}
    assert not [phrase for phrase in others if phrase in message]


def test_bad_file_messages_all_differ(valid_blob: bytes, tmp_path: Path) -> None:
    problems: dict[str, str] = {}
    for case in FORMAT_DEFECTS:
        path = write_bad(case, valid_blob, tmp_path)
        with pytest.raises(DeltaFormatError) as caught:
            read_delta(path)
        problems[case] = problem_of(caught.value, path)
    # Even defects of one kind differ (they name the tensor or the byte count).
    assert len(set(problems.values())) == len(problems), problems


@pytest.mark.parametrize(
    ("case", "phrase"),
    [("missing-file", "no such delta file"), ("folder", "is a folder")],
)
def test_path_that_is_not_a_file_is_refused(case: str, phrase: str, tmp_path: Path) -> None:
    path = tmp_path / "deltas.safetensors"
    if case == "folder":
        path.mkdir()
    with pytest.raises(DeltaFormatError, match=phrase) as caught:
        read_delta(path)
    assert "Fix:" in str(caught.value)


@pytest.mark.parametrize("source", ["save_file", "model-shard"])
def test_a_plain_safetensors_file_is_not_a_delta(
    source: str, valid_blob: bytes, tiny_qwen2: Path, tmp_path: Path
) -> None:
    if source == "save_file":
        path = tmp_path / "plain.safetensors"
        save_file(load(valid_blob), path)  # the delta's very tensors, no manifest
    else:
        path = tiny_qwen2 / "model.safetensors"  # a checkpoint shard (metadata, no manifest)
    with pytest.raises(DeltaFormatError, match="without a vsp manifest") as caught:
        read_delta(path)
    assert "are not deltas" in str(caught.value)


def _deep_manifest(manifest: dict) -> str:
    return "[" * 100_000 + "]" * 100_000


def _huge_number_manifest(manifest: dict) -> str:
    return json.dumps(manifest)[:-1] + ',"n":' + "9" * 5000 + "}"


@pytest.mark.parametrize("make_text", [_deep_manifest, _huge_number_manifest], ids=["deep", "huge"])
def test_hostile_manifest_json_is_a_format_error(
    make_text, valid_blob: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(with_manifest_text(make_text)(valid_blob))
    with pytest.raises(DeltaFormatError, match="manifest"):
        read_delta(path)


def test_factors_whose_product_overflows_are_refused(valid_blob: bytes, tmp_path: Path) -> None:
    def huge(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{DOWN0}:B"].fill_(1e30)
        tensors[f"{DOWN0}:A"].fill_(1e30)

    path = tmp_path / "overflow.safetensors"
    path.write_bytes(with_tensors(huge)(valid_blob))
    with pytest.raises(DeltaFormatError):
        read_delta(path)


# --- well-formed deltas that do not belong to the model ------------------------------------------


def tampered_fingerprint(blob: bytes) -> bytes:
    def mutate(manifest: dict) -> None:
        fingerprint = manifest["base_model"]["fingerprint"]
        flipped = "0" if fingerprint[0] != "0" else "1"
        manifest["base_model"]["fingerprint"] = flipped + fingerprint[1:]  # still valid hex

    return with_manifest(mutate)(blob)


def model_variant(source: Path, folder: Path, mutate: Callable[[dict], None]) -> Path:
    """A copy of ``source`` with its weights edited (config.json unchanged)."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


MISMATCHES = {
    "tampered-fingerprint": "fingerprint mismatch",
    "other-architecture": "another architecture (architectures:",
    "tensor-missing-from-model": f"the model has no tensor '{UP2}'",
    "tensor-shape-differs": f"'{DOWN0}' is [64, 200] in the model, [64, 192] in the delta",
}


@pytest.fixture(scope="module")
def mismatch_cases(
    tiny_qwen2: Path, tiny_llama: Path, valid_blob: bytes, tmp_path_factory
) -> dict[str, tuple[Path, Path]]:
    """Case -> (delta file, model folder): each a valid file that belongs to another model."""
    folder = tmp_path_factory.mktemp("mismatch")
    good = folder / "good.safetensors"
    good.write_bytes(valid_blob)
    tampered = folder / "tampered.safetensors"
    tampered.write_bytes(tampered_fingerprint(valid_blob))
    lacking = model_variant(tiny_qwen2, folder / "lacking", lambda t: t.pop(UP2))
    wider = model_variant(
        tiny_qwen2, folder / "wider", lambda t: t.__setitem__(DOWN0, torch.zeros(64, 200))
    )
    return {
        "tampered-fingerprint": (tampered, tiny_qwen2),
        "other-architecture": (good, tiny_llama),
        "tensor-missing-from-model": (good, lacking),
        "tensor-shape-differs": (good, wider),
    }


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_delta_for_another_model_is_refused(
    case: str, mismatch_cases: dict[str, tuple[Path, Path]]
) -> None:
    delta_path, model = mismatch_cases[case]
    delta = read_delta(delta_path)  # well-formed: only the model check refuses it
    with pytest.raises(DeltaMismatchError) as caught:
        verify_against_checkpoint([delta], Checkpoint(model))
    message = str(caught.value)
    assert MISMATCHES[case] in message
    assert "Fix:" in message
    assert not [p for name, p in MISMATCHES.items() if name != case and p in message]


def test_a_valid_delta_matches_its_own_model(valid_blob: bytes, tiny_qwen2: Path, tmp_path) -> None:
    # The control for the table above: same checks, the model the delta was made for.
    path = tmp_path / "good.safetensors"
    path.write_bytes(valid_blob)
    verify_against_checkpoint([read_delta(path)], Checkpoint(tiny_qwen2))


def test_tampering_changes_only_the_fingerprint(
    valid_blob: bytes, mismatch_cases: dict[str, tuple[Path, Path]]
) -> None:
    tampered = manifest_of(mismatch_cases["tampered-fingerprint"][0].read_bytes())
    original = manifest_of(valid_blob)
    assert tampered["base_model"].pop("fingerprint") != original["base_model"].pop("fingerprint")
    assert tampered == original


# --- a refused file changes nothing --------------------------------------------------------------


def _apply(delta: Path, model: Path, out: Path):
    return CliRunner().invoke(app, ["apply", str(delta), "--out", str(out), "--model", str(model)])


@pytest.mark.parametrize("case", sorted(FORMAT_DEFECTS))
def test_apply_of_a_bad_file_creates_no_output(
    case: str, valid_blob: bytes, tiny_qwen2: Path, tmp_path: Path
) -> None:
    path = write_bad(case, valid_blob, tmp_path)
    out = tmp_path / "merged"
    result = _apply(path, tiny_qwen2, out)
    assert result.exit_code == 2, result.output
    assert FORMAT_DEFECTS[case].phrase in result.stderr
    assert not out.exists() and not (tmp_path / "merged.staging").exists()


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_apply_of_a_delta_for_another_model_creates_no_output(
    case: str, mismatch_cases: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    delta_path, model = mismatch_cases[case]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir())
    out = tmp_path / "merged"
    result = _apply(delta_path, model, out)
    assert result.exit_code == 2, result.output
    assert MISMATCHES[case] in result.stderr
    assert not out.exists() and not (tmp_path / "merged.staging").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir()) == before
