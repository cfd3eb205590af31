"""Taking each language's mean benign shift to English out of its harmful pairs' targets,
from running sums: the statistics equal those of targets shifted row by row."""

from __future__ import annotations

import pytest
import torch

from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.solver.statistics import Gram, Regression
from vllm_safety_patch.solver.stats_cache import CachedTables

P, K, D = 3, 4, 5  # positions, safety neurons, hidden size


def _tables(generator: torch.Generator, everyday: bool = True) -> tuple[CachedTables, dict]:
    rows: dict = {"pair": {}, "aligned": {}}
    pair, aligned = {}, {}
    for lang in ("zh", "th"):
        pair[lang], aligned[lang] = Regression(), Regression()
        rows["pair"][lang] = [
            (
                torch.randn(P, K, generator=generator, dtype=torch.float64),
                torch.randn(P, D, generator=generator, dtype=torch.float64),
            )
            for _ in range(6)
        ]
        for x, t in rows["pair"][lang]:
            pair[lang].add(x, t)
        rows["aligned"][lang] = [
            (
                torch.randn(P, K, generator=generator, dtype=torch.float64),
                1.0 + torch.randn(P, D, generator=generator, dtype=torch.float64),
            )
            for _ in range(4 if everyday else 0)
        ]
        for x, t in rows["aligned"][lang]:
            aligned[lang].add(x, t)
    benign = Gram(K)
    benign.add(torch.randn(8, K, generator=generator, dtype=torch.float64))
    tables = CachedTables(
        pair=pair,
        aligned=aligned,
        decision={},
        decision_twinned={},
        benign_gram=benign.gram,
        benign_tokens=benign.count,
    )
    return tables, rows


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_the_shift_taken_out_of_the_sums_equals_shifting_every_target(share: float) -> None:
    tables, rows = _tables(torch.Generator().manual_seed(0))
    expected = torch.zeros(D, K, dtype=torch.float64)
    for lang in ("zh", "th"):
        mean_shift = torch.stack([t for _, t in rows["aligned"][lang]]).mean(0)  # [P, D]
        for x, t in rows["pair"][lang]:
            expected += (t - share * mean_shift).T @ x
    stats = tables.statistics(["zh", "th"], aligning=False, language_shift=share)
    assert torch.allclose(stats.target_cross, expected)
    plain = tables.statistics(["zh", "th"], aligning=False)
    assert not torch.allclose(plain.target_cross, expected)
    assert torch.equal(plain.pair_gram, stats.pair_gram)  # only the targets move


def test_a_language_without_everyday_twins_is_refused_with_the_fix() -> None:
    tables, _ = _tables(torch.Generator().manual_seed(1), everyday=False)
    with pytest.raises(VSPError, match="everyday prompts with English twins") as error:
        tables.statistics(["zh"], aligning=False, language_shift=1.0)
    assert "language_shift_removed = 0" in error.value.fix
    tables.statistics(["zh"], aligning=False)  # without the setting nothing is needed


def test_a_per_language_share_replaces_the_common_one() -> None:
    tables, rows = _tables(torch.Generator().manual_seed(2))
    shares = {"zh": 1.0, "th": 0.0}  # th keeps its English target
    expected = torch.zeros(D, K, dtype=torch.float64)
    for lang, share in shares.items():
        mean_shift = torch.stack([t for _, t in rows["aligned"][lang]]).mean(0)
        for x, t in rows["pair"][lang]:
            expected += (t - share * mean_shift).T @ x
    stats = tables.statistics(
        ["zh", "th"], aligning=False, language_shift=1.0, language_shifts={"th": 0.0}
    )
    assert torch.allclose(stats.target_cross, expected)
