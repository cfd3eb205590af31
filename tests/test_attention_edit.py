"""The attention-output edit (edit = 'attention'): columns of self_attn.o_proj, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from solver_helpers import last_token_input

from vllm_safety_patch.delta.export_peft import lora_factors, write_peft_adapter
from vllm_safety_patch.delta.io import read_delta, write_delta
from vllm_safety_patch.delta.merge import edit_weight
from vllm_safety_patch.solver.pipeline import solve
from vllm_safety_patch.solver.settings import DataSettings, SolveConfig, SolverSettings

DATA = DataSettings(
    multijail_ids=(0, 12), english_harmless=12, benign_per_language=4, mgsm_rows=(0, 4)
)
O_PROJ = "model.layers.{}.self_attn.o_proj.weight"


def attention_config(**solver: object) -> SolveConfig:
    settings = dict(
        layers=[1], neurons_per_layer=64, rank=4, batch_size=32, edit="attention", positions=1
    )
    settings.update(solver)
    return SolveConfig(
        solver=SolverSettings(**settings), data=DATA, groups={"all": ["zh", "sw"], "sw": ["sw"]}
    )


@pytest.mark.parametrize("architecture", ["tiny_qwen2", "tiny_llama"])
def test_attention_edit_moves_attention_output_towards_english_twins(
    architecture: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.solver.prompts import gather_solve_data

    model_dir: Path = request.getfixturevalue(architecture)
    result = solve(model_dir, attention_config(), ["all"], "tiny")
    delta = result.deltas["all"]
    assert sorted(delta.edits) == [O_PROJ.format(1)]
    assert delta.manifest.solver["edit"] == "attention"
    assert "o_proj" in delta.manifest.solver["method"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    o_proj = model.model.layers[1].self_attn.o_proj
    data = gather_solve_data(["zh", "sw"], DATA)
    twins = {p.pair: p.text for p in data.english if p.role == "harmful_en"}
    edit = delta.edits[O_PROJ.format(1)]
    assert edit.spec.axis == "columns" and edit.spec.shape == tuple(o_proj.weight.shape)
    weight = o_proj.weight.detach().double()
    before = after = 0.0
    for prompt in (p for p in data.others if p.role == "harmful_lr"):
        low = last_token_input(model, tokenizer, prompt.text, o_proj)
        english = last_token_input(model, tokenizer, twins[prompt.pair], o_proj)
        target = weight @ (english - low)  # the twin's attention output minus its own
        before += float(target.norm() ** 2)
        after += float((target - edit.update().double() @ low[edit.neurons]).norm() ** 2)
    assert after < before


def test_attention_edit_round_trips_merges_and_exports_as_lora(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    from vllm_safety_patch.models.checkpoint import Checkpoint

    result = solve(tiny_qwen2, attention_config(neurons_per_layer=16), ["sw"], "tiny")
    delta = result.deltas["sw"]
    path = write_delta(tmp_path / "sw.safetensors", delta.manifest, delta.edits)
    again = read_delta(path)
    ((name, edit),) = again.edits.items()
    base = Checkpoint(tiny_qwen2).get_many([name])[name].float()
    merged = edit_weight(base, [edit])
    changed = (merged - base).abs().sum(dim=0) > 0
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(edit.neurons.tolist())
    lora_a, lora_b = lora_factors(again)[name.removesuffix(".weight")]
    assert torch.allclose(lora_b @ lora_a, merged - base, atol=1e-6)
    adapter = write_peft_adapter(again, str(tiny_qwen2), tmp_path / "peft")
    assert '"o_proj"' in (adapter / "adapter_config.json").read_text()


def test_attention_edit_in_later_layers_is_solved_on_moved_streams(tiny_qwen2: Path) -> None:
    sequential = solve(tiny_qwen2, attention_config(layers=[0, 2]), ["sw"], "tiny")
    independent = solve(
        tiny_qwen2, attention_config(layers=[0, 2], sequential=False), ["sw"], "tiny"
    )
    first = sequential.deltas["sw"].edits[O_PROJ.format(0)].update()
    assert torch.equal(first, independent.deltas["sw"].edits[O_PROJ.format(0)].update())
    later = sequential.deltas["sw"].edits[O_PROJ.format(2)].update()
    assert not torch.allclose(later, independent.deltas["sw"].edits[O_PROJ.format(2)].update())
    again = solve(tiny_qwen2, attention_config(layers=[0, 2]), ["sw"], "tiny")
    assert again.blobs["sw"] == sequential.blobs["sw"]  # deterministic


def test_refusal_direction_target_needs_the_output_edit() -> None:
    with pytest.raises(ValueError, match="refusal-direction"):
        SolverSettings(edit="attention", target="refusal-direction")


@pytest.mark.parametrize(
    ("edit", "module_of"),
    [
        ("attention", lambda layer: layer.self_attn.o_proj),
        ("output", lambda layer: layer.mlp.down_proj),
    ],
)
def test_twin_residual_target_moves_the_residual_stream_towards_the_twins(
    tiny_qwen2: Path, edit: str, module_of
) -> None:
    """target = 'twin-residual': the update maps each harmful prompt's residual stream just
    after the edited matrix's output onto its English twin's (for down_proj, the output of
    the layer), closing more of that gap than it leaves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.solver.prompts import gather_solve_data

    config = attention_config(edit=edit, target="twin-residual", rank=8)
    delta = solve(tiny_qwen2, config, ["all"], "tiny").deltas["all"]
    assert delta.manifest.solver["target"] == "twin-residual"
    plain = solve(tiny_qwen2, attention_config(edit=edit, rank=8), ["all"], "tiny").deltas["all"]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    layer = model.model.layers[1]
    module = module_of(layer)
    # The residual stream right after the edited output: the layer's output for down_proj;
    # for o_proj, what post_attention_layernorm reads.
    after = layer.post_attention_layernorm if edit == "attention" else model.model.layers[2]
    data = gather_solve_data(["zh", "sw"], DATA)
    twins = {p.pair: p.text for p in data.english if p.role == "harmful_en"}
    (edit_,) = delta.edits.values()
    (plain_edit,) = plain.edits.values()
    before = left = left_plain = 0.0
    for prompt in (p for p in data.others if p.role == "harmful_lr"):
        gap = last_token_input(model, tokenizer, twins[prompt.pair], after)
        gap = gap - last_token_input(model, tokenizer, prompt.text, after)
        low = last_token_input(model, tokenizer, prompt.text, module)
        before += float(gap.norm() ** 2)
        left += float((gap - edit_.update().double() @ low[edit_.neurons]).norm() ** 2)
        moved = plain_edit.update().double() @ low[plain_edit.neurons]
        left_plain += float((gap - moved).norm() ** 2)
    assert left < before and left < left_plain  # the 'twin' target leaves more of this gap


def test_twin_residual_target_is_refused_for_the_input_edit() -> None:
    with pytest.raises(ValueError, match="twin-residual"):
        SolverSettings(edit="input", target="twin-residual")


def test_twin_residual_target_refuses_layers_that_normalise_the_attention_output() -> None:
    """Gemma-style layers add a normed attention output: the stream post_attention_layernorm
    reads is not the residual stream, so the target would be wrong; say so before solving."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer

    from vllm_safety_patch.errors import VSPError
    from vllm_safety_patch.solver.pipeline import _LayerCollector, _watch_residual

    config = Gemma2Config(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, num_hidden_layers=1, vocab_size=32,
    )  # fmt: skip
    layer = Gemma2DecoderLayer(config, 0)
    collector = _LayerCollector([], [], [], torch.zeros(16, 32), 1, ["sw"])
    settings = SolverSettings(target="twin-residual")
    with pytest.raises(VSPError, match="post_attention_layernorm"):
        _watch_residual(collector, layer, False, settings)
