"""Write a full edited checkpoint (base + deltas) for engines without the vsp plugin."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.delta.merge import edit_weight, edits_by_tensor
from vllm_safety_patch.delta.verify import verify_against_checkpoint
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.filemodes import share_tree
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.default_model import MARKER as BASE_MARKER

MERGED_MARKER = "vsp-merged.json"


def write_merged_checkpoint(
    checkpoint: Checkpoint, deltas: Sequence[Delta], out_dir: str | Path
) -> Path:
    """Verify every delta, then write ``out_dir`` whole (staging folder + rename)."""
    out_dir = Path(out_dir).resolve()
    if out_dir == checkpoint.path.resolve():
        raise VSPError(
            f"--out {out_dir} is the base checkpoint itself",
            "write the edited checkpoint to a new folder; the base must stay intact",
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MERGED_MARKER).is_file():
        raise VSPError(
            f"--out {out_dir} exists and is not an edited checkpoint written by vsp",
            "choose a new or empty folder (vsp only replaces folders it wrote itself)",
        )
    verify_against_checkpoint(deltas, checkpoint)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    grouped = edits_by_tensor(deltas)
    for item in sorted(checkpoint.path.iterdir()):
        if item.suffix == ".safetensors":
            with safe_open(item, framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
                metadata = handle.metadata() or {"format": "pt"}
            for name in grouped.keys() & tensors.keys():
                tensors[name] = edit_weight(tensors[name], grouped[name])
            save_file(tensors, staging / item.name, metadata=metadata)
        elif item.is_file() and item.name != BASE_MARKER:  # it describes the base only
            shutil.copy2(item, staging / item.name)
    record = {
        "base": str(checkpoint.path),
        "deltas": [
            {"group": d.group, "sha256": d.sha256, "fingerprint": d.manifest.base_model.fingerprint}
            for d in sorted(deltas, key=lambda item: item.group)
        ],
    }
    (staging / MERGED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    # save_file writes 0600 and copy2 keeps the base's modes: the server may run as another user.
    share_tree(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    return out_dir
