"""Fingerprints: stable for the same weights and architecture, different for anything else."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import (
    ARCHITECTURE_KEYS,
    architecture_config,
    checkpoint_fingerprint,
    editable_tensor_names,
    fingerprint,
    short,
    tensor_digest,
)
from vllm_safety_patch.models.tiny import build_tiny_model

HEX = set("0123456789abcdef")


@pytest.fixture(scope="module")
def qwen(tiny_qwen2: Path) -> Checkpoint:
    return Checkpoint(tiny_qwen2)


@pytest.fixture(scope="module")
def mlp(qwen: Checkpoint) -> dict[str, torch.Tensor]:
    """The tensors a delta may edit, as stored."""
    return qwen.get_many(editable_tensor_names(qwen.tensor_names()))


def test_fingerprint_is_64_lowercase_hex(qwen: Checkpoint, mlp) -> None:
    value = fingerprint(qwen.config, mlp)
    assert len(value) == 64 and set(value) <= HEX
    assert short(value) == value[:12]


def test_same_inputs_same_fingerprint(qwen: Checkpoint, mlp) -> None:
    cloned = {name: tensor.clone() for name, tensor in mlp.items()}  # other storage, same bytes
    assert fingerprint(qwen.config, mlp) == fingerprint(copy.deepcopy(qwen.config), cloned)


def test_dict_order_does_not_matter(qwen: Checkpoint, mlp) -> None:
    reversed_tensors = dict(reversed(list(mlp.items())))
    reversed_config = dict(reversed(list(qwen.config.items())))
    assert list(reversed_tensors) != list(mlp)
    assert fingerprint(reversed_config, reversed_tensors) == fingerprint(qwen.config, mlp)


def test_non_contiguous_view_hashes_like_its_contiguous_copy() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(tensor.t()) == tensor_digest(tensor.t().contiguous())


def test_two_builds_of_the_same_tiny_model_have_the_same_fingerprint(
    tiny_qwen2: Path, qwen: Checkpoint, tmp_path: Path
) -> None:
    # tiny_qwen2 is built with seed 0; a second, separate build must give the same bytes.
    again = Checkpoint(build_tiny_model(tmp_path / "again", "qwen2", seed=0))
    names = qwen.tensor_names()
    assert again.tensor_names() == names
    assert checkpoint_fingerprint(again, names) == checkpoint_fingerprint(qwen, names)


def test_checkpoint_fingerprint_equals_fingerprint_of_loaded_tensors(
    tiny_qwen2: Path, qwen: Checkpoint
) -> None:
    names = qwen.tensor_names()
    loaded = load_file(tiny_qwen2 / "model.safetensors")
    assert checkpoint_fingerprint(qwen, names) == fingerprint(qwen.config, loaded)
    subset = editable_tensor_names(names)[:3]
    assert checkpoint_fingerprint(qwen, subset) == fingerprint(
        qwen.config, {name: loaded[name] for name in subset}
    )


def test_qwen2_and_llama_tiny_models_differ(tiny_qwen2: Path, tiny_llama: Path) -> None:
    qwen, llama = Checkpoint(tiny_qwen2), Checkpoint(tiny_llama)
    names = editable_tensor_names(qwen.tensor_names())
    assert names == editable_tensor_names(llama.tensor_names())  # same names and shapes
    assert checkpoint_fingerprint(qwen, names) != checkpoint_fingerprint(llama, names)
    # The architecture alone tells them apart: llama's config over qwen's very tensors.
    tensors = qwen.get_many(names)
    assert fingerprint(qwen.config, tensors) != fingerprint(llama.config, tensors)


# --- what changes the fingerprint ----------------------------------------------------------------


@pytest.mark.parametrize("index", [(0, 0), (63, 191), (17, 100)])
def test_changing_one_element_changes_the_fingerprint(qwen: Checkpoint, mlp, index) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    changed = dict(mlp)
    changed[name] = mlp[name].clone()
    changed[name][index] = torch.nextafter(changed[name][index], torch.tensor(1.0))  # one ulp
    assert fingerprint(qwen.config, changed) != fingerprint(qwen.config, mlp)


def test_negative_zero_is_a_different_weight() -> None:
    # Bytes, not values: -0.0 == 0.0 but is another conversion of the weights.
    zero = torch.zeros(4)
    assert tensor_digest(zero) != tensor_digest(-zero)


def test_dtype_changes_the_fingerprint(qwen: Checkpoint) -> None:
    values = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -8.0]])  # exact in both dtypes
    as_bf16 = values.to(torch.bfloat16)
    assert torch.equal(as_bf16.float(), values)
    assert fingerprint(qwen.config, {"w": values}) != fingerprint(qwen.config, {"w": as_bf16})


def test_shape_changes_the_fingerprint(qwen: Checkpoint) -> None:
    values = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(values.reshape(2, 3)) != tensor_digest(values.reshape(3, 2))


def test_tensor_name_and_tensor_set_change_the_fingerprint(qwen: Checkpoint, mlp) -> None:
    first, second = sorted(mlp)[:2]
    base = fingerprint(qwen.config, {first: mlp[first]})
    assert fingerprint(qwen.config, {second: mlp[first]}) != base
    assert fingerprint(qwen.config, {first: mlp[first], second: mlp[second]}) != base


ARCHITECTURE_CHANGES = [
    ("architectures", ["LlamaForCausalLM"]),
    ("model_type", "llama"),
    ("hidden_size", 128),
    ("intermediate_size", 384),
    ("num_hidden_layers", 4),
    ("num_attention_heads", 8),
    ("num_key_value_heads", 4),
    ("head_dim", 32),  # absent in the tiny config: adding it is a change
    ("vocab_size", 300),
    ("hidden_act", "gelu"),
    ("rms_norm_eps", 1e-5),
    ("rope_theta", 1e6),
    ("rope_parameters", {"rope_theta": 1e6, "rope_type": "default"}),
    ("tie_word_embeddings", True),
]


def test_the_change_table_covers_every_architecture_key() -> None:
    assert sorted(key for key, _ in ARCHITECTURE_CHANGES) == sorted(ARCHITECTURE_KEYS)


@pytest.mark.parametrize(("key", "value"), ARCHITECTURE_CHANGES)
def test_an_architecture_key_changes_the_fingerprint(qwen: Checkpoint, mlp, key, value) -> None:
    config = copy.deepcopy(qwen.config)
    assert config.get(key) != value
    config[key] = value
    assert fingerprint(config, mlp) != fingerprint(qwen.config, mlp)


def test_dropping_an_architecture_key_changes_the_fingerprint(qwen: Checkpoint, mlp) -> None:
    config = {k: v for k, v in qwen.config.items() if k != "hidden_size"}
    assert fingerprint(config, mlp) != fingerprint(qwen.config, mlp)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("transformers_version", "9.9.9"),
        ("torch_dtype", "bfloat16"),
        ("dtype", "bfloat16"),
        ("use_cache", False),
        ("bos_token_id", 1),
        ("eos_token_id", [2, 3]),
        ("max_position_embeddings", 32768),
        ("_name_or_path", "/somewhere/else"),
        ("quantization_config", {"quant_method": "none"}),
    ],
)
def test_a_run_time_key_does_not_change_the_fingerprint(qwen: Checkpoint, mlp, key, value) -> None:
    config = copy.deepcopy(qwen.config)
    config[key] = value
    assert fingerprint(config, mlp) == fingerprint(qwen.config, mlp)
    assert architecture_config(config) == architecture_config(qwen.config)


def test_architecture_config_holds_exactly_the_architecture_keys(qwen: Checkpoint) -> None:
    subset = architecture_config(qwen.config)
    assert list(subset) == list(ARCHITECTURE_KEYS)
    assert subset["architectures"] == ["Qwen2ForCausalLM"]
    assert subset["head_dim"] is None  # absent keys are recorded as None


def test_editable_tensor_names_are_the_mlp_projections(qwen: Checkpoint) -> None:
    names = editable_tensor_names(qwen.tensor_names())
    assert len(names) == 3 * 3  # gate, up, down for each of the 3 layers
    assert names == sorted(names)
    assert all(name.split(".")[-2] in {"gate_proj", "up_proj", "down_proj"} for name in names)
