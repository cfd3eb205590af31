"""Safety-neuron scoring from streamed per-class sums (no activations are kept).

Score of neuron j: the standardised mean difference (Cohen's d) between English harmful and
harmless prompts at the decision position(s),
``|mean_harmful - mean_harmless| / sqrt((var_harmful + var_harmless) / 2)``.
A large d means the neuron fires differently when the model decides to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ClassMoments:
    """Running count, sum and sum of squares of activations of one class (float64)."""

    width: int
    count: int = 0
    total: torch.Tensor = field(init=False)
    squares: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.width, dtype=torch.float64)
        self.squares = torch.zeros(self.width, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.squares += (rows * rows).sum(dim=0)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def variance(self) -> torch.Tensor:
        mean = self.mean()
        return (self.squares / max(self.count, 1) - mean * mean).clamp(min=0)


def separation_scores(harmful: ClassMoments, harmless: ClassMoments) -> torch.Tensor:
    """Cohen's d per neuron (float64)."""
    pooled = ((harmful.variance() + harmless.variance()) / 2).sqrt()
    return (harmful.mean() - harmless.mean()).abs() / (pooled + 1e-6)


def top_neurons(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` best-separating neurons, sorted ascending (ties: lower index)."""
    count = min(count, scores.numel())
    # stable ordering: sort by (-score, index) so equal scores never reorder between runs
    order = torch.argsort(-scores, stable=True)[:count]
    return torch.sort(order).values


def appendix_b_neurons(harmful: ClassMoments, harmless: ClassMoments, cap: int) -> torch.Tensor:
    """The paper's safety neurons (appendix B): ``delta`` = harmful minus harmless mean; the
    union of neurons whose within-layer z-score of ``delta`` exceeds 2 and those whose Cohen's
    d exceeds 1, both one-sided (harmful > harmless). At most ``cap`` (best d first), at least
    one, sorted ascending."""
    delta = harmful.mean() - harmless.mean()
    z = (delta - delta.mean()) / (delta.std() + 1e-12)
    pooled = ((harmful.variance() + harmless.variance()) / 2).sqrt()
    d = delta / (pooled + 1e-6)
    chosen = torch.nonzero((z > 2.0) | (d > 1.0)).flatten()
    if chosen.numel() == 0:
        chosen = torch.argmax(d).reshape(1)
    if chosen.numel() > cap:
        chosen = chosen[torch.argsort(-d[chosen], stable=True)[:cap]]
    return torch.sort(chosen).values
