"""Property tests of the header parser: any input gives a header or a DeltaFormatError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from vllm_safety_patch.delta.header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    parse_header,
)
from vllm_safety_patch.errors import DeltaFormatError

# Two slow cores: modest example counts, no per-example deadline.
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TORCH_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_or_refuse(blob: bytes, file_size: int | None = None) -> SafetensorsHeader | None:
    """Run the parser; a DeltaFormatError is an allowed answer, anything else fails the test."""
    try:
        header = parse_header(blob, len(blob) if file_size is None else file_size, source="fuzz")
    except DeltaFormatError as error:
        assert str(error).startswith("fuzz: ") and "Fix:" in str(error)
        return None
    assert isinstance(header, SafetensorsHeader)
    return header


def with_length(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# --- generated valid files ---------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20
).filter(lambda name: name != "__metadata__")
shapes = st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3)
metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=4)


@st.composite
def tensor_dicts(draw) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in draw(st.lists(names, min_size=0, max_size=5, unique=True)):
        dtype = draw(st.sampled_from(sorted(TORCH_DTYPES, key=str)))
        shape = draw(shapes)
        seed = draw(st.integers(0, 2**16))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10
        tensors[name] = values.to(dtype)
    return tensors


@st.composite
def valid_files(draw) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    tensors = draw(tensor_dicts())
    meta = draw(metadata)
    return save(tensors, metadata=meta or None), tensors, meta


@FAST
@given(valid_files())
def test_valid_files_parse_to_exactly_their_contents(file) -> None:
    blob, tensors, meta = file
    header = parse_header(blob, len(blob))
    assert header.metadata == meta
    assert set(header.tensors) == set(tensors)
    for name, tensor in tensors.items():
        entry = header.tensors[name]
        assert entry.dtype == TORCH_DTYPES[tensor.dtype]
        assert entry.shape == tuple(tensor.shape)
        assert entry.end - entry.start == tensor.numel() * DTYPE_SIZES[entry.dtype]
        # The offsets point at the tensor's own bytes.
        raw = blob[header.data_start + entry.start : header.data_start + entry.end]
        expected = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw == expected
    (length,) = struct.unpack("<Q", blob[:8])
    assert header.data_start == 8 + length


@FAST
@given(valid_files(), st.data())
def test_a_prefix_of_the_file_is_enough_when_the_size_is_given(file, data) -> None:
    # read_header passes only the header bytes plus the real file size.
    blob, tensors, _ = file
    (length,) = struct.unpack("<Q", blob[:8])
    cut = data.draw(st.integers(min_value=8 + length, max_value=len(blob)))
    assert set(parse_header(blob[:cut], len(blob)).tensors) == set(tensors)


# --- arbitrary and mutated input ---------------------------------------------------------------


@FAST
@given(st.binary(max_size=512))
@example(b"")
@example(b"\x00" * 8)
@example(struct.pack("<Q", 2) + b"{}")
@example(struct.pack("<Q", 2**64 - 1))
@example(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
def test_arbitrary_bytes_give_a_header_or_a_format_error(blob: bytes) -> None:
    parse_or_refuse(blob)


@FAST
@given(st.binary(max_size=256), st.binary(max_size=64))
def test_arbitrary_header_text_with_a_correct_length_prefix(header: bytes, data: bytes) -> None:
    # Gets past the length check, so the JSON and record checks are exercised.
    parse_or_refuse(with_length(header, data))


@FAST
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=1 << 20))
def test_any_claimed_file_size_gives_a_header_or_a_format_error(blob: bytes, size: int) -> None:
    parse_or_refuse(blob, size)


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
json_scalars = json_scalars | st.floats(allow_nan=False, allow_infinity=False)
entry_fields = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(DTYPE_SIZES)) | st.text(max_size=5) | st.none(),
        "shape": st.lists(st.integers(-2, 5) | json_scalars, max_size=3) | json_scalars,
        "data_offsets": st.lists(st.integers(-2, 64) | json_scalars, max_size=3) | json_scalars,
    },
)
json_headers = st.dictionaries(
    names | st.just("__metadata__"),
    entry_fields | json_scalars | st.dictionaries(st.text(max_size=4), json_scalars, max_size=3),
    max_size=4,
)


@FAST
@given(json_headers, st.binary(max_size=64))
def test_structured_json_headers_give_a_header_or_a_format_error(header: dict, data: bytes) -> None:
    # Hashable JSON values in every field (unhashable dtypes have their own test below).
    parse_or_refuse(with_length(json.dumps(header).encode(), data))


@st.composite
def mutated_files(draw) -> bytes:
    blob = bytearray(draw(valid_files())[0])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not blob:
            break
        position = draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            blob[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[position:]
        elif kind == "insert":
            blob[position:position] = draw(st.binary(min_size=1, max_size=4))
        else:
            del blob[position : position + draw(st.integers(1, 4))]
    return bytes(blob)


@FAST
@given(mutated_files())
def test_mutated_valid_files_give_a_header_or_a_format_error(blob: bytes) -> None:
    parse_or_refuse(blob)


@FAST
@given(valid_files(), st.data())
def test_every_truncation_of_a_valid_file_is_refused(file, data) -> None:
    blob, _, _ = file
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    with pytest.raises(DeltaFormatError):
        parse_header(blob[:cut], cut)


@FAST
@given(valid_files(), st.data())
def test_a_tensor_name_given_twice_is_refused(file, data) -> None:
    # json.loads would keep one of the two records silently; the parser refuses the file.
    blob, tensors, _ = file
    if not tensors:
        return
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    name = data.draw(st.sampled_from(sorted(tensors)))
    text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    twice = with_length(text.encode(), blob[8 + length :])
    with pytest.raises(DeltaFormatError, match="duplicate name in the header"):
        parse_header(twice, len(twice))


# --- explicit cases ---------------------------------------------------------------------------


F32_ONE = b'{"t": {"dtype": "F32", "shape": [1], '
HEADER_DEFECTS = [
    # (header JSON, bytes of data after it, phrase of the message)
    (b"[]", 0, "not a JSON object"),
    (b'{"__metadata__": {"k": 1}}', 0, "__metadata__ must map strings to strings"),
    (b'{"__metadata__": null}', 0, "__metadata__ must map strings to strings"),
    (b'{"t": 3}', 0, "no dtype/shape/offsets record"),
    (b'{"t": {"dtype": "F99", "shape": [], "data_offsets": [0, 0]}}', 0, "unknown dtype"),
    (b'{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', 0, "malformed shape"),
    (b'{"t": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', 4, "malformed shape"),
    (b'{"t": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', 4, "malformed shape"),
    (F32_ONE + b'"data_offsets": [4, 0]}}', 4, "malformed data_offsets"),
    (F32_ONE + b'"data_offsets": [0]}}', 4, "malformed data_offsets"),
    (F32_ONE + b'"data_offsets": [0, 8]}}', 4, "ends past the end"),
    (F32_ONE + b'"data_offsets": [0, 8]}}', 8, "does not match its shape"),
    (F32_ONE + b'"data_offsets": [4, 8]}}', 8, "leaves a gap"),
    (F32_ONE + b'"data_offsets": [0, 4]}}', 8, "truncated or padded"),
    (b'{"t": ' + F32_ONE[6:] + b'"data_offsets": [0, 4]}, "u": ' + F32_ONE[6:]
     + b'"data_offsets": [2, 6]}}', 8, "overlaps another"),
    (F32_ONE + b'"data_offsets": [0, 4]}, "t": ' + F32_ONE[6:] + b'"data_offsets": [0, 4]}}',
     4, "duplicate name in the header: 't' appears twice"),
    (b'{"__metadata__": {"k": "a", "k": "b"}}', 0, "duplicate name in the header: 'k'"),
    (b'{"t": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4,
     "duplicate name in the header: 'dtype'"),
    (b"[" * 50_000 + b"]" * 50_000, 0, "not UTF-8 JSON"),
    (b'{"\xff": 1}', 0, "not UTF-8 JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("header", "data_bytes", "phrase"), HEADER_DEFECTS)
def test_each_header_defect_has_its_own_message(
    header: bytes, data_bytes: int, phrase: str
) -> None:
    blob = with_length(header, b"\0" * data_bytes)
    with pytest.raises(DeltaFormatError, match=phrase):
        parse_header(blob, len(blob))


@pytest.mark.parametrize(
    "header",
    [
        b'{"t": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}',
        b'{"t": {"dtype": {}, "shape": [], "data_offsets": [0, 0]}}',
        b'{"t": ' + b"9" * 5000 + b"}",
    ],
    ids=["dtype-list", "dtype-object", "huge-integer"],
)
def test_hostile_json_values_give_a_format_error(header: bytes) -> None:
    with pytest.raises(DeltaFormatError):
        parse_header(with_length(header), len(with_length(header)))
