"""Running sums the solver streams per layer: Gram matrices and regression cross terms."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.solver.closed_form import LayerStatistics


class Gram:
    """Running ``X X^T`` and row count of one language's rows on the safety neurons."""

    def __init__(self, k: int) -> None:
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        self.gram += x.T @ x
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)

    @staticmethod
    def merge(grams: list[Gram]) -> Gram | None:
        if not grams:
            return None
        merged = Gram(grams[0].gram.shape[0])
        for gram in grams:
            merged.gram += gram.gram
            merged.count += gram.count
        return merged


class Regression:
    """Running ``X X^T``, ``T X^T`` and count of (activation, target change) rows, and the
    per-position sums of both (rows come in prompts of ``p`` positions), from which a solve
    can shift every target by a per-position vector without another forward pass."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.x_sum: torch.Tensor | None = None  # [p, k]
        self.t_sum: torch.Tensor | None = None  # [p, d]
        self.count = 0

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """One prompt's rows: ``x`` [p, k], ``target`` [p, d]."""
        x, target = x.to(torch.float64), target.to(torch.float64)
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.cross = torch.zeros(target.shape[1], x.shape[1], dtype=torch.float64)
            self.x_sum, self.t_sum = torch.zeros_like(x), torch.zeros_like(target)
        self.gram += x.T @ x
        self.cross += target.T @ x
        if self.x_sum is not None and self.x_sum.shape == x.shape:
            self.x_sum += x
            self.t_sum += target
        else:  # prompts of another length: per-position sums mean nothing
            self.x_sum = self.t_sum = None
        self.count += x.shape[0]

    def prompts(self) -> int:
        return self.count // self.x_sum.shape[0] if self.x_sum is not None else 0

    @staticmethod
    def merge(parts: list[Regression]) -> Regression:
        merged = Regression()
        for part in parts:
            if part.gram is None:
                continue
            if merged.gram is None:
                merged.gram, merged.cross = part.gram.clone(), part.cross.clone()
            else:
                merged.gram += part.gram
                merged.cross += part.cross
            merged.count += part.count
        # Per-position sums are per language (a solve reads them from each language's
        # table), so a merged table keeps none.
        merged.x_sum = merged.t_sum = None
        return merged


class PairTables:
    """Per-language tables one layer's collector fills, and the group statistics built from
    them. Subclasses set every attribute below in ``__init__``."""

    pair: dict[str, Regression]  # harmful -> English twin
    aligned: dict[str, Regression]  # benign -> English twin
    decision: dict[str, Gram]  # benign decision positions (no twin)
    decision_twinned: dict[str, Gram]  # benign decision positions (everyday, with a twin)
    benign_gram: torch.Tensor | None
    benign_tokens: int

    def statistics(
        self,
        languages: list[str],
        aligning: bool,
        target_map: torch.Tensor | None = None,
        unpaired: Collection[str] = (),
        language_shift: float = 0.0,
        push: torch.Tensor | None = None,
        language_shifts: Mapping[str, float] | None = None,
        scale: float = 1.0,
    ) -> LayerStatistics:
        """The group's statistics. English and each of ``languages`` get their own term in the
        decision-position penalty; a language's benign prompts with twins are mapped instead
        of held when ``aligning``. ``target_map`` (linear) turns stored target rows into the
        solved ones: ``T X^T`` becomes ``target_map @ T X^T``. ``language_shift`` (0-1) takes
        that share of each language's mean benign shift to English (its everyday prompts'
        twin minus own, per position) out of its harmful pairs' targets (``language_shifts``:
        per-language shares that replace it); ``scale`` then
        multiplies them. ``push`` ([p, d], already scaled) is added to every harmful pair's
        target at each position."""
        paired = [lang for lang in languages if lang not in unpaired]
        pair = Regression.merge([self.pair[lang] for lang in paired])
        shifts = {lang: (language_shifts or {}).get(lang, language_shift) for lang in paired}
        if any(shifts.values()) and pair.cross is not None:
            pair.cross = pair.cross - sum(
                share * self._language_shift_cross(lang) for lang, share in shifts.items() if share
            )
        if scale != 1.0 and pair.cross is not None:
            pair.cross = scale * pair.cross
        if push is not None and pair.cross is not None:
            pair.cross = pair.cross + sum(self._push_cross(lang, push) for lang in paired)
        # Each language's part of the pair term (English, paired with none, gets the mean).
        total = max(float(torch.trace(pair.gram)), 1e-12) if pair.gram is not None else 1.0
        shares = {
            lang: float(torch.trace(self.pair[lang].gram)) / total
            for lang in paired
            if self.pair[lang].gram is not None
        }
        # English and the unpaired languages (held, not mapped) get the mean share.
        for lang in ["en", *unpaired]:
            shares[lang] = 1.0 / max(len(languages), 1)
        decision, decision_shares, decision_languages = [], [], []
        for lang in ["en", *languages]:
            grams = [self.decision.get(lang)]
            if lang == "en" or not aligning:
                grams.append(self.decision_twinned.get(lang))
            merged = Gram.merge([gram for gram in grams if gram is not None])
            if merged is not None:
                decision.append(merged.mean())
                decision_shares.append(shares.get(lang, 0.0))
                decision_languages.append(lang)
        aligned = Regression.merge([self.aligned[lang] for lang in languages])

        def mapped(cross: torch.Tensor | None) -> torch.Tensor | None:
            if cross is None or target_map is None:
                return cross
            return target_map.to(cross.dtype) @ cross

        return LayerStatistics(
            pair_gram=pair.gram,
            target_cross=mapped(pair.cross),
            benign_gram=self.benign_gram,
            pairs=pair.count,
            benign_tokens=self.benign_tokens,
            decision_grams=tuple(decision),
            decision_shares=tuple(decision_shares),
            decision_languages=tuple(decision_languages),
            aligned_gram=aligned.gram,
            aligned_cross=mapped(aligned.cross),
            aligned=aligned.count,
        )

    def _push_cross(self, lang: str, push: torch.Tensor) -> torch.Tensor:
        """``sum_i push_pos(i) x_i^T`` over ``lang``'s harmful pairs: what adding ``push`` to
        every pair target adds to ``T X^T``."""
        pair = self.pair[lang]
        if pair.x_sum is None:
            raise VSPError(
                f"refusal_push needs per-position sums of {lang}'s pairs (statistics "
                "collected by this version, prompts at least `positions` tokens long)",
                "solve again without --stats-cache, or set refusal_push = 0",
            )
        return push.to(pair.x_sum.dtype).T @ pair.x_sum  # [d, k]

    def _language_shift_cross(self, lang: str) -> torch.Tensor:
        """``sum_i m_pos(i) x_i^T`` over ``lang``'s harmful pairs, with ``m_pos`` the mean
        target of its benign prompts with twins at that position: what subtracting ``m`` from
        every pair target subtracts from ``T X^T``."""
        pair, benign = self.pair[lang], self.aligned.get(lang)
        if benign is None or benign.prompts() == 0 or pair.x_sum is None:
            raise VSPError(
                f"language_shift_removed needs {lang}'s everyday prompts with English twins "
                "and per-position sums (statistics collected by this version)",
                "keep [data] everyday_rows > 0, or set language_shift_removed = 0",
            )
        mean_shift = benign.t_sum / benign.prompts()  # [p, d]
        return mean_shift.T @ pair.x_sum  # [d, k]
