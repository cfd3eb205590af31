"""A strict parser of the safetensors header, run before any tensor is read.

The safetensors library rejects bad files too, but with messages about byte offsets; parsing
the header ourselves first lets every failure say what is wrong with a *delta* and how to
fix it (and is what the property-based tests exercise).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from vllm_safety_patch.errors import DeltaFormatError

# A delta's header is a few kB; anything near this is not a delta.
MAX_HEADER_BYTES = 16 * 1024 * 1024

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

REGENERATE = "the file is damaged: copy it again or regenerate it with 'vsp solve'"
# Bytes that are no safetensors file at all may be another kind of file, not a damaged delta.
NOT_SAFETENSORS = (
    "pass a delta .safetensors file written by 'vsp solve'; if this was one, it is damaged or "
    "truncated: copy it again or regenerate it"
)


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int


def _fail(source: str, problem: str) -> DeltaFormatError:
    fix = NOT_SAFETENSORS if problem.startswith("not a safetensors file") else REGENERATE
    return DeltaFormatError(f"{source}: {problem}", fix)


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (raised by :func:`unique_keys`)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def shown(self, limit: int = 80) -> str:
        """The key for an error message: quoted, cut to ``limit`` characters (it is data)."""
        return repr(self.key if len(self.key) <= limit else self.key[:limit] + "...")


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for json.loads, which would silently keep the last of two equal
    keys where other readers (the safetensors library among them) need not: refuse them."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def parse_header(blob: bytes, file_size: int, source: str = "delta") -> SafetensorsHeader:
    """Parse the header at the start of ``blob`` (a prefix of a file of ``file_size`` bytes).

    Raises :class:`DeltaFormatError` for anything that is not a complete, well-formed
    safetensors file; never any other exception.
    """
    if file_size < 8 or len(blob) < 8:
        raise _fail(source, f"not a safetensors file (only {file_size} bytes, truncated?)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _fail(source, f"not a safetensors file (header length {header_len} is absurd)")
    if 8 + header_len > file_size or 8 + header_len > len(blob):
        raise _fail(source, "truncated inside the header")
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as duplicate:  # a tensor name (or metadata key) given twice
        problem = f"duplicate name in the header: {duplicate.shown()} appears twice"
        raise _fail(source, problem) from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise _fail(source, "not a safetensors file (header is not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise _fail(source, "not a safetensors file (header is not a JSON object)")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise _fail(source, "header __metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(source, name, entry, data_size)

    # safetensors requires the buffers to tile the data section exactly.
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: item[1].start):
        if entry.start != position:
            raise _fail(source, f"tensor '{name}' overlaps another or leaves a gap")
        position = entry.end
    if position != data_size:
        raise _fail(
            source,
            f"truncated or padded: tensors need {position} data bytes, file has {data_size}",
        )
    return SafetensorsHeader(metadata=metadata, tensors=tensors, data_start=data_start)


def _parse_entry(source: str, name: str, entry: object, data_size: int) -> TensorEntry:
    if not isinstance(entry, dict):
        raise _fail(source, f"tensor '{name}' has no dtype/shape/offsets record")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _fail(source, f"tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise _fail(source, f"tensor '{name}' has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(source, f"tensor '{name}' has malformed data_offsets {offsets!r}")
    start, end = offsets
    if end > data_size:
        raise _fail(source, f"truncated: tensor '{name}' ends past the end of the file")
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _fail(source, f"tensor '{name}' byte length does not match its shape and dtype")
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def read_header(path: Path) -> SafetensorsHeader:
    """Read and parse the header of the file at ``path``."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            blob = prefix + handle.read(min(length, MAX_HEADER_BYTES))
    except FileNotFoundError:
        raise DeltaFormatError(
            f"{path}: no such delta file", "check the path, or list deltas with 'vsp inspect'"
        ) from None
    except IsADirectoryError:
        raise DeltaFormatError(f"{path}: is a folder", "pass a .safetensors delta file") from None
    except PermissionError:
        raise DeltaFormatError(
            f"{path}: not readable (permission denied)", "fix the file's permissions"
        ) from None
    return parse_header(blob, size, source=str(path))
