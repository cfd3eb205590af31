"""Fingerprints: which base weights a delta was solved for.

A fingerprint hashes the architecture-defining part of ``config.json`` together with the
exact stored bytes (dtype, shape, data) of a set of base tensors. A delta records the
fingerprint of the tensors it edits, so the same delta is refused by another base model, by
another conversion of the same model (other bytes) and by another architecture. The loader,
``vsp verify`` and the server all call :func:`fingerprint`; nothing else computes one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FINGERPRINT_VERSION = "vsp-fingerprint-v1"

# Keys of config.json that change what a weight means. Run-time knobs (dtype, versions,
# generation settings, quantisation leftovers) are deliberately left out.
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "tie_word_embeddings",
)


def architecture_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``config`` that the fingerprint covers (absent keys become None)."""
    return {key: config.get(key) for key in ARCHITECTURE_KEYS}


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's stored bytes, its dtype and its shape."""
    import torch  # here, so header-only commands that import this module skip torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
    header = f"{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode()
    return hashlib.sha256(header + memoryview(raw).tobytes()).hexdigest()


def fingerprint_from_digests(config: Mapping[str, Any], digests: Mapping[str, str]) -> str:
    """Combine per-tensor digests (name -> :func:`tensor_digest`) with the architecture."""
    hasher = hashlib.sha256()
    hasher.update(FINGERPRINT_VERSION.encode() + b"\n")
    hasher.update(json.dumps(architecture_config(config), sort_keys=True).encode() + b"\n")
    for name in sorted(digests):
        hasher.update(f"{name}={digests[name]}\n".encode())
    return hasher.hexdigest()


def fingerprint(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of ``tensors`` (HF name -> base weight as stored) under ``config``."""
    return fingerprint_from_digests(
        config, {name: tensor_digest(tensor) for name, tensor in tensors.items()}
    )


def checkpoint_fingerprint(checkpoint, names: Iterable[str]) -> str:
    """Fingerprint of the named tensors of a :class:`~.checkpoint.Checkpoint`."""
    return fingerprint_from_digests(
        checkpoint.config, {name: tensor_digest(checkpoint.get(name)) for name in names}
    )


def editable_tensor_names(tensor_names: Iterable[str]) -> list[str]:
    """The MLP projection weights a delta may edit (gate/up/down of every layer)."""
    suffixes = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")
    return sorted(name for name in tensor_names if name.endswith(suffixes))


def short(fingerprint_hex: str) -> str:
    """The 12-character form of a fingerprint or a sha256 digest shown to people (headers,
    tables, messages, adapter names); every shortened hash goes through here."""
    return fingerprint_hex[:12]
