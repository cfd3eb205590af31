"""Effect measurement: job tables, scoring, and a real in-process run on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_delta
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_safety_patch.delta.io import read_delta
from vllm_safety_patch.eval.effect import (
    EffectSettings,
    effect_jobs,
    measure_effect,
    mgsm_correct,
    transformers_generator,
)
from vllm_safety_patch.eval.effect_table import effect_markdown, gap_closed

SMALL = EffectSettings(
    multijail_ids=(160, 163),
    harmless_val=2,
    mgsm_rows=(190, 192),
    everyday_rows=4,
    refusal_tokens=4,
    mgsm_tokens=4,
    batch_size=4,
)


@pytest.mark.parametrize(
    ("reply", "answer", "correct"),
    [
        ("So the answer is 42.", "42", True),
        ("She pays 2,125 dollars", "2,125", True),
        ("3 apples and then 7", "7", True),
        ("It is 7 or maybe 8", "7", False),
        ("no number here", "5", False),
        ("1.50", "1.5", True),
    ],
)
def test_mgsm_exact_match_uses_the_last_number(reply: str, answer: str, correct: bool) -> None:
    assert mgsm_correct(reply, answer) is correct


def test_jobs_cover_english_and_every_available_suite() -> None:
    jobs = {
        (job.metric, job.suite, job.lang): len(job.texts)
        for job in effect_jobs(["th", "jv"], SMALL)
    }
    assert jobs == {
        ("refusal_rate", "multijail", "en"): 3,
        ("over_refusal", "polyrefuse-harmless", "en"): 2,
        ("over_refusal", "everyday", "en"): 4,
        ("mgsm_accuracy", "mgsm", "en"): 2,
        ("refusal_rate", "multijail", "th"): 3,
        ("over_refusal", "polyrefuse-harmless", "th"): 2,
        ("over_refusal", "everyday", "th"): 4,
        ("mgsm_accuracy", "mgsm", "th"): 2,
        ("refusal_rate", "multijail", "jv"): 3,
        ("over_refusal", "everyday", "jv"): 4,  # the project's own set covers every language
    }


def test_everyday_rows_come_from_the_chosen_evaluation_split() -> None:
    from vllm_safety_patch.data import load_prompts

    for split in ("val", "test"):
        settings = SMALL.model_copy(update={"everyday_split": split})
        (job,) = [
            j for j in effect_jobs(["bn"], settings) if j.suite == "everyday" and j.lang == "bn"
        ]
        assert job.texts == [p.text for p in load_prompts("everyday", "bn", split)][:4]
    with pytest.raises(ValueError):
        EffectSettings(everyday_split="train")  # never measured on the rows the solver fits


def test_gap_closed() -> None:
    assert gap_closed(0.2, 0.6, 0.8) == pytest.approx(2 / 3)
    assert gap_closed(0.9, 0.9, 0.8) is None  # no gap to close


def test_measure_effect_in_process_restores_the_model(tiny_qwen2: Path, tmp_path: Path) -> None:
    _, blob = make_delta(tiny_qwen2, group="tiny", languages=("th",))
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(blob)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows, before, after = measure_effect(
        transformers_generator(model, tokenizer), path, ["th"], SMALL
    )
    assert {(row.metric, row.lang) for row in rows} == {
        (metric, lang)
        for metric in ("refusal_rate", "over_refusal", "mgsm_accuracy", "other_language")
        for lang in ("en", "th")
    }
    assert all(0.0 <= row.before <= 1.0 and 0.0 <= row.after <= 1.0 for row in rows)
    # other_language reads the everyday replies again: it has no generation of its own
    assert {row.suite for row in rows if row.metric == "other_language"} == {"everyday"}
    assert all(
        len(replies) == row.n
        for row in rows
        if row.metric != "other_language"
        for _, replies in [after[(row.metric, row.suite, row.lang)]]
    )
    for name, parameter in model.named_parameters():  # the delta was removed again
        assert torch.equal(parameter, original[name])
    delta = read_delta(path)
    stored = delta.manifest.model_copy(update={"measured_effect": rows})
    table = effect_markdown([type(delta)(stored, delta.edits, delta.sha256, delta.source)])
    assert "| tiny |" in table and "Refusal of held-out harmful prompts" in table
    # the everyday set and PolyRefuse are both over-refusal: each gets its own table
    assert "everyday benign requests" in table and "PolyRefuse harmless" in table
    assert "Wilson 95% interval" in table


def test_effect_cells_carry_wilson_intervals() -> None:
    from vllm_safety_patch.eval.effect_table import _cell

    assert _cell(0.02, 0.52, 50) == "2 → 52 [39-65]"
    assert _cell(0.0, 0.0, 20) == "0 → 0 [0-16]"


def test_measure_and_eval_share_held_out_rows_and_token_budgets() -> None:
    """One definition (eval.suites): `vsp measure`, `vsp eval` and their settings agree."""
    import inspect

    from vllm_safety_patch.cli import app
    from vllm_safety_patch.cli.eval import measure_command
    from vllm_safety_patch.eval.effect import EffectSettings
    from vllm_safety_patch.eval.harness import EvalSettings
    from vllm_safety_patch.eval.suites import MGSM_TOKENS, REFUSAL_TOKENS, held_out_rows

    effect, harness = EffectSettings(), EvalSettings()
    assert effect.mgsm_rows == held_out_rows("mgsm") and effect.multijail_ids == (160, 210)
    assert effect.refusal_tokens == harness.refusal_tokens == REFUSAL_TOKENS
    assert effect.mgsm_tokens == harness.mgsm_tokens == MGSM_TOKENS
    measure = inspect.signature(measure_command).parameters
    start, stop = held_out_rows("mgsm")
    assert measure["mgsm_rows"].default == f"{start}-{stop}"
    assert measure["refusal_tokens"].default == REFUSAL_TOKENS
    assert measure["mgsm_tokens"].default == MGSM_TOKENS
    eval_app = next(group.typer_instance for group in app.registered_groups if group.name == "eval")
    commands = [eval_app.registered_callback, *eval_app.registered_commands]
    budgets = [
        (parameters["refusal_tokens"].default, parameters["mgsm_tokens"].default)
        for parameters in (inspect.signature(c.callback).parameters for c in commands)
        if "refusal_tokens" in parameters
    ]
    assert budgets == [(REFUSAL_TOKENS, MGSM_TOKENS)]
