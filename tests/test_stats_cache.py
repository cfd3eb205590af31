"""The solver's statistics cache on tiny Qwen2: a solve that differs only in solve settings
reads the stored statistics, runs no forward pass, and writes the same bytes as a solve
without the cache; anything that changes the statistics misses."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_solver import TINY_DATA, tiny_config

from vllm_safety_patch.solver.pipeline import solve
from vllm_safety_patch.solver.settings import SolveConfig

GROUPS = ["east-asian", "all"]
GROUP = ["zh", "ko", "sw"]  # tiny_config's "all"


def one_layer(**solver: object) -> SolveConfig:
    settings = dict(layers=[1], target="twin-residual", positions=2, sequential=True)
    settings.update(solver)
    return tiny_config(**settings)


@pytest.mark.parametrize("edit", ["output", "attention"])
def test_a_solve_only_change_skips_the_forward_and_matches_a_fresh_solve(
    tiny_qwen2: Path, tmp_path: Path, edit: str
) -> None:
    cache = tmp_path / "stats"
    first = solve(tiny_qwen2, one_layer(edit=edit), GROUPS, "tiny", stats_cache=cache)
    assert first.timings.forward_seconds > 0
    stored = sorted(cache.glob("*.pt"))
    assert len(stored) == 2  # one pass per group (sequential), one layer each

    changed = one_layer(
        edit=edit, rank=2, decision_weight=64.0, decision_weights={"zh": 256.0}, ridge=0.01
    )
    cached = solve(tiny_qwen2, changed, GROUPS, "tiny", stats_cache=cache)
    assert cached.timings.forward_seconds == 0
    assert sorted(cache.glob("*.pt")) == stored  # nothing new stored
    fresh = solve(tiny_qwen2, changed, GROUPS, "tiny")
    assert cached.blobs == fresh.blobs
    assert cached.blobs != first.blobs  # the change did change the update


def test_what_changes_the_statistics_misses(tiny_qwen2: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stats"
    solve(tiny_qwen2, one_layer(), ["african"], "tiny", stats_cache=cache)
    for other in (
        one_layer(neurons_per_layer=8),
        one_layer(positions=1),
        one_layer(target="twin"),
        SolveConfig(
            solver=one_layer().solver,
            data=TINY_DATA.model_copy(update={"multijail_ids": (0, 10)}),
            groups=one_layer().groups,
        ),
    ):
        result = solve(tiny_qwen2, other, ["african"], "tiny", stats_cache=cache)
        assert result.timings.forward_seconds > 0, other.solver
    assert len(list(cache.glob("*.pt"))) == 5


def test_a_later_layer_moved_by_an_earlier_update_keys_on_the_solve_settings_too(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "stats"
    solve(tiny_qwen2, tiny_config(), ["african"], "tiny", stats_cache=cache)
    again = solve(tiny_qwen2, tiny_config(), ["african"], "tiny", stats_cache=cache)
    assert again.timings.forward_seconds == 0
    # Layer 2 was collected on streams moved by layer 0's update: a new rank must recollect.
    changed = solve(tiny_qwen2, tiny_config(rank=2), ["african"], "tiny", stats_cache=cache)
    assert changed.timings.forward_seconds > 0
    assert changed.blobs == solve(tiny_qwen2, tiny_config(rank=2), ["african"], "tiny").blobs


def test_the_input_edit_does_not_use_the_cache(tiny_qwen2: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stats"
    solve(tiny_qwen2, tiny_config(edit="input", layers=[1]), ["african"], "tiny", stats_cache=cache)
    assert not cache.exists()


def test_an_unpaired_language_is_held_not_mapped_and_solves_from_the_cache(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "stats"
    paired = solve(tiny_qwen2, one_layer(), ["all"], "tiny", stats_cache=cache)
    unpaired = solve(
        tiny_qwen2, one_layer(unpaired_languages=["sw"]), ["all"], "tiny", stats_cache=cache
    )
    assert unpaired.timings.forward_seconds == 0  # a solve setting: read from the cache
    assert (
        unpaired.blobs
        == solve(tiny_qwen2, one_layer(unpaired_languages=["sw"]), ["all"], "tiny").blobs
    )
    assert unpaired.blobs != paired.blobs
    assert unpaired.deltas["all"].manifest.solver["unpaired_languages"] == ["sw"]
    with pytest.raises(ValueError, match="in no group"):
        SolveConfig(
            solver=one_layer(unpaired_languages=["th"]).solver,
            data=TINY_DATA,
            groups={"african": ["sw"]},
        )


def test_a_language_shift_removed_solves_from_the_cache_and_matches_a_fresh_solve(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "stats"
    data = TINY_DATA.model_copy(update={"everyday_rows": 4})  # the shift's English twins

    def config(**solver: object) -> SolveConfig:
        settings = one_layer().solver.model_copy(update=solver)
        return SolveConfig(solver=settings, data=data, groups={"all": GROUP})

    kept = solve(tiny_qwen2, config(), ["all"], "tiny", stats_cache=cache)
    removed = solve(
        tiny_qwen2, config(language_shift_removed=1.0), ["all"], "tiny", stats_cache=cache
    )
    assert removed.timings.forward_seconds == 0  # a solve setting: read from the cache
    fresh = solve(tiny_qwen2, config(language_shift_removed=1.0), ["all"], "tiny")
    assert removed.blobs == fresh.blobs
    assert removed.blobs != kept.blobs
    assert removed.deltas["all"].manifest.solver["language_shift_removed"] == 1.0
    with pytest.raises(ValueError, match="everyday_rows > 0"):  # refused before any forward
        SolveConfig(
            solver=config(language_shift_removed=1.0).solver, data=TINY_DATA, groups={"all": GROUP}
        )
