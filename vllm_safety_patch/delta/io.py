"""Read and write delta files. Reading validates everything before returning anything."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from vllm_safety_patch.delta.header import REGENERATE, parse_header
from vllm_safety_patch.delta.manifest import MANIFEST_KEY, DeltaManifest, EditedTensor
from vllm_safety_patch.errors import DeltaFormatError
from vllm_safety_patch.filemodes import share_files

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


def parse_delta(blob: bytes, source: str = "<memory>") -> Delta:
    """Validate and decode the bytes of a delta file."""
    header = parse_header(blob, len(blob), source)
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


def read_delta(path: str | Path) -> Delta:
    """Read, validate and decode a delta file. Any defect raises :class:`DeltaFormatError`."""
    path = Path(path)
    try:
        blob = path.read_bytes()
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
    return parse_delta(blob, source=str(path))


def encode_delta(manifest: DeltaManifest, edits: dict[str, TensorEdit]) -> bytes:
    """The bytes of a delta file. Deterministic: same inputs, same bytes."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in manifest.tensors:
        edit = edits[spec.name]
        tensors[tensor_key(spec.name, "neurons")] = edit.neurons.to(torch.int64).contiguous()
        tensors[tensor_key(spec.name, "B")] = edit.B.to(torch.float32).contiguous()
        tensors[tensor_key(spec.name, "A")] = edit.A.to(torch.float32).contiguous()
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
