"""Several deltas at once: their updates add (see merge.py). Where two edit the same neurons
of the same tensor their effects interact, so that overlap is reported, not hidden."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from vllm_safety_patch.delta.io import Delta


@dataclass(frozen=True)
class Collision:
    first: str
    second: str
    tensor: str
    shared_neurons: int

    def describe(self) -> str:
        return (
            f"'{self.first}' and '{self.second}' both edit {self.shared_neurons} neurons of "
            f"{self.tensor}"
        )


def find_collisions(deltas: Sequence[Delta]) -> list[Collision]:
    """Every pair of deltas that edits a common neuron of a common tensor."""
    found = []
    for first, second in combinations(deltas, 2):
        for name in sorted(first.edits.keys() & second.edits.keys()):
            shared = set(first.edits[name].neurons.tolist()) & set(
                second.edits[name].neurons.tolist()
            )
            if shared:
                found.append(Collision(first.group, second.group, name, len(shared)))
    return found
