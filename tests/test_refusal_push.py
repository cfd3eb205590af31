"""refusal_push: the base model's refuse-vs-answer direction among harmful prompts, pooled
within languages, added to every harmful pair's target. The sums equal adding it row by row,
the pooling weighs each language by its verdicts, the residuals are each prompt's own despite
batching, and a solve reads the verdicts back from the statistics cache."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from test_solver import TINY_DATA
from test_stats_cache import GROUP, one_layer
from transformers import AutoModelForCausalLM, AutoTokenizer

import vllm_safety_patch.solver.refusal_push as refusal_push
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.solver.pipeline import solve
from vllm_safety_patch.solver.prompts import SolvePrompt
from vllm_safety_patch.solver.refusal_push import DecisionSums, collect_decisions, pooled_direction
from vllm_safety_patch.solver.settings import SolveConfig
from vllm_safety_patch.solver.statistics import Gram, Regression
from vllm_safety_patch.solver.stats_cache import CachedTables

P, K, D = 3, 4, 5  # positions, safety neurons, hidden size


def _tables(generator: torch.Generator) -> tuple[CachedTables, dict]:
    rows: dict = {}
    pair = {}
    for lang in ("zh", "th"):
        pair[lang] = Regression()
        rows[lang] = [
            (
                torch.randn(P, K, generator=generator, dtype=torch.float64),
                torch.randn(P, D, generator=generator, dtype=torch.float64),
            )
            for _ in range(5)
        ]
        for x, t in rows[lang]:
            pair[lang].add(x, t)
    benign = Gram(K)
    benign.add(torch.randn(8, K, generator=generator, dtype=torch.float64))
    tables = CachedTables(
        pair=pair,
        aligned={lang: Regression() for lang in pair},
        decision={},
        decision_twinned={},
        benign_gram=benign.gram,
        benign_tokens=benign.count,
    )
    return tables, rows


def test_the_push_added_to_the_sums_equals_adding_it_to_every_target() -> None:
    generator = torch.Generator().manual_seed(0)
    tables, rows = _tables(generator)
    push = torch.randn(P, D, generator=generator, dtype=torch.float64)
    expected = sum((t + push).T @ x for lang in rows for x, t in rows[lang])
    stats = tables.statistics(["zh", "th"], aligning=False, push=push)
    assert torch.allclose(stats.target_cross, expected)
    plain = tables.statistics(["zh", "th"], aligning=False)
    assert torch.equal(plain.pair_gram, stats.pair_gram)  # only the targets move
    unpaired = tables.statistics(["zh", "th"], aligning=False, unpaired=["th"], push=push)
    only_zh = sum((t + push).T @ x for x, t in rows["zh"])
    assert torch.allclose(unpaired.target_cross, only_zh)  # a language not mapped gets none


def _sums(refused: int, answered: int, refused_mean: float, answered_mean: float) -> DecisionSums:
    return DecisionSums(
        torch.full((P, D), refused_mean * refused, dtype=torch.float64),
        torch.full((P, D), answered_mean * answered, dtype=torch.float64),
        refused,
        answered,
    )


def test_the_pooled_direction_weighs_each_language_by_its_verdicts() -> None:
    sums = {
        "en": _sums(6, 6, 3.0, 1.0),  # difference 2, weight 3
        "zh": _sums(2, 2, 1.0, 0.0),  # difference 1, weight 1
        "bn": _sums(0, 12, 0.0, 5.0),  # refuses none: no difference to read, weight 0
    }
    direction = pooled_direction(sums)
    assert torch.allclose(direction, torch.full((P, D), (3 * 2 + 1 * 1) / 4, dtype=torch.float64))


def test_a_solve_with_no_refusal_and_answer_in_any_language_is_refused_with_the_fix() -> None:
    with pytest.raises(VSPError, match="refuses and others it answers") as error:
        pooled_direction({"en": _sums(4, 0, 1.0, 0.0), "zh": _sums(0, 4, 0.0, 1.0)})
    assert "en 4/4" in error.value.problem and "zh 0/4" in error.value.problem
    assert "refusal_push = 0" in error.value.fix


def _judge_every_other(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny model is random: no opening is a refusal, and its openings look alike. Call
    # every other prompt refused so both sides are seen; what is tested is the bookkeeping.
    calls = itertools.count()
    monkeypatch.setattr(refusal_push, "is_refusal", lambda opening, lang: next(calls) % 2 == 0)


def test_each_prompt_is_read_as_if_alone_despite_left_padding(
    tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _judge_every_other(monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    texts = ["a", "a much longer harmful request than the first", "mid length one"]
    prompts = [SolvePrompt(text, "zh", "harmful_lr", f"t:{i}") for i, text in enumerate(texts)]
    prompts.append(SolvePrompt("benign", "zh", "benign", None))  # not harmful: not read
    sums, verdicts = collect_decisions(model, tokenizer, prompts, [0, 2], 2, 8, 256)
    assert [v["pair"] for v in verdicts] == ["t:0", "t:1", "t:2"]
    for layer in (0, 2):
        expected = torch.zeros(2, model.config.hidden_size, dtype=torch.float64)
        for text in texts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            with torch.no_grad():
                states = model(input_ids=torch.tensor([list(ids)]), output_hidden_states=True)
            expected += states.hidden_states[layer + 1][0, -2:].double()
        table = sums[layer]["zh"]
        assert table.refused + table.answered == 3
        assert torch.allclose(table.refused_sum + table.answered_sum, expected, atol=1e-4)


def config(**solver: object) -> SolveConfig:
    return SolveConfig(
        solver=one_layer().solver.model_copy(update=solver), data=TINY_DATA, groups={"all": GROUP}
    )


def test_a_push_solve_stores_the_verdicts_and_other_strengths_read_them(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _judge_every_other(monkeypatch)
    cache = tmp_path / "stats"

    plain = solve(tiny_qwen2, config(), ["all"], "tiny", stats_cache=cache)
    pushed = solve(tiny_qwen2, config(refusal_push=1.0), ["all"], "tiny", stats_cache=cache)
    assert pushed.timings.forward_seconds > 0  # the verdicts: generated once
    assert pushed.blobs != plain.blobs
    assert pushed.deltas["all"].manifest.solver["refusal_push"] == 1.0

    def no_generation(*args, **kwargs):
        raise AssertionError("the verdicts were stored: nothing should be generated")

    monkeypatch.setattr("vllm_safety_patch.solver.pipeline.collect_decisions", no_generation)
    again = solve(tiny_qwen2, config(refusal_push=1.0), ["all"], "tiny", stats_cache=cache)
    assert again.timings.forward_seconds == 0
    assert again.blobs == pushed.blobs
    stronger = solve(tiny_qwen2, config(refusal_push=2.0), ["all"], "tiny", stats_cache=cache)
    assert stronger.blobs not in (pushed.blobs, plain.blobs)


def test_a_push_needs_residual_stream_targets() -> None:
    with pytest.raises(ValueError, match="needs target = 'twin-residual'"):
        SolveConfig(
            solver=one_layer(target="twin").solver.model_copy(update={"refusal_push": 1.0}),
            data=TINY_DATA,
            groups={"all": GROUP},
        )


def test_a_target_scale_scales_the_update_and_solves_from_the_cache(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "stats"

    plain = solve(tiny_qwen2, config(), ["all"], "tiny", stats_cache=cache)
    doubled = solve(tiny_qwen2, config(target_scale=2.0), ["all"], "tiny", stats_cache=cache)
    assert doubled.timings.forward_seconds == 0  # a solve setting
    (name,) = plain.deltas["all"].edits
    one = plain.deltas["all"].edits[name].update()
    two = doubled.deltas["all"].edits[name].update()
    assert torch.allclose(two, 2 * one, atol=1e-5 * float(one.abs().max()))
    assert doubled.deltas["all"].manifest.solver["target_scale"] == 2.0
