"""Interval and test statistics of the evaluation harness, against known values."""

from __future__ import annotations

import pytest

from vllm_safety_patch.eval.stats import (
    cohen_kappa,
    mcnemar_exact_p,
    two_proportion_p,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("hits", "n", "low", "high"),
    [
        # Reference values: statsmodels proportion_confint(method="wilson"), alpha 0.05.
        (5, 10, 0.236593, 0.763407),
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (1, 20, 0.008887, 0.236130),
    ],
)
def test_wilson_interval_known_values(hits: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(hits, n) == pytest.approx((low, high), abs=2e-5)


def test_wilson_interval_of_nothing_is_everything() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_counts_only_changed_prompts() -> None:
    before = [False] * 6 + [True] * 4
    after = [True] * 6 + [True] * 4  # six prompts flipped to refusal, none back
    assert mcnemar_exact_p(before, after) == pytest.approx(2 / 64)
    mixed = [True] * 5 + [False] + [True] * 4
    flipped = [False] * 5 + [True] + [True] * 4  # five one way, one the other
    assert mcnemar_exact_p(mixed, flipped) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(before, before) == 1.0


def test_two_proportion_z_test() -> None:
    # 45/100 vs 60/100: z = 2.124, two-sided p = 0.0337
    assert two_proportion_p(45, 100, 60, 100) == pytest.approx(0.0337, abs=2e-4)
    assert two_proportion_p(0, 10, 0, 10) == 1.0


def test_cohen_kappa() -> None:
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == 0.5
    assert cohen_kappa([True, False], [True, False]) == 1.0
    assert cohen_kappa([True, True], [True, True]) is None  # agreement by chance alone
