"""The paper's input-side edit (edit = 'input'): rows S of gate_proj/up_proj, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from solver_helpers import last_token_input

from vllm_safety_patch.delta.io import read_delta, write_delta
from vllm_safety_patch.delta.merge import edit_weight
from vllm_safety_patch.solver.neurons import ClassMoments, appendix_b_neurons
from vllm_safety_patch.solver.pipeline import solve
from vllm_safety_patch.solver.settings import DataSettings, SolveConfig, SolverSettings

DATA = DataSettings(
    multijail_ids=(0, 12), english_harmless=12, benign_per_language=4, mgsm_rows=(0, 4)
)


def input_config(**solver: object) -> SolveConfig:
    settings = dict(
        layers=[1], neurons_per_layer=16, rank=4, batch_size=32, edit="input", positions=1
    )
    settings.update(solver)
    return SolveConfig(
        solver=SolverSettings(**settings), data=DATA, groups={"all": ["zh", "sw"], "sw": ["sw"]}
    )


def _mlp_input(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    return last_token_input(model, tokenizer, text, model.model.layers[layer].mlp)


@pytest.mark.parametrize("architecture", ["tiny_qwen2", "tiny_llama"])
def test_input_edit_moves_pre_activations_on_s_towards_english_twins(
    architecture: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.solver.prompts import gather_solve_data

    model_dir: Path = request.getfixturevalue(architecture)
    result = solve(model_dir, input_config(), ["all"], "tiny")
    delta = result.deltas["all"]
    assert sorted(delta.edits) == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    assert delta.manifest.solver["edit"] == "input"
    assert "Algorithm 1" in delta.manifest.solver["method"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = gather_solve_data(["zh", "sw"], DATA)
    twins = {p.pair: p.text for p in data.english if p.role == "harmful_en"}
    for name, edit in delta.edits.items():
        assert edit.spec.axis == "rows" and edit.spec.shape == (192, 64)
        weight = model.get_parameter(name).detach().double()[edit.neurons]
        before = after = 0.0
        for prompt in (p for p in data.others if p.role == "harmful_lr"):
            low = _mlp_input(model, tokenizer, prompt.text, 1)
            english = _mlp_input(model, tokenizer, twins[prompt.pair], 1)
            target = weight @ (english - low)  # the twin's pre-activation on S minus its own
            before += float(target.norm() ** 2)
            after += float((target - edit.update().double() @ low).norm() ** 2)
        assert after < before, name


def test_input_edit_round_trips_and_merges(tiny_qwen2: Path, tmp_path: Path) -> None:
    from vllm_safety_patch.models.checkpoint import Checkpoint

    result = solve(tiny_qwen2, input_config(input_matrices=["up_proj"]), ["sw"], "tiny")
    delta = result.deltas["sw"]
    path = write_delta(tmp_path / "sw.safetensors", delta.manifest, delta.edits)
    again = read_delta(path)
    ((name, edit),) = again.edits.items()
    base = Checkpoint(tiny_qwen2).get_many([name])[name].float()
    merged = edit_weight(base, [edit])
    changed = (merged - base).abs().sum(dim=1) > 0
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(edit.neurons.tolist())


def test_input_edit_is_deterministic(tiny_qwen2: Path) -> None:
    first = solve(tiny_qwen2, input_config(layers=[0, 2]), ["sw"], "tiny").blobs["sw"]
    second = solve(tiny_qwen2, input_config(layers=[0, 2]), ["sw"], "tiny").blobs["sw"]
    assert first == second


def test_appendix_b_selection_unites_z_score_and_cohens_d() -> None:
    harmful, harmless = ClassMoments(50), ClassMoments(50)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200, 50, generator=generator)
    shift = torch.zeros(50)
    shift[3] = 3.0  # large mean gap: both criteria
    shift[7] = 1.5  # d > 1
    shift[9] = -3.0  # harmless > harmful: one-sided, never chosen
    harmful.add(base[:100] + shift)
    harmless.add(base[100:])
    chosen = appendix_b_neurons(harmful, harmless, cap=50).tolist()
    assert 3 in chosen and 7 in chosen and 9 not in chosen
    assert appendix_b_neurons(harmful, harmless, cap=1).tolist() == [3]
