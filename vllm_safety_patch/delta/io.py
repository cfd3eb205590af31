"""Read and write delta files. Reading validates everything before returning anything."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from vllm_safety_patch.delta.digest import tensors_digest
from vllm_safety_patch.delta.header import (
    MAX_HEADER_BYTES,
    REGENERATE,
    SafetensorsHeader,
    parse_header,
)
from vllm_safety_patch.delta.manifest import MANIFEST_KEY, DeltaManifest, EditedTensor, EffectRow
from vllm_safety_patch.errors import DeltaFormatError
from vllm_safety_patch.filemodes import share_files
from vllm_safety_patch.models.fingerprint import short

NEURONS_DTYPE = "I64"
FACTOR_DTYPE = "F32"
PARTS = ("neurons", "B", "A")


def tensor_key(tensor_name: str, part: str) -> str:
    """Key of a stored part: ``<HF tensor name>:<neurons|B|A>``."""
    return f"{tensor_name}:{part}"


@dataclass(frozen=True)
class TensorEdit:
    """The sparse low-rank update of one base weight."""

    spec: EditedTensor
    neurons: torch.Tensor  # int64 [k], sorted, unique
    B: torch.Tensor  # float32
    A: torch.Tensor  # float32

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def build(
        cls,
        name: str,
        shape: tuple[int, int],
        axis: str,
        neurons: torch.Tensor,
        B: torch.Tensor,
        A: torch.Tensor,
    ) -> TensorEdit:
        """Make an edit from unsorted neurons, permuting the factors to match."""
        order = torch.argsort(neurons)
        neurons = neurons[order].to(torch.int64).contiguous()
        if axis == "columns":
            A = A[:, order]
        else:
            B = B[order, :]
        spec = EditedTensor(
            name=name,
            shape=(int(shape[0]), int(shape[1])),
            axis=axis,
            neurons=int(neurons.numel()),
            rank=int(A.shape[0]),
        )
        return cls(
            spec=spec,
            neurons=neurons,
            B=B.to(torch.float32).contiguous(),
            A=A.to(torch.float32).contiguous(),
        )

    def update(self) -> torch.Tensor:
        """The dense ``B @ A`` block (k columns or k rows, never the full weight)."""
        return self.B @ self.A


@dataclass(frozen=True)
class Delta:
    """A validated delta file: its manifest and one edit per tensor."""

    manifest: DeltaManifest
    edits: dict[str, TensorEdit]
    sha256: str  # digest of the file's bytes: names exactly these weights
    source: str = "<memory>"

    @property
    def group(self) -> str:
        return self.manifest.group


def _check_edit(source: str, spec: EditedTensor, parts: dict[str, torch.Tensor]) -> None:
    neurons, left, right = parts["neurons"], parts["B"], parts["A"]
    for part_name, part in (("B", left), ("A", right)):
        if not torch.isfinite(part).all():
            bad = int((~torch.isfinite(part)).sum())
            raise DeltaFormatError(
                f"{source}: {spec.name}:{part_name} holds {bad} NaN/Inf values",
                "the solve diverged: re-run 'vsp solve' with a larger ridge/penalty",
            )
    if not torch.isfinite(left @ right).all():  # finite factors can still overflow
        raise DeltaFormatError(
            f"{source}: {spec.name}: B @ A overflows to Inf (factors too large)",
            "the solve diverged: re-run 'vsp solve' with a larger ridge/penalty",
        )
    neuron_dim = spec.shape[1] if spec.axis == "columns" else spec.shape[0]
    if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= neuron_dim):
        raise DeltaFormatError(
            f"{source}: {spec.name}:neurons has an index outside [0, {neuron_dim})",
            REGENERATE,
        )
    if neurons.unique().numel() != neurons.numel():
        raise DeltaFormatError(f"{source}: {spec.name}:neurons has duplicate indices", REGENERATE)
    if not bool((neurons[1:] > neurons[:-1]).all()):
        raise DeltaFormatError(f"{source}: {spec.name}:neurons is not sorted", REGENERATE)


def _manifest_for(
    header: SafetensorsHeader, source: str, *, require_digest: bool = True
) -> DeltaManifest:
    """The manifest, once the header's tensors are exactly those it names (no data read)."""
    if MANIFEST_KEY not in header.metadata:
        raise DeltaFormatError(
            f"{source}: safetensors file without a vsp manifest (not a vsp delta)",
            "pass a delta written by 'vsp solve'; model checkpoints and LoRA adapters "
            "are not deltas",
        )
    manifest = DeltaManifest.from_json(header.metadata[MANIFEST_KEY], source)

    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for spec in manifest.tensors:
        for part, shape in spec.factor_shapes().items():
            dtype = NEURONS_DTYPE if part == "neurons" else FACTOR_DTYPE
            expected[tensor_key(spec.name, part)] = (dtype, shape)
    missing = sorted(set(expected) - set(header.tensors))
    extra = sorted(set(header.tensors) - set(expected))
    if missing or extra:
        raise DeltaFormatError(
            f"{source}: tensors do not match the manifest "
            f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})",
            REGENERATE,
        )
    for key, (dtype, shape) in expected.items():
        entry = header.tensors[key]
        if entry.dtype != dtype:
            raise DeltaFormatError(
                f"{source}: {key} has dtype {entry.dtype}, the format requires {dtype}",
                REGENERATE,
            )
        if entry.shape != shape:
            raise DeltaFormatError(
                f"{source}: {key} has shape {list(entry.shape)}, manifest implies {list(shape)}",
                REGENERATE,
            )
    if require_digest and manifest.tensors_sha256 is None:
        raise DeltaFormatError(
            f"{source}: the manifest records no tensor digest (written before vsp recorded "
            "one), so its tensor data cannot be checked",
            f"if the file is unchanged since it was written, record the digest with "
            f"'vsp rehash {source}'; otherwise regenerate it with 'vsp solve'",
        )
    return manifest


def _decode(header: SafetensorsHeader, manifest: DeltaManifest, blob: bytes, source: str) -> Delta:
    """Check the tensor data against the manifest's digest, then decode and check values."""
    if manifest.tensors_sha256 is not None:  # None only for 'vsp rehash' of an older file
        actual = tensors_digest(header, blob)
        if actual != manifest.tensors_sha256:
            raise DeltaFormatError(
                f"{source}: the tensor data does not match the manifest's digest (recorded "
                f"{short(manifest.tensors_sha256)}, data hashes to {short(actual)}): the file "
                "was changed after it was written",
                REGENERATE,
            )
    try:
        tensors = load(blob)
    except SafetensorError as error:  # header passed, so this is unexpected damage
        raise DeltaFormatError(f"{source}: unreadable tensors ({error})", REGENERATE) from None

    edits: dict[str, TensorEdit] = {}
    for spec in manifest.tensors:
        parts = {part: tensors[tensor_key(spec.name, part)] for part in PARTS}
        _check_edit(source, spec, parts)
        edits[spec.name] = TensorEdit(spec=spec, **parts)
    return Delta(
        manifest=manifest, edits=edits, sha256=hashlib.sha256(blob).hexdigest(), source=source
    )


def parse_delta(blob: bytes, source: str = "<memory>") -> Delta:
    """Validate and decode the bytes of a delta file."""
    header = parse_header(blob, len(blob), source)
    return _decode(header, _manifest_for(header, source), blob, source)


def _read_file(
    path: Path, *, require_digest: bool = True
) -> tuple[SafetensorsHeader, DeltaManifest, bytes]:
    """Read a delta file's header, check it and the manifest, then read its tensor data.

    Memory and time are bounded by what the header declares: a file whose size disagrees
    with the header is refused before any tensor byte is read, and no byte past the
    declared tensors is ever read.
    """
    source = str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DeltaFormatError(
            f"{path}: no such delta file", "check the path, or list shipped deltas in deltas/"
        ) from None
    except IsADirectoryError:
        raise DeltaFormatError(f"{path}: is a folder", "pass a .safetensors delta file") from None
    except PermissionError:
        raise DeltaFormatError(
            f"{path}: not readable (permission denied)", "fix the file's permissions"
        ) from None
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            raise DeltaFormatError(f"{path}: is a folder", "pass a .safetensors delta file")
        if not stat.S_ISREG(status.st_mode):
            raise DeltaFormatError(
                f"{path}: not a regular file (a device, pipe or socket)",
                "pass a .safetensors delta file",
            )
        size = status.st_size
        prefix = os.pread(fd, 8, 0)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        # Never more than the cap or than the file holds; parse_header refuses both cases.
        head = prefix + _read_at(fd, 8, min(length, MAX_HEADER_BYTES, max(size - 8, 0)))
        header = parse_header(head, size, source)  # the offsets tile the rest of the file
        manifest = _manifest_for(header, source, require_digest=require_digest)
        data = _read_at(fd, header.data_start, size - header.data_start)
    finally:
        os.close(fd)
    if header.data_start + len(data) != size:
        raise DeltaFormatError(
            f"{path}: the file got shorter while it was read", "read it again once it is written"
        )
    return header, manifest, head + data


def _read_at(fd: int, offset: int, count: int) -> bytes:
    """Up to ``count`` bytes from ``offset`` (fewer only at the end of the file)."""
    chunks: list[bytes] = []
    while count > 0:
        chunk = os.pread(fd, min(count, 1 << 26), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_delta(path: str | Path) -> Delta:
    """Read, validate and decode a delta file. Any defect raises :class:`DeltaFormatError`."""
    path = Path(path)
    header, manifest, blob = _read_file(path)
    return _decode(header, manifest, blob, str(path))


def encode_delta(manifest: DeltaManifest, edits: dict[str, TensorEdit]) -> bytes:
    """The bytes of a delta file. Deterministic: same inputs, same bytes."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in manifest.tensors:
        edit = edits[spec.name]
        tensors[tensor_key(spec.name, "neurons")] = edit.neurons.to(torch.int64).contiguous()
        tensors[tensor_key(spec.name, "B")] = edit.B.to(torch.float32).contiguous()
        tensors[tensor_key(spec.name, "A")] = edit.A.to(torch.float32).contiguous()
    # The digest covers the data section, which the metadata does not change: hash the same
    # tensors saved bare, with the function every reader uses, then record it. Any digest the
    # given manifest carries is replaced: it describes the data written now.
    bare = save(tensors)
    digest = tensors_digest(parse_header(bare, len(bare), "new delta"), bare)
    manifest = manifest.model_copy(update={"tensors_sha256": digest})
    # One metadata key only: safetensors serialises metadata from a hash map.
    blob = save(tensors, metadata={MANIFEST_KEY: manifest.to_json()})
    parse_delta(blob, source="new delta")  # never write a file we would refuse to read
    return blob


def write_delta(path: str | Path, manifest: DeltaManifest, edits: dict[str, TensorEdit]) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a delta."""
    path = Path(path)
    blob = encode_delta(manifest, edits)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as temp_file:
            temp_file.write(blob)
        share_files([temp_name])  # mkstemp makes 0600; a delta is a shared file
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def write_measured_effect(path: str | Path, delta: Delta, rows: list[EffectRow]) -> Path:
    """Rewrite a delta with ``rows`` as its manifest's ``measured_effect`` (the figures of
    ``vsp measure``); its edits stay as they are."""
    manifest = delta.manifest.model_copy(update={"measured_effect": rows})
    return write_delta(path, manifest, delta.edits)


def rehash_deltas(paths: Sequence[str | Path]) -> list[tuple[Path, Delta, bool]]:
    """Record the tensor digest in delta files written before manifests carried one.

    Every file is read and checked first (all checks but the missing digest), and only then
    are the files lacking a digest rewritten (atomically, through :func:`write_delta`); a
    file whose recorded digest does not match is refused, never re-stamped. Returns
    ``(path, delta as now on disk, rewritten?)`` per file.
    """
    checked: list[tuple[Path, Delta]] = []
    for given in paths:
        path = Path(given)
        header, manifest, blob = _read_file(path, require_digest=False)
        checked.append((path, _decode(header, manifest, blob, str(path))))
    done: list[tuple[Path, Delta, bool]] = []
    for path, delta in checked:
        if delta.manifest.tensors_sha256 is not None:
            done.append((path, delta, False))
            continue
        # resolve(): through a link, update the file it names rather than replace the link.
        write_delta(path.resolve(), delta.manifest, delta.edits)
        done.append((path, read_delta(path), True))
    return done
