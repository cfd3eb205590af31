"""A corpus of bad delta files, each made from a valid one, each refused with its own message."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import threading
import time
import tracemalloc
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


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
}


def reference_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The tensor digest as the README defines it, written out independently of the code:
    sha256 over each tensor in name order, a JSON line [name, dtype, shape, bytes] then its
    exact little-endian bytes."""
    hasher = hashlib.sha256(b"vsp-tensors-v1\n")
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        record = [name, SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), len(raw)]
        hasher.update(json.dumps(record).encode() + b"\n" + raw)
    return hasher.hexdigest()


def with_tensors(mutate: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[bytes], bytes]:
    """Edit the stored tensors, keep the manifest (re-saved by the safetensors library).

    The manifest's tensor digest is recomputed for the edited tensors, as a writer that
    produced these values would have recorded it: so each defect is caught by its own check,
    not by the digest (which would catch them all)."""

    def build(blob: bytes) -> bytes:
        tensors = load(blob)
        mutate(tensors)
        manifest = manifest_of(blob)
        manifest["tensors_sha256"] = reference_digest(tensors)
        return save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})

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


def flip_factor_bytes(blob: bytes, key: str = f"{DOWN0}:B", count: int = 10) -> bytes:
    """Flip ``count`` bytes in the middle of one stored tensor; the header stays as it was."""
    header, _ = split_file(blob)
    start, end = (_data_start(blob) + offset for offset in header[key]["data_offsets"])
    middle = (start + end) // 2
    flipped = bytearray(blob)
    for position in range(middle, middle + count):
        flipped[position] ^= 0x01  # low mantissa bits: the values stay finite and plausible
    return bytes(flipped)


def drop_digest(manifest: dict) -> None:
    manifest.pop("tensors_sha256")  # what vsp wrote before manifests carried the digest


def join_text(text: str, data: bytes) -> bytes:
    """A safetensors file from header text as given (to write what ``json.dumps`` cannot)."""
    return struct.pack("<Q", len(text.encode())) + text.encode() + data


def duplicate_header_key(key: str) -> Callable[[bytes], bytes]:
    """Give the tensor ``key`` a second, identical record at the end of the header."""

    def build(blob: bytes) -> bytes:
        header, data = split_file(blob)
        text = json.dumps(header)[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}"
        return join_text(text, data)

    return build


def duplicate_manifest_key(blob: bytes) -> bytes:
    """Two manifests under one metadata key (json.loads would keep the second one)."""
    header, data = split_file(blob)
    header.pop("__metadata__")
    manifest = manifest_of(blob)
    other = {**manifest, "group": "other-group"}  # same digest: the tensors are unchanged
    pairs = [
        f"{json.dumps(MANIFEST_KEY)}: {json.dumps(json.dumps(item, sort_keys=True))}"
        for item in (manifest, other)
    ]
    text = json.dumps(header)[:-1] + f', "__metadata__": {{{", ".join(pairs)}}}}}'
    return join_text(text, data)


def _manifest_twice_group(manifest: dict) -> str:
    text = json.dumps(manifest, sort_keys=True)
    return text[:-1] + ', "group": "other-group"}'


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
    # Integrity: the data must hash to the manifest's digest, and every name is given once.
    "flipped-factor-bytes": Bad(flip_factor_bytes, "does not match the manifest's digest"),
    "no-digest": Bad(with_manifest(drop_digest), "records no tensor digest"),
    "duplicate-tensor-name": Bad(
        duplicate_header_key(f"{DOWN0}:neurons"), "duplicate name in the header"
    ),
    "duplicate-manifest-key": Bad(duplicate_manifest_key, "duplicate name in the header"),
    "manifest-duplicate-field": Bad(
        with_manifest_text(_manifest_twice_group), "gives the key 'group' twice"
    ),
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


# --- integrity: one check in the shared read, so every path refuses alike -----------------------


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_flipped_factor_bytes_are_refused_by_verify_the_loader_and_the_hot_patch(
    valid_blob: bytes, tiny_qwen2: Path, tmp_path: Path
) -> None:
    from vllm_safety_patch.server.state import SafetyState
    from vllm_safety_patch.vllm_plugin.loader import MergePlan
    from vllm_safety_patch.vllm_plugin.worker_extension import _read_checked

    config = Checkpoint(tiny_qwen2).config
    server = SafetyState(
        delta_dir=tmp_path, model_dir=tiny_qwen2, served_model="tiny", admin_token=None
    )
    good = tmp_path / "good.safetensors"
    good.write_bytes(valid_blob)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(flip_factor_bytes(valid_blob))
    flipped_sha = hashlib.sha256(flipped.read_bytes()).hexdigest()
    # The control: the unflipped file passes the same three paths.
    verified = CliRunner().invoke(app, ["verify", str(good), "--model", str(tiny_qwen2)])
    assert verified.exit_code == 0, verified.output
    assert MergePlan.prepare([good], config).deltas[0].group == "test-group"
    assert _read_checked(str(good), hashlib.sha256(valid_blob).hexdigest()).group == "test-group"
    assert server.read_recorded(good).group == "test-group"

    line = _one_line_error(
        CliRunner().invoke(app, ["verify", str(flipped), "--model", str(tiny_qwen2)])
    )
    assert line.startswith(f"error: {flipped}: the tensor data does not match the manifest's")
    assert "Fix: the file is damaged: copy it again or regenerate it with 'vsp solve'" in line
    with pytest.raises(DeltaFormatError) as at_load:  # --load-format vsp, before any weight
        MergePlan.prepare([flipped], config)
    with pytest.raises(DeltaFormatError) as at_activation:  # the API server, on activation
        server.read_recorded(flipped)
    with pytest.raises(DeltaFormatError) as at_switch:  # a worker reading for a hot patch
        _read_checked(str(flipped), flipped_sha)
    messages = {str(caught.value) for caught in (at_load, at_activation, at_switch)}
    assert messages == {line.removeprefix("error: ")}


def test_a_file_without_a_digest_names_the_command_that_records_it(
    valid_blob: bytes, tiny_qwen2: Path, tmp_path: Path
) -> None:
    path = write_bad("no-digest", valid_blob, tmp_path)
    line = _one_line_error(
        CliRunner().invoke(app, ["verify", str(path), "--model", str(tiny_qwen2)])
    )
    assert "records no tensor digest" in line
    assert line.endswith(
        f"record the digest with 'vsp rehash {path}'; otherwise regenerate it with 'vsp solve'"
    )


# --- reading is bounded by the header's declared sizes -------------------------------------------

HUGE = 1 << 30  # a sparse 1 GiB file: takes no disk space, but reading it would take 1 GiB


def test_a_huge_padded_file_is_refused_without_reading_it(
    valid_blob: bytes, tiny_qwen2: Path, tmp_path: Path
) -> None:
    path = tmp_path / "padded.safetensors"
    path.write_bytes(valid_blob)
    with path.open("r+b") as handle:
        handle.truncate(HUGE)  # zeros past the declared tensors, as a padded copy would have
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = CliRunner().invoke(app, ["verify", str(path), "--model", str(tiny_qwen2)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    line = _one_line_error(result)
    declared = len(valid_blob) - _data_start(valid_blob)
    assert f"tensors need {declared} data bytes, file has {HUGE - _data_start(valid_blob)}" in line
    # The old reader took the whole file into memory (25 s and 2.3 GB for 2 GB) before this.
    assert peak < 16 * 1024 * 1024, peak
    assert seconds < 10, seconds


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Byte counts of every read the delta reader makes (it reads with ``os.pread``)."""
    counts: list[int] = []
    real = os.pread

    def counted(fd: int, length: int, offset: int) -> bytes:
        chunk = real(fd, length, offset)
        counts.append(len(chunk))
        return chunk

    monkeypatch.setattr(os, "pread", counted)
    return counts


@pytest.mark.parametrize("case", ["padded", "cut-in-data", "cut-last-byte"])
def test_a_file_whose_size_disagrees_with_its_header_is_refused_before_its_data(
    case: str, valid_blob: bytes, tmp_path: Path, bytes_read: list[int]
) -> None:
    path = write_bad(case, valid_blob, tmp_path)
    with pytest.raises(DeltaFormatError, match=FORMAT_DEFECTS[case].phrase):
        read_delta(path)
    assert 0 < sum(bytes_read) <= _data_start(valid_blob)  # the header, no tensor byte


def test_a_valid_file_is_read_once_and_no_further_than_declared(
    valid_blob: bytes, tmp_path: Path, bytes_read: list[int]
) -> None:
    path = tmp_path / "good.safetensors"
    path.write_bytes(valid_blob)
    read_delta(path)
    assert sum(bytes_read) == len(valid_blob)


def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    refusals: list[str] = []

    def read() -> None:
        try:
            read_delta(path)
        except DeltaFormatError as error:
            refusals.append(str(error))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open() or read(): a writer that closes at once frees it
        with path.open("wb"):
            pass
        pytest.fail("read_delta waited for a writer on a pipe")
    assert refusals and "not a regular file" in refusals[0]
