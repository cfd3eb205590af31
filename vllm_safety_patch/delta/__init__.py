"""The delta file: one ``.safetensors`` file per delta set, with a versioned JSON manifest.

Layout of a file (see ``manifest.py`` for the schema)::

    metadata   {"vsp_manifest": <manifest JSON>}
    <tensor>:neurons   int64 [k]        edited neuron indices (sorted, unique)
    <tensor>:B         float32          left factor
    <tensor>:A         float32          right factor

For ``axis="columns"`` (a ``down_proj`` weight ``W`` of shape ``[out, in]``):
``W[:, neurons] += B @ A`` with ``B: [out, r]``, ``A: [r, k]``. For ``axis="rows"``
(``gate_proj``/``up_proj``): ``W[neurons, :] += B @ A`` with ``B: [k, r]``, ``A: [r, in]``.
Never a dense full-size delta; no pickle anywhere. The manifest's ``tensors_sha256`` is the
digest of these tensors (``digest.py``): recorded by every write, checked by every read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_safety_patch.delta.io import Delta, TensorEdit, read_delta, write_delta
    from vllm_safety_patch.delta.manifest import (
        BaseModelRef,
        DeltaManifest,
        EditedTensor,
        EffectRow,
    )
    from vllm_safety_patch.delta.merge import edit_weight, merge_deltas
    from vllm_safety_patch.delta.verify import verify_against_checkpoint

# Exports load on first use (PEP 562): commands that read only a header (`vsp inspect`,
# `vsp verify --no-model`) import this package without paying for torch.
_EXPORTS = {
    "BaseModelRef": "manifest",
    "DeltaManifest": "manifest",
    "EditedTensor": "manifest",
    "EffectRow": "manifest",
    "Delta": "io",
    "TensorEdit": "io",
    "read_delta": "io",
    "write_delta": "io",
    "edit_weight": "merge",
    "merge_deltas": "merge",
    "verify_against_checkpoint": "verify",
}

__all__ = [
    "BaseModelRef",
    "Delta",
    "DeltaManifest",
    "EditedTensor",
    "EffectRow",
    "TensorEdit",
    "edit_weight",
    "merge_deltas",
    "read_delta",
    "verify_against_checkpoint",
    "write_delta",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
