"""Base weight + deltas -> edited weight. The one merge every applier uses.

The sum is formed in float32 and cast to the base dtype once, in a fixed order (deltas sorted
by group name, then file digest), so the loader, the exported checkpoint and the hot-patch
path produce the same bytes from the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from vllm_safety_patch.delta.io import Delta, TensorEdit
from vllm_safety_patch.errors import VSPError


def edit_weight(weight: torch.Tensor, edits: Sequence[TensorEdit]) -> torch.Tensor:
    """Return ``weight`` plus every edit's ``B @ A`` scattered onto its neurons."""
    result = weight.detach().to(device="cpu", dtype=torch.float32, copy=True)
    for edit in edits:
        if tuple(weight.shape) != edit.spec.shape:
            raise ValueError(
                f"{edit.name}: base weight is {list(weight.shape)}, "
                f"delta expects {list(edit.spec.shape)}"
            )
        update = edit.update()
        if edit.spec.axis == "columns":
            result[:, edit.neurons] += update
        else:
            result[edit.neurons, :] += update
    return result.to(dtype=weight.dtype, device=weight.device)


def check_distinct(deltas: Iterable[Delta]) -> None:
    """The same delta (or two of one group) given twice would be applied twice: refuse."""
    seen: dict[str, Delta] = {}
    for delta in deltas:
        for key in (f"sha256:{delta.sha256}", f"group:{delta.group}"):
            if key in seen:
                raise VSPError(
                    f"delta '{delta.group}' is given twice ({seen[key].source} and {delta.source})",
                    "pass each delta set once; one group per delta set",
                )
            seen[key] = delta


def edits_by_tensor(deltas: Iterable[Delta]) -> dict[str, list[TensorEdit]]:
    """Group the edits of several deltas by tensor name, in the canonical order."""
    deltas = list(deltas)
    check_distinct(deltas)
    grouped: dict[str, list[TensorEdit]] = {}
    for delta in sorted(deltas, key=lambda item: (item.group, item.sha256)):
        for name, edit in delta.edits.items():
            grouped.setdefault(name, []).append(edit)
    return grouped


def merge_deltas(
    base_tensors: Mapping[str, torch.Tensor], deltas: Sequence[Delta]
) -> dict[str, torch.Tensor]:
    """Edited versions of the base tensors the deltas touch (others are not returned)."""
    grouped = edits_by_tensor(deltas)
    missing = sorted(set(grouped) - set(base_tensors))
    if missing:
        raise KeyError(f"base tensors missing for: {', '.join(missing)}")
    return {name: edit_weight(base_tensors[name], edits) for name, edits in grouped.items()}
