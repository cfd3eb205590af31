"""Per-request delta selection: deltas served as vLLM multi-LoRA adapters (``vsp serve --lora``).

A delta is an exact LoRA on the modules it edits (``vsp export --format peft``), so multi-LoRA
in vLLM can apply it per request: the client picks it by model name (the delta's group), while the
merged set (``--deltas``) serves requests for the base model name. The launcher exports each
adapter once into the cache (keyed by the delta file's sha256) and hands vLLM the flags; the
API server learns the adapters' labels from ``VSP_LORA_LABELS`` so that the
``X-Safety-Deltas`` header and the refusal metrics name the weights that really answered.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_safety_patch import settings
from vllm_safety_patch.errors import VSPError

LORA_LABELS_VAR = settings.LORA_LABELS.name
# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_BODY_BYTES = 1 << 20  # the "model" field of a request; bigger bodies are not parsed


@dataclass(frozen=True)
class Adapter:
    name: str  # the model name clients ask for (the delta's group)
    path: Path  # the exported PEFT adapter folder
    rank: int
    label: str  # the X-Safety-Deltas value of its answers


def adapter_label(group: str, fingerprint: str) -> str:
    return f"lora:{group}@{fingerprint[:12]}"


def prepare_adapters(
    paths: Sequence[Path], model_dir: Path, merged: Sequence[Path], cache: Path | None = None
) -> list[Adapter]:
    """Verify the deltas against the model and export each as a PEFT adapter (cached)."""
    from vllm_safety_patch.delta.export_peft import write_peft_adapter
    from vllm_safety_patch.delta.io import read_delta
    from vllm_safety_patch.delta.verify import verify_against_checkpoint
    from vllm_safety_patch.models.checkpoint import Checkpoint

    deltas = [read_delta(path) for path in paths]
    verify_against_checkpoint(deltas, Checkpoint(model_dir))
    merged_sha = {read_delta(path).sha256 for path in merged}
    adapters, names = [], set()
    for delta in deltas:
        if delta.sha256 in merged_sha:
            raise VSPError(
                f"delta '{delta.group}' is both merged (--deltas) and a LoRA adapter (--lora): "
                "its requests would get the edit twice",
                "serve it one way: drop it from --deltas or from --lora",
            )
        if delta.group in names:
            raise VSPError(
                f"two LoRA deltas are both named '{delta.group}'",
                "give each adapter a distinct delta (one file per group)",
            )
        names.add(delta.group)
        folder = (cache or settings.vsp_home() / "lora") / delta.sha256[:16] / delta.group
        if not (folder / "adapter_config.json").is_file():
            staging = folder.with_name(folder.name + ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            write_peft_adapter(delta, str(model_dir), staging)
            os.replace(staging, folder)  # whole or absent: never a half-written adapter
        rank = max(edit.spec.rank for edit in delta.edits.values())
        label = adapter_label(delta.group, delta.manifest.base_model.fingerprint)
        adapters.append(Adapter(delta.group, folder, rank, label))
    return adapters


def lora_flags(adapters: Sequence[Adapter], has_flag) -> list[str]:
    """vLLM flags for the adapters; the user's own values (after ``--``) win."""
    if not adapters:
        return []
    flags = [] if has_flag("--enable-lora") else ["--enable-lora"]
    flags += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    if not has_flag("--max-lora-rank"):
        wanted = max(a.rank for a in adapters)
        flags += ["--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= wanted))]
    if not has_flag("--max-loras"):
        flags += ["--max-loras", str(len(adapters))]
    return flags


def labels_env(adapters: Sequence[Adapter]) -> str:
    return json.dumps({a.name: a.label for a in adapters}, sort_keys=True)


def labels_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    raw = settings.LORA_LABELS.raw(environ) or ""
    try:
        labels = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def requested_model(body: bytes) -> str | None:
    """The ``model`` field of an OpenAI request body, if it is readable JSON."""
    if not body or len(body) > MAX_BODY_BYTES:
        return None
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
