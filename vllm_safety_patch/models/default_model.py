"""The default model: Qwen2.5-Coder-0.5B-Instruct, prepared offline from PyPI parts.

Its entry is the catalogue's first (:mod:`vllm_safety_patch.models.catalogue`: packages,
digests); the preparation is the one every catalogue model gets
(:mod:`vllm_safety_patch.models.prepare`). This module keeps the default model's names that
callers and tests use (``prepare_default_model``, ``assemble_gguf`` and ``convert_gguf``,
which tests swap for a tiny model, the pinned digests, the marker).
"""

from __future__ import annotations

from pathlib import Path

from vllm_safety_patch.models.catalogue import DEFAULT_ENTRY
from vllm_safety_patch.models.prepare import (
    DROPPED_CONFIG_KEYS,
    MARKER,
    PreparedModel,
    Progress,
    _no_progress,
    convert_gguf,
    model_fingerprint,
    prepare_model,
    read_marker,
)
from vllm_safety_patch.models.prepare import assemble_gguf as _assemble_entry

__all__ = [
    "DROPPED_CONFIG_KEYS",
    "GGUF_SHA256",
    "MARKER",
    "PACKAGE_VERSION",
    "PART_SHA256",
    "PreparedModel",
    "assemble_gguf",
    "convert_gguf",
    "model_fingerprint",
    "part_member",
    "part_package",
    "part_wheel",
    "prepare_default_model",
    "read_marker",
]

PACKAGE_VERSION = DEFAULT_ENTRY.package_version
GGUF_SHA256 = DEFAULT_ENTRY.gguf_sha256
PART_SHA256 = {index: DEFAULT_ENTRY.part_digest(index) for index in DEFAULT_ENTRY.part_indices()}


def part_package(index: int) -> str:
    return DEFAULT_ENTRY.part_package(index)


def part_wheel(downloads: Path, index: int) -> Path:
    return DEFAULT_ENTRY.part_wheel(downloads, index)


def part_member(index: int) -> str:
    return DEFAULT_ENTRY.part_member(index)


def assemble_gguf(downloads: Path, target: Path, progress: Progress = _no_progress) -> str:
    """Download (if needed) and concatenate the six parts into ``target``; return its sha256."""
    return _assemble_entry(DEFAULT_ENTRY, downloads, target, progress)


def prepare_default_model(
    home: Path | None = None, progress: Progress = _no_progress, force: bool = False
) -> PreparedModel:
    """Idempotent: a prepared model (marker present) returns at once unless ``force``."""
    # This module's names, looked up now: a test that swaps them is obeyed.
    return prepare_model(
        DEFAULT_ENTRY, home, progress, force, assemble=assemble_gguf, convert=convert_gguf
    )
