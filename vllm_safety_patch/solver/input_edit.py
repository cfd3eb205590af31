"""The paper's edit (Algorithm 1): rows S of gate_proj / up_proj, read from the MLP input.

For a layer's safety neurons S and an edited matrix W (``gate_proj`` or ``up_proj``), with
``x`` the MLP input (the normed residual stream, the layer's ``X_low``) at the decision
positions of a low-resource harmful prompt and ``x_en`` its English twin's, the target change
of W's pre-activation on S is ``D = (x_en - x) W_S^T``: the twin's pre-activation pattern on
S minus the prompt's own, the nonlinearity dropped (the paper's first-order approximation).
The update ``dW`` (rows S, rank r) minimises ``||X dW^T - D||^2 + gamma ||X_safe dW^T||^2 +
lambda ||dW||^2`` in closed form (closed_form.solve_layer, with the same benign terms as the
output-side edit). Statistics are kept in the input space (``x x^T`` and ``(x_en - x) x^T``,
hidden x hidden), so they do not depend on S and each matrix's target is a product at the end.
"""

from __future__ import annotations

import torch

from vllm_safety_patch.solver.layerwise import TokenBatch
from vllm_safety_patch.solver.neurons import (
    ClassMoments,
    appendix_b_neurons,
    separation_scores,
    top_neurons,
)
from vllm_safety_patch.solver.prompts import SolvePrompt
from vllm_safety_patch.solver.statistics import Gram, PairTables, Regression


class InputCollector(PairTables):
    """Streams one layer's input-side statistics from MLP inputs."""

    def __init__(
        self,
        english: list[SolvePrompt],
        others: list[SolvePrompt],
        mlp: torch.nn.Module,
        positions: int,
        languages: list[str],
    ) -> None:
        self.english, self.others = english, others
        self.mlp = mlp
        self.positions = positions
        hidden = mlp.gate_proj.weight.shape[1]
        width = mlp.gate_proj.weight.shape[0]
        self.harmful_en, self.harmless_en = ClassMoments(width), ClassMoments(width)
        self.twins: dict[str, torch.Tensor] = {}  # pair -> English MLP input [p, hidden]
        self.pair = {lang: Regression() for lang in languages}
        self.aligned = {lang: Regression() for lang in languages}
        self.decision: dict[str, Gram] = {}
        self.decision_twinned: dict[str, Gram] = {}
        self.benign_gram = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.benign_tokens = 0
        self.hidden = hidden

    def _gram(self, table: dict[str, Gram], lang: str) -> Gram:
        if lang not in table:
            table[lang] = Gram(self.hidden)
        return table[lang]

    def _benign_rows(self, batch: TokenBatch, inputs: torch.Tensor, row: int) -> None:
        real = inputs[row, : int(batch.lengths[row])].to(torch.float64)
        self.benign_gram += real.T @ real
        self.benign_tokens += real.shape[0]

    @torch.no_grad()
    def observe_english(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        inputs = inputs.float()
        last = batch.last_rows(inputs, self.positions)  # [B, p, hidden]
        # The neurons' activations (down_proj's input) score them, as the output side does.
        activations = self.mlp.act_fn(self.mlp.gate_proj(last)) * self.mlp.up_proj(last)
        for row, item in enumerate(batch.items):
            prompt = self.english[item]
            if prompt.pair is not None:
                self.twins[prompt.pair] = last[row]
            harmful = prompt.role == "harmful_en"
            (self.harmful_en if harmful else self.harmless_en).add(activations[row])
            # English prompts are benign for the constraint: the edit must leave them alone.
            self._benign_rows(batch, inputs, row)
            self._gram(self.decision, "en").add(last[row])

    def observe_other(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        inputs = inputs.float()
        last = batch.last_rows(inputs, self.positions)
        for row, item in enumerate(batch.items):
            prompt = self.others[item]
            x = last[row]  # [p, hidden]
            if prompt.role in ("harmful_lr", "benign_lr"):
                twin = self.twins.get(prompt.pair)
                if twin is None:
                    continue
                table = self.pair if prompt.role == "harmful_lr" else self.aligned
                table[prompt.lang].add(x, twin - x)
                if prompt.role == "harmful_lr":
                    continue
            self._benign_rows(batch, inputs, row)
            table = self.decision_twinned if prompt.role == "benign_lr" else self.decision
            self._gram(table, prompt.lang).add(x)

    def choose_neurons(self, count: int, selection: str) -> torch.Tensor:
        if selection == "appendix-b":
            return appendix_b_neurons(self.harmful_en, self.harmless_en, count)
        return top_neurons(separation_scores(self.harmful_en, self.harmless_en), count)


def apply_rows(module: torch.nn.Linear, neurons: torch.Tensor, update: torch.Tensor) -> None:
    """Add ``update`` [k, in] to rows ``neurons`` of ``module``'s weight, in place."""
    with torch.no_grad():
        module.weight[neurons] += update.to(module.weight.dtype)
