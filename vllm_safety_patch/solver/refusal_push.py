"""The base model's refuse-vs-answer direction among harmful prompts, per language, at an
edited layer's output: what ``refusal_push`` adds to the harmful pairs' targets.

Why: on this model the mid-layer residual stream already tells harmful from everyday
requests in every language, yet the model answers most of them; and the English twin's
residual, the shipped target, restores refusal mostly by switching the reply into English
(deltas/README.md, tenth session). Within one language, the harmful prompts the base model
refuses and those it answers differ in what decides the reply, not in the language: the mean
of the first minus the mean of the second, pooled over languages, is a push towards refusing
that carries no "English".

A prompt counts as refused when the refusal judge calls its greedy opening
(``OPENING_TOKENS`` tokens) a refusal; the residual is read at the chat template's closing
positions, where the solver's targets live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.judge.refusal import is_refusal
from vllm_safety_patch.solver.layerwise import chat_ids
from vllm_safety_patch.solver.prompts import SolvePrompt

# Enough for the openings the judge knows in every language ("作为一个AI助手，我不能" needs
# more than 8: a 4-token trial missed every Chinese refusal in `vsp localize`).
OPENING_TOKENS = 16
HARMFUL_ROLES = ("harmful_en", "harmful_lr")


@dataclass
class DecisionSums:
    """One language's harmful prompts at one layer, split by the base model's verdict."""

    refused_sum: torch.Tensor  # [p, d] float64: residuals of the refused prompts, summed
    answered_sum: torch.Tensor  # [p, d]
    refused: int = 0
    answered: int = 0

    def add(self, residual: torch.Tensor, refused: bool) -> None:
        if refused:
            self.refused_sum += residual.to(torch.float64)
            self.refused += 1
        else:
            self.answered_sum += residual.to(torch.float64)
            self.answered += 1

    def difference(self) -> torch.Tensor:
        """Mean refused minus mean answered residual (meaningless unless both are seen)."""
        return self.refused_sum / max(self.refused, 1) - self.answered_sum / max(self.answered, 1)

    def weight(self) -> float:
        """How much this language's difference counts in the pooled one: ``n_r n_a / n``,
        the inverse of the difference's variance up to a constant (zero if a side is empty)."""
        total = self.refused + self.answered
        return self.refused * self.answered / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "refused_sum": self.refused_sum,
            "answered_sum": self.answered_sum,
            "refused": self.refused,
            "answered": self.answered,
        }

    @classmethod
    def from_dict(cls, entry: dict) -> DecisionSums:
        return cls(
            entry["refused_sum"],
            entry["answered_sum"],
            int(entry["refused"]),
            int(entry["answered"]),
        )


def pooled_direction(sums: dict[str, DecisionSums]) -> torch.Tensor:
    """[p, d]: the languages' refused-minus-answered differences, each weighted by
    ``DecisionSums.weight``. Within-language differences carry no language identity."""
    weights = {lang: entry.weight() for lang, entry in sums.items()}
    total = sum(weights.values())
    if total <= 0:
        raise VSPError(
            "refusal_push needs harmful prompts the base model refuses and others it answers, "
            "in at least one language of the solve; the base model's verdicts were "
            + ", ".join(f"{lang} {e.refused}/{e.refused + e.answered}" for lang, e in sums.items()),
            "add pairs (more multijail_ids, or English in the group), or set refusal_push = 0",
        )
    return sum(weights[lang] * sums[lang].difference() for lang in sums if weights[lang]) / total


def _left_padded(
    tokenizer, texts: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [chat_ids(tokenizer, text, max_tokens) for text in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: the closing positions line up
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


@torch.no_grad()
def collect_decisions(
    model,
    tokenizer,
    prompts: Sequence[SolvePrompt],
    layers: Sequence[int],
    positions: int,
    batch_size: int,
    max_tokens: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[dict[int, dict[str, DecisionSums]], list[dict]]:
    """Per layer and language, the harmful prompts' residuals after that layer at the last
    ``positions`` prompt tokens, split by whether the greedy opening is a refusal; and one
    verdict record per prompt (language, pair, refused, opening) to read."""
    harmful = [prompt for prompt in prompts if prompt.role in HARMFUL_ROLES]
    hidden = model.config.hidden_size
    sums: dict[int, dict[str, DecisionSums]] = {layer: {} for layer in layers}
    verdicts: list[dict] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(harmful), batch_size):
        chunk = harmful[start : start + batch_size]
        input_ids, mask = _left_padded(tokenizer, [prompt.text for prompt in chunk], max_tokens)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=OPENING_TOKENS,
            do_sample=False,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=eos if eos is not None else 0,
        )
        prompt_states = out.hidden_states[0]  # the prompt's pass: embeddings, then each layer
        for row, prompt in enumerate(chunk):
            tokens = out.sequences[row, input_ids.shape[1] :].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            opening = tokenizer.decode(tokens, skip_special_tokens=True)
            refused = is_refusal(opening, prompt.lang)
            verdicts.append(
                {"lang": prompt.lang, "pair": prompt.pair, "refused": refused, "opening": opening}
            )
            for layer in layers:
                table = sums[layer].setdefault(
                    prompt.lang,
                    DecisionSums(
                        torch.zeros(positions, hidden, dtype=torch.float64),
                        torch.zeros(positions, hidden, dtype=torch.float64),
                    ),
                )
                table.add(prompt_states[layer + 1][row, -positions:], refused)
        progress(min(start + batch_size, len(harmful)), len(harmful))
    return sums, verdicts
