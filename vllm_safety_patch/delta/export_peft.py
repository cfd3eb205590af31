"""Write a delta as an exact PEFT LoRA adapter, for engines that select adapters per request
(vLLM's multi-LoRA): an update ``B @ A`` on k columns of ``down_proj`` (or ``o_proj``) is a
LoRA whose ``A`` is zero outside those columns (and on k rows of gate/up_proj, one whose
``B`` is)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.filemodes import share_files

_LAYER = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp\.(gate_proj|up_proj|down_proj)|self_attn\.(o_proj))\.weight$"
)


def lora_factors(delta: Delta) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Dense LoRA ``(A [r, in], B [out, r])`` per edited module, with ``B @ A`` = the update."""
    factors = {}
    for name, edit in delta.edits.items():
        out_dim, in_dim = edit.spec.shape
        rank = edit.spec.rank
        if edit.spec.axis == "columns":
            lora_a = torch.zeros(rank, in_dim, dtype=torch.float32)
            lora_a[:, edit.neurons] = edit.A
            lora_b = edit.B.clone()
        else:
            lora_a = edit.A.clone()
            lora_b = torch.zeros(out_dim, rank, dtype=torch.float32)
            lora_b[edit.neurons, :] = edit.B
        factors[name.removesuffix(".weight")] = (lora_a, lora_b)
    return factors


def peft_config(
    base_model_path: str, ranks: dict[str, int], modules: set[str], layers: set[int]
) -> dict:
    """``adapter_config.json`` of an exact adapter: scaling alpha / r = 1, so ``B @ A`` is the
    update itself; per-module ranks and alphas keep scaling 1 where a module's rank differs."""
    rank = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {k: v for k, v in ranks.items() if v != rank},
        "alpha_pattern": {k: v for k, v in ranks.items() if v != rank},
        "target_modules": sorted(modules),
        "layers_to_transform": sorted(layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def write_peft_adapter(delta: Delta, base_model_path: str, out_dir: str | Path) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (scaling 1: alpha = rank)."""
    out_dir = Path(out_dir)
    modules, layers, ranks = set(), set(), {}
    for name, edit in delta.edits.items():
        match = _LAYER.match(name)
        if not match:
            raise VSPError(
                f"'{name}' is not an MLP projection or attention output of a decoder layer",
                "export as a merged checkpoint instead (vsp export --format merged)",
            )
        layers.add(int(match.group(1)))
        modules.add(match.group(2) or match.group(3))
        ranks[name.removesuffix(".weight").removeprefix("model.")] = edit.spec.rank
    tensors = {}
    for module, (lora_a, lora_b) in lora_factors(delta).items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.contiguous()
    config = peft_config(base_model_path, ranks, modules, layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / name for name in ("adapter_model.safetensors", "adapter_config.json")]
    save_file(tensors, written[0], metadata={"format": "pt"})
    written[1].write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "vsp-delta.json").write_text(
        json.dumps({"group": delta.group, "sha256": delta.sha256}, indent=2) + "\n"
    )
    # save_file writes 0600; the engine reading the adapter may run as another user. Only
    # the files written here: out_dir may hold the user's own files.
    share_files([*written, out_dir / "vsp-delta.json"])
    return out_dir
