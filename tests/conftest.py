"""Shared fixtures: tiny random-weight models built from a config, and small valid deltas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.io import Delta, TensorEdit
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


def random_edit(
    checkpoint: Checkpoint, name: str, axis: str, k: int, rank: int, seed: int
) -> TensorEdit:
    """A random sparse low-rank edit of tensor ``name``."""
    generator = torch.Generator().manual_seed(seed)
    out_dim, in_dim = checkpoint.shape(name)
    neuron_dim = in_dim if axis == "columns" else out_dim
    neurons = torch.randperm(neuron_dim, generator=generator)[:k]
    if axis == "columns":
        left, right = (
            torch.randn(out_dim, rank, generator=generator),
            torch.randn(rank, k, generator=generator),
        )
    else:
        left, right = (
            torch.randn(k, rank, generator=generator),
            torch.randn(rank, in_dim, generator=generator),
        )
    return TensorEdit.build(name, (out_dim, in_dim), axis, neurons, left * 0.1, right * 0.1)


def make_delta(
    model_dir: Path,
    group: str = "test-group",
    languages: tuple[str, ...] = ("th", "bn"),
    layers: tuple[int, ...] = (0, 2),
    k: int = 8,
    rank: int = 2,
    seed: int = 0,
) -> tuple[Delta, bytes]:
    """A valid delta editing down_proj columns and up_proj rows of ``layers``."""
    checkpoint = Checkpoint(model_dir)
    edits = []
    for offset, layer in enumerate(layers):
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        up = f"model.layers.{layer}.mlp.up_proj.weight"
        edits.append(random_edit(checkpoint, down, "columns", k, rank, seed + 2 * offset))
        edits.append(random_edit(checkpoint, up, "rows", k, rank, seed + 2 * offset + 1))
    base = checkpoint.get_many([edit.name for edit in edits])
    return build_delta(
        group=group,
        languages=languages,
        model_id=model_dir.name,
        config=checkpoint.config,
        base_tensors=base,
        edits=edits,
        solver={"method": "random-test"},
    )
