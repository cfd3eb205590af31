"""Assemble a new delta (manifest + edits) for a base model: used by the solver and tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_safety_patch.delta.io import Delta, TensorEdit, encode_delta, parse_delta
from vllm_safety_patch.delta.manifest import BaseModelRef, DeltaManifest, EffectRow
from vllm_safety_patch.models.fingerprint import architecture_config, fingerprint


def build_delta(
    *,
    group: str,
    languages: Sequence[str],
    model_id: str,
    config: Mapping[str, Any],
    base_tensors: Mapping[str, torch.Tensor],
    edits: Sequence[TensorEdit],
    solver: Mapping[str, Any] | None = None,
    data_digests: Mapping[str, str] | None = None,
    measured_effect: Sequence[EffectRow] = (),
    description: str = "",
) -> tuple[Delta, bytes]:
    """Return the delta and its file bytes; fingerprints the edited ``base_tensors``."""
    ordered = sorted(edits, key=lambda edit: edit.name)
    manifest = DeltaManifest(
        group=group,
        languages=list(languages),
        base_model=BaseModelRef(
            id=model_id,
            architecture=(config.get("architectures") or ["unknown"])[0],
            fingerprint=fingerprint(config, {e.name: base_tensors[e.name] for e in ordered}),
            architecture_config=architecture_config(config),
        ),
        tensors=[edit.spec for edit in ordered],
        neuron_count=sum(edit.spec.neurons for edit in ordered),
        rank=max(edit.spec.rank for edit in ordered),
        solver=dict(solver or {}),
        data_digests=dict(data_digests or {}),
        measured_effect=list(measured_effect),
        description=description,
    )
    blob = encode_delta(manifest, {edit.name: edit for edit in ordered})
    return parse_delta(blob, source=f"delta '{group}'"), blob
