"""``vsp solve``: one sequential pass over the prompts, one closed-form solve per layer.

For each edited layer, in order:
1. run the layer over the English batches (harmful twins, harmless) and score neurons;
2. run it over the other batches, streaming per-language sufficient statistics of the pairs
   (``X X^T`` and ``T X^T`` on the safety neurons) and the benign Gram matrix;
3. solve every group's update from its languages' statistics;
4. add the joint update's effect to every batch's residual stream, so the next layer is
   solved on activations the earlier edits already moved (``sequential``).
No activation outlives its layer: only sums, Gram matrices and the residual stream are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.io import Delta, TensorEdit
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.solver.closed_form import LayerStatistics, solve_layer
from vllm_safety_patch.solver.layerwise import (
    LayerwiseForward,
    TokenBatch,
    decoder_layers,
    tokenize_chats,
)
from vllm_safety_patch.solver.neurons import ClassMoments, separation_scores, top_neurons
from vllm_safety_patch.solver.prompts import SolveData, SolvePrompt, gather_solve_data
from vllm_safety_patch.solver.settings import SolveConfig

JOINT_GROUP = "all"
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class SolveTimings:
    forward_seconds: float = 0.0  # running layers, hooks included (sums, Gram matrices)
    solve_seconds: float = 0.0  # Cholesky, SVD, propagation
    total_seconds: float = 0.0


@dataclass
class SolveResult:
    deltas: dict[str, Delta]
    blobs: dict[str, bytes]
    neurons: dict[int, torch.Tensor]
    timings: SolveTimings
    singular_values: dict[str, dict[int, list[float]]] = field(default_factory=dict)


def _real_rows(batch: TokenBatch, activations: torch.Tensor) -> torch.Tensor:
    """All real (non-padding) token rows of ``activations`` [B, L, n] -> [tokens, n]."""
    return activations[batch.attention_mask.bool()]


def _last_rows(batch: TokenBatch, activations: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count, n]: each prompt's last ``count`` real tokens."""
    positions = batch.last_positions(count)
    return activations[torch.arange(activations.shape[0])[:, None], positions]


class _LayerCollector:
    """Streams one layer's statistics from down_proj inputs."""

    def __init__(
        self,
        english: list[SolvePrompt],
        others: list[SolvePrompt],
        english_batches: list[TokenBatch],
        weight: torch.Tensor,
        positions: int,
        languages: list[str],
    ) -> None:
        self.english, self.others = english, others
        self.english_batches = {id(batch): batch for batch in english_batches}
        self.weight = weight  # down_proj weight, float32 [d, n]
        self.positions = positions
        width = weight.shape[1]
        self.harmful = ClassMoments(width)
        self.harmless = ClassMoments(width)
        self.english_stash: dict[int, torch.Tensor] = {}  # batch id -> full [B, L, n]
        self.twin_outputs: dict[str, torch.Tensor] = {}  # pair -> W a_en [positions, d]
        self.neurons: torch.Tensor | None = None
        self.pair_gram = {lang: None for lang in languages}
        self.target_cross = {lang: None for lang in languages}
        self.pair_count = dict.fromkeys(languages, 0)
        self.benign_gram: torch.Tensor | None = None
        self.benign_tokens = 0
        self.other_stash: dict[int, torch.Tensor] = {}  # batch id -> [B, L, k]

    def observe_english(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        inputs = inputs.float()
        self.english_stash[id(batch)] = inputs
        last = _last_rows(batch, inputs, self.positions)  # [B, p, n]
        for row, item in enumerate(batch.items):
            prompt = self.english[item]
            if prompt.role == "harmful_en":
                self.harmful.add(last[row])
                self.twin_outputs[prompt.pair] = last[row] @ self.weight.T
            else:
                self.harmless.add(last[row])

    def choose_neurons(self, count: int) -> torch.Tensor:
        self.neurons = top_neurons(separation_scores(self.harmful, self.harmless), count)
        k = self.neurons.numel()
        self.benign_gram = torch.zeros(k, k, dtype=torch.float64)
        for lang in self.pair_gram:
            self.pair_gram[lang] = torch.zeros(k, k, dtype=torch.float64)
            self.target_cross[lang] = torch.zeros(self.weight.shape[0], k, dtype=torch.float64)
        # English prompts are benign for the constraint: the edit must leave them as they are.
        # (they were stashed in full because the neurons were not known yet)
        for stash_id, inputs in self.english_stash.items():
            batch = self.english_batches[stash_id]
            rows = _real_rows(batch, inputs)[:, self.neurons].to(torch.float64)
            self.benign_gram += rows.T @ rows
            self.benign_tokens += rows.shape[0]
        return self.neurons

    def observe_other(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        inputs = inputs.float()
        selected = inputs[..., self.neurons]
        self.other_stash[id(batch)] = selected
        last = _last_rows(batch, inputs, self.positions)  # [B, p, n]
        for row, item in enumerate(batch.items):
            prompt = self.others[item]
            if prompt.role == "harmful_lr":
                twin = self.twin_outputs.get(prompt.pair)
                if twin is None:
                    continue  # its English twin was not loaded (should not happen)
                x = last[row][:, self.neurons].to(torch.float64)  # [p, k]
                target = (twin - last[row] @ self.weight.T).to(torch.float64)  # [p, d]
                self.pair_gram[prompt.lang] += x.T @ x
                self.target_cross[prompt.lang] += target.T @ x
                self.pair_count[prompt.lang] += x.shape[0]
            else:
                real = selected[row, : int(batch.lengths[row])].to(torch.float64)
                self.benign_gram += real.T @ real
                self.benign_tokens += real.shape[0]

    def statistics(self, languages: list[str]) -> LayerStatistics:
        return LayerStatistics(
            pair_gram=sum(self.pair_gram[lang] for lang in languages),
            target_cross=sum(self.target_cross[lang] for lang in languages),
            benign_gram=self.benign_gram,
            pairs=sum(self.pair_count[lang] for lang in languages),
            benign_tokens=self.benign_tokens,
        )


def solve(
    model_dir: str | Path,
    config: SolveConfig,
    groups: list[str],
    model_id: str,
    progress: Progress = _no_progress,
    data: SolveData | None = None,
) -> SolveResult:
    """Solve one delta per group in ``groups`` (names from ``config.groups``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    unknown = [name for name in groups if name not in config.groups]
    if unknown:
        raise VSPError(
            f"unknown group(s) {', '.join(unknown)}",
            f"use groups defined in the config: {', '.join(sorted(config.groups))}",
        )
    settings = config.solver
    languages = sorted({lang for name in groups for lang in config.groups[name]})
    # The joint update propagates between layers; it is 'all' if asked for, else the union.
    joint_languages = (
        config.groups.get(JOINT_GROUP, languages) if JOINT_GROUP in groups else languages
    )
    data = data or gather_solve_data(languages, config.data)

    checkpoint = Checkpoint(model_dir)
    dtype = getattr(torch, settings.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    num_layers = len(decoder_layers(model))  # also refuses models without a gated MLP
    bad_layers = [layer for layer in settings.layers if layer >= num_layers]
    if bad_layers:
        raise VSPError(
            f"layers {bad_layers} do not exist (the model has {num_layers})",
            f"choose layers in 0..{num_layers - 1} in the solver config",
        )
    english_batches = tokenize_chats(
        tokenizer, [p.text for p in data.english], settings.batch_size, settings.max_prompt_tokens
    )
    other_batches = tokenize_chats(
        tokenizer, [p.text for p in data.others], settings.batch_size, settings.max_prompt_tokens
    )
    english_run = LayerwiseForward(model, english_batches)
    other_run = LayerwiseForward(model, other_batches)
    timings = SolveTimings()
    tick = time.perf_counter()
    english_run.start()
    other_run.start()
    timings.forward_seconds += time.perf_counter() - tick

    edits: dict[str, list[TensorEdit]] = {name: [] for name in groups}
    chosen: dict[int, torch.Tensor] = {}
    spectra: dict[str, dict[int, list[float]]] = {name: {} for name in groups}
    last_layer = max(settings.layers)
    for layer in range(last_layer + 1):
        progress("layers", layer, last_layer + 1)
        if layer not in settings.layers:
            tick = time.perf_counter()
            english_run.run_layer()
            other_run.run_layer()
            timings.forward_seconds += time.perf_counter() - tick
            continue
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        weight = model.get_parameter(name).detach().float()
        collector = _LayerCollector(
            data.english, data.others, english_batches, weight, settings.positions, languages
        )
        tick = time.perf_counter()
        english_run.run_layer(collector.observe_english)
        neurons = collector.choose_neurons(settings.neurons_per_layer)
        other_run.run_layer(collector.observe_other)
        timings.forward_seconds += time.perf_counter() - tick  # includes hook time

        tick = time.perf_counter()
        chosen[layer] = neurons
        updates = {}
        for group in groups:
            group_languages = config.groups[group]
            stats = collector.statistics(group_languages)
            if stats.pairs == 0:
                raise VSPError(f"group '{group}' has no paired data", "add languages with pairs")
            update = solve_layer(
                stats,
                rank=settings.rank,
                constraint=settings.constraint,
                benign_weight=settings.benign_weight,
                ridge=settings.ridge,
                null_space_energy=settings.null_space_energy,
            )
            updates[group] = update
            spectra[group][layer] = [round(float(v), 6) for v in update.singular_values[:64]]
            edits[group].append(
                TensorEdit.build(
                    name,
                    tuple(weight.shape),
                    "columns",
                    neurons,
                    update.B.float(),
                    update.A.float(),
                )
            )
        if settings.sequential:
            joint = updates.get(JOINT_GROUP)
            if joint is None:
                joint = solve_layer(
                    collector.statistics(joint_languages),
                    rank=settings.rank,
                    constraint=settings.constraint,
                    benign_weight=settings.benign_weight,
                    ridge=settings.ridge,
                    null_space_energy=settings.null_space_energy,
                )
            update_t = joint.dense().float().T  # [k, d]
            for batch in english_batches:
                stash = collector.english_stash[id(batch)][..., neurons]
                batch.hidden = batch.hidden + (stash @ update_t).to(batch.hidden.dtype)
            for batch in other_batches:
                stash = collector.other_stash[id(batch)]
                batch.hidden = batch.hidden + (stash @ update_t).to(batch.hidden.dtype)
        timings.solve_seconds += time.perf_counter() - tick
    progress("layers", last_layer + 1, last_layer + 1)

    names = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in settings.layers]
    base_tensors = checkpoint.get_many(names)
    deltas, blobs = {}, {}
    for group in groups:
        delta, blob = build_delta(
            group=group,
            languages=config.groups[group],
            model_id=model_id,
            config=checkpoint.config,
            base_tensors=base_tensors,
            edits=edits[group],
            solver={
                "method": "sequential closed-form reduced-rank ridge on down_proj columns",
                **settings.model_dump(mode="json"),
                "data": config.data.model_dump(mode="json"),
            },
            data_digests=data.digests,
        )
        deltas[group], blobs[group] = delta, blob
    timings.total_seconds = time.perf_counter() - started
    return SolveResult(deltas, blobs, chosen, timings, spectra)
