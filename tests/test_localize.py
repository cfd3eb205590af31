"""Activation patching (vsp localize) and the refusal-direction target, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_safety_patch.solver.localize import (
    LocalizeRows,
    Site,
    _Patcher,
    decision_positions,
    localize,
    probe_accuracy,
)
from vllm_safety_patch.solver.localize_report import localization_tables, markdown_tables


@pytest.fixture(scope="module")
def tiny(tiny_qwen2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen2)


def test_decision_positions_are_the_template_closing_tokens(tiny) -> None:
    _, tokenizer = tiny
    # byte-level tiny tokenizer: "<|im_end|>" "\n" "<|im_start|>" then "assistant\n" bytes
    closing = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    assert decision_positions(tokenizer) == len(closing)


def test_unpatched_row_is_the_plain_greedy_reply(tiny) -> None:
    model, tokenizer = tiny
    patcher = _Patcher(model, tokenizer, [Site("resid", 0), Site("mlp", 1)], opening_tokens=4)
    try:
        english = patcher.capture("How do I bake bread?")
        openings = patcher.openings("Comment faire du pain ?", english)
        assert openings[0] == patcher.full_reply("Comment faire du pain ?", 4)
    finally:
        patcher.hooks.close()


def test_patching_the_last_layer_gives_the_english_opening_token(tiny) -> None:
    """The residual stream after the last layer decides the first token: patched in, X's
    first token is English's (the direction-only patch on the same layer need not be)."""
    model, tokenizer = tiny
    last = model.config.num_hidden_layers - 1
    patcher = _Patcher(model, tokenizer, [Site("resid", last)], opening_tokens=1)
    try:
        for english_text, other in [("Tell me a joke", "Raconte une blague"), ("abc", "xyz w")]:
            english = patcher.capture(english_text)
            openings = patcher.openings(other, english)
            assert openings[1] == patcher.full_reply(english_text, 1)
    finally:
        patcher.hooks.close()


def test_direction_patch_moves_only_along_the_direction(tiny) -> None:
    model, tokenizer = tiny
    d = model.config.hidden_size
    patcher = _Patcher(model, tokenizer, [Site("dir", 0)], opening_tokens=1)
    unit = torch.zeros(model.config.num_hidden_layers, d)
    unit[:, 0] = 1.0
    patcher.hooks.directions = unit
    seen = {}

    def grab(module, args, output):
        seen.setdefault("out", []).append(output[0] if isinstance(output, tuple) else output)

    handle = patcher.hooks.layers[0].register_forward_hook(grab)  # runs after the patch hook
    try:
        english = patcher.capture("hello there")
        seen.clear()
        patcher.openings("bonjour", english)
        suffix = seen["out"][1]  # [rows, K, d]: row 0 unpatched, row 1 direction-patched
        diff = suffix[1] - suffix[0]
        assert torch.allclose(diff[:, 1:], torch.zeros_like(diff[:, 1:]))
        assert torch.allclose(suffix[1][:, 0], english[("resid", 0)][:, 0])
    finally:
        handle.remove()
        patcher.hooks.close()


def test_probe_accuracy_separates_shifted_classes_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(40, 30, generator=generator)
    b = torch.randn(40, 30, generator=generator)
    assert probe_accuracy(a + 2.0, b) > 0.95
    assert probe_accuracy(a, b) < 0.75


def test_localize_tables_cover_every_site_and_language(tiny) -> None:
    model, tokenizer = tiny
    rows = LocalizeRows(
        harmful_ids=range(0, 3),
        everyday_ids=range(0, 2),
        probe_harmful_ids=range(0, 8),
        probe_everyday_ids=range(96, 104),
    )
    result = localize(model, tokenizer, ["zh", "sw"], rows, [0, 2], opening_tokens=2)
    data = result.to_json()
    assert data["sites"] == [
        f"{k}:{layer}" for k in ("resid", "dir", "dirs", "attn", "mlp") for layer in (0, 2)
    ]
    assert len(data["languages"]["zh"]["probe_accuracy"]) == model.config.num_hidden_layers
    tables = localization_tables(data)
    assert len(tables) == 5 * 2 + 3
    assert "| site | zh | sw |" in markdown_tables(data)


def test_refusal_direction_target_writes_along_one_direction(tiny_qwen2: Path) -> None:
    """With target = 'refusal-direction' every pair's target lies on one residual direction,
    so the solved update's output space is that one direction (numerical rank 1)."""
    from vllm_safety_patch.solver.pipeline import solve
    from vllm_safety_patch.solver.settings import DataSettings, SolveConfig, SolverSettings

    config = SolveConfig(
        solver=SolverSettings(
            layers=[1], neurons_per_layer=16, rank=4, batch_size=32, target="refusal-direction"
        ),
        data=DataSettings(
            multijail_ids=(0, 12), english_harmless=12, benign_per_language=4, mgsm_rows=(0, 4)
        ),
        groups={"all": ["zh", "sw"]},
    )
    result = solve(tiny_qwen2, config, ["all"], "tiny")
    edit = result.deltas["all"].edits["model.layers.1.mlp.down_proj.weight"]
    values = torch.linalg.svdvals(edit.update().double())
    assert values[0] > 0 and float(values[1] / values[0]) < 1e-5
    assert result.deltas["all"].manifest.solver["target"] == "refusal-direction"


def test_a_saved_result_renders_as_markdown(tmp_path: Path, capsys) -> None:
    import json

    from vllm_safety_patch.solver.localize_report import main

    counts = {"refused": 1, "total": 2}
    result = {
        "layers": 2,
        "sites": ["resid:1"],
        "languages": {
            "zh": {
                "harmful": {"none": counts, "resid:1": {"refused": 2, "total": 2}},
                "benign": {"none": {"refused": 0, "total": 2}, "resid:1": counts},
                "opening_agreement": {"refused": 2, "total": 2},
                "probe_accuracy": [0.5, 0.9],
                "direction_share": [0.1, 0.8],
                "samples": [],
            }
        },
        "english_refused": counts,
        "settings": {},
        "seconds": 1.0,
    }
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    main([str(path)])
    out = capsys.readouterr().out
    assert "| resid:1 | 100 |" in out and "| resid:1 | 50 |" in out and "| 1 | 0.90 |" in out
