"""Proportions with honest error bars, and tests for "did this rate really change?".

Rates here come from tens of prompts per language, so a 95% interval is part of every figure.
Wilson's score interval is used rather than the normal (Wald) one because it stays inside
[0, 1] and keeps its coverage at 0/n and n/n, which refusal rates often hit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963...


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``hits`` successes out of ``n`` (``(0, 1)`` when n is 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Exact ends at 0/n and n/n (the formula gives them up to rounding).
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return (low, high)


def two_proportion_p(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (independent samples)."""
    if n_a == 0 or n_b == 0:
        return 1.0
    pooled = (hits_a + hits_b) / (n_a + n_b)
    variance = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    if variance == 0:
        return 1.0  # both 0% or both 100%: no evidence of a difference
    z = (hits_b / n_b - hits_a / n_a) / math.sqrt(variance)
    return 2 * (1 - NormalDist().cdf(abs(z)))


def mcnemar_exact_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired outcomes (same prompts, two runs).

    Only prompts whose outcome changed carry information: under "no effect" each change is
    as likely to go one way as the other, so the count of one kind is Binomial(changes, 1/2).
    """
    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    up = sum(1 for x, y in zip(a, b, strict=True) if not x and y)
    down = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    changes = up + down
    if changes == 0:
        return 1.0
    tail = sum(math.comb(changes, k) for k in range(min(up, down) + 1)) / 2**changes
    return min(1.0, 2 * tail)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Agreement of two judges beyond chance (None when chance agreement is total)."""
    if len(a) != len(b):
        raise ValueError("verdict lists must have the same length")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    p_a, p_b = sum(a) / n, sum(b) / n
    expected = p_a * p_b + (1 - p_a) * (1 - p_b)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)
