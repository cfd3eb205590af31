"""What the header-only commands read: a delta's safetensors header and manifest, never its
tensors (``vsp inspect``, ``vsp verify --no-model``), and the check every delta command
makes first, that a file is a safetensors file at all.

Nothing here needs torch: it reads the header with ``delta/header.py`` and validates the
manifest with ``delta/manifest.py``, so a header-only command answers in a fraction of a
second, provided importing those two modules does not import torch (the delta package's
``__init__`` and ``models/fingerprint.py`` import it lazily).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_safety_patch.errors import DeltaFormatError

if TYPE_CHECKING:
    from vllm_safety_patch.delta.header import TensorEntry
    from vllm_safety_patch.delta.manifest import DeltaManifest

NOT_A_DELTA_FIX = (
    "pass a delta .safetensors file written by 'vsp solve' (the shipped ones are in deltas/)"
)
_SNIFF_BYTES = 4096


@dataclass(frozen=True)
class DeltaHeader:
    """A delta file's manifest and tensor table, as its header declares them."""

    path: Path
    manifest: DeltaManifest
    tensors: dict[str, TensorEntry]
    sha256: str  # of the whole file, as 'vsp inspect' and the server show it

    @property
    def group(self) -> str:
        return self.manifest.group


def refuse_other_files(path: Path) -> None:
    """Name a file that is plainly not a safetensors file (JSON, other text) as such.

    The header parser calls every unreadable header damage and advises regenerating the
    delta, which is right for a delta that lost bytes and wrong for ``config.json``. Missing
    files, folders, pipes and binary files are left to the readers, which name those.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            return
        head = os.pread(handle, _SNIFF_BYTES, 0)
    finally:
        os.close(handle)
    if len(head) > 8:
        declared = int.from_bytes(head[:8], "little")
        if 8 + declared <= status.st_size and head[8:9] == b"{":
            return  # a plausible safetensors header: the parser judges the rest
    if not head or b"\0" in head:
        return  # binary: perhaps a damaged delta, which the parser names
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the sniff's end
            return
    kind = "JSON" if _looks_like_json(head, whole=len(head) == status.st_size) else "text"
    raise DeltaFormatError(f"{path}: not a safetensors delta (a {kind} file)", NOT_A_DELTA_FIX)


def _looks_like_json(head: bytes, whole: bool) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] == b"{":
        return True
    if text[:1] != b"[" or not whole:  # '[' also opens a TOML table
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def read_delta_header(path: str | Path) -> DeltaHeader:
    """The manifest and tensor table of the delta at ``path``; no tensor is read.

    Raises :class:`DeltaFormatError` for a file that is not a delta, a malformed header or
    manifest, the same one-line errors ``read_delta`` gives for those.
    """
    from vllm_safety_patch.delta.header import read_header
    from vllm_safety_patch.delta.manifest import MANIFEST_KEY, DeltaManifest

    path = Path(path)
    refuse_other_files(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None  # missing or unreadable: read_header names it
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise DeltaFormatError(
            f"{path}: not a regular file (a device, pipe or socket)",
            "pass a .safetensors delta file",
        )
    header = read_header(path)
    if MANIFEST_KEY not in header.metadata:
        raise DeltaFormatError(
            f"{path}: safetensors file without a vsp manifest (not a vsp delta)",
            "pass a delta written by 'vsp solve'; model checkpoints and LoRA adapters "
            "are not deltas",
        )
    manifest = DeltaManifest.from_json(header.metadata[MANIFEST_KEY], str(path))
    return DeltaHeader(path, manifest, dict(header.tensors), file_sha256(path))


def check_layout(delta: DeltaHeader) -> None:
    """The header's tensors are exactly those the manifest implies, with their dtypes and
    shapes (what ``read_delta`` checks before it reads any tensor)."""
    from vllm_safety_patch.delta.header import REGENERATE

    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for spec in delta.manifest.tensors:
        for part, shape in spec.factor_shapes().items():
            expected[f"{spec.name}:{part}"] = ("I64" if part == "neurons" else "F32", shape)
    missing = sorted(set(expected) - set(delta.tensors))
    extra = sorted(set(delta.tensors) - set(expected))
    if missing or extra:
        raise DeltaFormatError(
            f"{delta.path}: tensors do not match the manifest "
            f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})",
            REGENERATE,
        )
    for key, (dtype, shape) in expected.items():
        entry = delta.tensors[key]
        if entry.dtype != dtype or entry.shape != shape:
            raise DeltaFormatError(
                f"{delta.path}: {key} is {entry.dtype} {list(entry.shape)}, the manifest "
                f"implies {dtype} {list(shape)}",
                REGENERATE,
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
