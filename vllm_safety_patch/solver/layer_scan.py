"""Which layers to edit: per-layer separation of English harmful vs harmless prompts, and how
far each language's harmful prompts sit from their English twins on those neurons.

One base-model forward pass over the solve config's prompts, no edit. For every decoder layer:

- separation: Cohen's d of the ``neurons_per_layer`` best neurons (mean and best), the
  statistic the solver ranks neurons by (solver/neurons.py): where refusal is decided;
- per language, the *twin gap*: the mean distance, on those neurons, between a low-resource
  harmful prompt's activation and its English twin's, relative to the English activation's
  norm. A layer with strong separation and a large gap is where an edit has work to do.

``vsp solve --scan`` prints the table and suggests the layers with the strongest separation,
at least ``spacing`` apart (edits in adjacent layers mostly repeat each other).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_safety_patch.solver.layerwise import LayerwiseForward, TokenBatch, tokenize_chats
from vllm_safety_patch.solver.neurons import ClassMoments, separation_scores, top_neurons
from vllm_safety_patch.solver.prompts import SolveData, SolvePrompt
from vllm_safety_patch.solver.settings import SolverSettings


@dataclass
class LayerScan:
    layer: int
    mean_d: float  # mean Cohen's d of the top neurons
    best_d: float
    twin_gap: dict[str, float] = field(default_factory=dict)  # language -> relative distance


class _LayerObserver:
    """One layer's English class moments and last-token activations of every prompt."""

    def __init__(self, english: list[SolvePrompt], harmful_lr: list[SolvePrompt]) -> None:
        self.english, self.harmful_lr = english, harmful_lr
        self.harmful: ClassMoments | None = None
        self.harmless: ClassMoments | None = None
        self.twins: dict[str, torch.Tensor] = {}  # pair -> English activation
        self.others: dict[int, torch.Tensor] = {}  # harmful_lr index -> activation

    def on_english(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        last = batch.last_rows(inputs)[:, -1].double()
        if self.harmful is None:
            self.harmful, self.harmless = ClassMoments(last.shape[1]), ClassMoments(last.shape[1])
        for row, item in enumerate(batch.items):
            prompt = self.english[item]
            if prompt.role == "harmful_en":
                self.harmful.add(last[row : row + 1])
                self.twins[prompt.pair] = last[row]
            else:
                self.harmless.add(last[row : row + 1])

    def on_other(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        last = batch.last_rows(inputs)[:, -1].double()
        for row, item in enumerate(batch.items):
            self.others[item] = last[row]

    def summary(self, layer: int, count: int) -> LayerScan:
        scores = separation_scores(self.harmful, self.harmless)
        neurons = top_neurons(scores, count)
        gaps: dict[str, list[float]] = {}
        for item, activation in self.others.items():
            prompt = self.harmful_lr[item]
            twin = self.twins.get(prompt.pair)
            if twin is None:
                continue
            twin = twin[neurons]
            distance = float((activation[neurons] - twin).norm() / (twin.norm() + 1e-9))
            gaps.setdefault(prompt.lang, []).append(distance)
        return LayerScan(
            layer=layer,
            mean_d=float(scores[neurons].mean()),
            best_d=float(scores[neurons].max()),
            twin_gap={lang: sum(v) / len(v) for lang, v in sorted(gaps.items())},
        )


@torch.no_grad()
def scan_layers(model, tokenizer, data: SolveData, settings: SolverSettings) -> list[LayerScan]:
    """One row per decoder layer (base weights, last prompt token)."""
    harmful_lr = [p for p in data.others if p.role == "harmful_lr"]
    size, limit = settings.batch_size, settings.max_prompt_tokens
    english_batches = tokenize_chats(tokenizer, [p.text for p in data.english], size, limit)
    other_batches = tokenize_chats(tokenizer, [p.text for p in harmful_lr], size, limit)
    english_run = LayerwiseForward(model, english_batches)
    other_run = LayerwiseForward(model, other_batches)
    english_run.start()
    other_run.start()
    rows = []
    for layer in range(len(english_run.layers)):
        observer = _LayerObserver(data.english, harmful_lr)
        english_run.run_layer(observer.on_english)
        other_run.run_layer(observer.on_other)
        rows.append(observer.summary(layer, settings.neurons_per_layer))
    return rows


def suggest_layers(rows: list[LayerScan], count: int, spacing: int) -> list[int]:
    """The ``count`` layers with the highest mean separation, pairwise ``spacing`` apart."""
    chosen: list[int] = []
    for row in sorted(rows, key=lambda r: (-r.mean_d, r.layer)):
        if all(abs(row.layer - other) >= spacing for other in chosen):
            chosen.append(row.layer)
        if len(chosen) == count:
            break
    return sorted(chosen)
