"""Two evaluation runs side by side (e.g. base vs patched): each figure's difference, and
whether it is significant.

Significance: when both runs scored the same prompts (the usual case, same suites, languages
and --n), outcomes are paired by prompt and tested with the exact McNemar test, which only
counts prompts whose outcome changed; otherwise the runs are independent samples and the
pooled two-proportion z-test is used. Significant means two-sided p < 0.05. (Overlapping
Wilson intervals are not used as the test: two rates can differ significantly while their
intervals overlap.)
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_safety_patch.delta.effect_review import percent
from vllm_safety_patch.eval.effect_table import gap_closed
from vllm_safety_patch.eval.judges import KEYWORDS
from vllm_safety_patch.eval.results import ATTACK_SUCCESS, EvalResults, Figure
from vllm_safety_patch.eval.scoring import REFUSAL_RATE
from vllm_safety_patch.eval.stats import mcnemar_exact_p, two_proportion_p

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """One figure in run A and run B."""

    a: Figure
    b: Figure
    p_value: float
    test: str  # "mcnemar" (paired) or "z-test" (independent)

    @property
    def difference(self) -> float:
        return self.b.rate - self.a.rate

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def compare_figures(a: Figure, b: Figure) -> Comparison:
    if a.ids == b.ids and a.ids:
        return Comparison(a, b, mcnemar_exact_p(a.outcomes, b.outcomes), "mcnemar")
    return Comparison(a, b, two_proportion_p(a.hits, a.n, b.hits, b.n), "z-test")


def compare_runs(a: EvalResults, b: EvalResults) -> list[Comparison]:
    """Every figure both runs have (attack success left out: it mirrors refusal)."""
    rows = []
    for figure in a.figures:
        if figure.metric == ATTACK_SUCCESS:
            continue
        other = b.find(figure.suite, figure.metric, figure.lang, figure.judge)
        if other is not None:
            rows.append(compare_figures(figure, other))
    return rows


def gaps_closed(
    before: EvalResults, after: EvalResults, judge: str = KEYWORDS
) -> dict[str, dict[str, float | None]]:
    """``{suite: {lang: share of the language's refusal gap to English closed}}``, measured
    against English before (None where there was no gap to close)."""
    shares: dict[str, dict[str, float | None]] = {}
    for figure in before.figures:
        if figure.metric != REFUSAL_RATE or figure.judge != judge or figure.lang == "en":
            continue
        english = before.find(figure.suite, REFUSAL_RATE, "en", judge)
        later = after.find(figure.suite, REFUSAL_RATE, figure.lang, judge)
        if english is None or later is None:
            continue
        shares.setdefault(figure.suite, {})[figure.lang] = gap_closed(
            figure.rate, later.rate, english.rate
        )
    return shares


def compare_markdown(label_a: str, label_b: str, a: EvalResults, b: EvalResults) -> str:
    rows = compare_runs(a, b)
    lines = [
        f"## {label_a} → {label_b}",
        "",
        "Significance: exact McNemar test on prompts scored in both runs (z-test for "
        f"unpaired runs), two-sided, * = p < {ALPHA}.",
        "",
        f"| suite | metric | judge | lang | n | {label_a} | {label_b} | change | p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        mark = " *" if row.significant else ""
        lines.append(
            f"| {row.a.suite} | {row.a.metric} | {row.a.judge} | {row.a.lang} | "
            f"{row.a.n}/{row.b.n} | {percent(row.a.rate)} | {percent(row.b.rate)} | "
            f"{100 * row.difference:+.0f} pp{mark} | {row.p_value:.3g} ({row.test}) |"
        )
    shares = gaps_closed(a, b)
    if shares:
        lines += ["", "Share of each language's refusal gap to English closed:", ""]
        for suite, by_lang in shares.items():
            cells = ", ".join(
                f"{lang} {'no gap' if share is None else percent(share)}"
                for lang, share in by_lang.items()
            )
            lines.append(f"- {suite}: {cells}")
    return "\n".join(lines) + "\n"
