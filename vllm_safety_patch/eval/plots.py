"""PNG plots of one run or two (before/after): refusal per language, the share of each
language's gap to English closed, and the benign figures (over-refusal, MGSM accuracy).
Error bars are the 95% Wilson intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402

from vllm_safety_patch.eval.compare import gaps_closed  # noqa: E402
from vllm_safety_patch.eval.judges import KEYWORDS  # noqa: E402
from vllm_safety_patch.eval.results import EvalResults  # noqa: E402
from vllm_safety_patch.eval.scoring import (  # noqa: E402
    MGSM_ACCURACY,
    OVER_REFUSAL,
    REFUSAL_RATE,
)

Run = tuple[str, EvalResults]  # (label, results)
COLOURS = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c")
PANEL_TITLES = {
    REFUSAL_RATE: "refusal of harmful prompts",
    OVER_REFUSAL: "over-refusal of benign prompts",
    MGSM_ACCURACY: "MGSM accuracy",
}


def _panels(runs: Sequence[Run], metrics: Sequence[str]) -> list[tuple[str, str]]:
    """(metric, suite) pairs any run has, in first-seen order."""
    found: dict[tuple[str, str], None] = {}
    for _, results in runs:
        for figure in results.figures:
            if figure.metric in metrics and figure.judge == KEYWORDS:
                found[(figure.metric, figure.suite)] = None
    return sorted(found, key=lambda pair: metrics.index(pair[0]))


def _bars(axis, runs: Sequence[Run], metric: str, suite: str) -> None:
    langs: list[str] = []
    for _, results in runs:
        for figure in results.figures:
            if (figure.metric, figure.suite, figure.judge) == (metric, suite, KEYWORDS):
                if figure.lang not in langs:
                    langs.append(figure.lang)
    width = 0.8 / len(runs)
    for r, (label, results) in enumerate(runs):
        xs, heights, errors = [], [], ([], [])
        for x, lang in enumerate(langs):
            figure = results.find(suite, metric, lang, KEYWORDS)
            if figure is None:
                continue
            xs.append(x + (r - (len(runs) - 1) / 2) * width)
            heights.append(100 * figure.rate)
            errors[0].append(100 * (figure.rate - figure.ci_low))
            errors[1].append(100 * (figure.ci_high - figure.rate))
        bars = axis.bar(
            xs,
            heights,
            width,
            yerr=errors,
            capsize=2,
            label=label,
            color=COLOURS[r % len(COLOURS)] if len(runs) > 1 else COLOURS[1],
        )
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)  # 0% bars are otherwise blank
    n = sorted(
        {f.n for _, res in runs for f in res.figures if (f.metric, f.suite) == (metric, suite)}
    )
    axis.set_title(f"{suite}: {PANEL_TITLES[metric]} (n={'/'.join(map(str, n))})", fontsize=9)
    axis.set_xticks(range(len(langs)), langs)
    axis.set_ylim(0, 135)  # room above 100% for the value labels and the legend
    axis.set_yticks(range(0, 101, 20))
    axis.set_ylabel("%")
    axis.grid(axis="y", alpha=0.3)


def _grid(runs: Sequence[Run], metrics: Sequence[str], path: Path, title: str) -> Path | None:
    panels = _panels(runs, metrics)
    if not panels:
        return None
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for axis, (metric, suite) in zip(axes[:, 0], panels, strict=True):
        _bars(axis, runs, metric, suite)
    axes[0, 0].legend(fontsize=8, loc="upper left", ncol=len(runs), frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_refusal(runs: Sequence[Run], path: Path) -> Path | None:
    """Per-language refusal of harmful prompts, one bar per run, one panel per suite."""
    return _grid(runs, [REFUSAL_RATE], path, "Refusal of harmful prompts (keyword judge)")


def plot_benign(runs: Sequence[Run], path: Path) -> Path | None:
    """Over-refusal of benign prompts and MGSM accuracy per language, one bar per run."""
    return _grid(runs, [OVER_REFUSAL, MGSM_ACCURACY], path, "Benign prompts: utility")


def plot_gap_closed(before: Run, after: Run, path: Path) -> Path | None:
    """Share of each language's refusal gap to English closed from ``before`` to ``after``."""
    shares = gaps_closed(before[1], after[1])
    if not shares:
        return None
    figure, axes = plt.subplots(len(shares), 1, figsize=(9, 2.8 * len(shares)), squeeze=False)
    for axis, (suite, by_lang) in zip(axes[:, 0], shares.items(), strict=True):
        langs = list(by_lang)
        values = [0.0 if by_lang[lang] is None else 100 * by_lang[lang] for lang in langs]
        bars = axis.bar(range(len(langs)), values, color=COLOURS[1])
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        for bar, lang in zip(bars, langs, strict=True):
            if by_lang[lang] is None:
                axis.annotate(
                    "no gap",
                    (bar.get_x() + bar.get_width() / 2, 0),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        axis.axhline(100, color="black", linewidth=0.8, linestyle="--")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(langs)), langs)
        axis.set_ylabel("% of gap closed")
        axis.set_title(f"{suite}: {before[0]} → {after[0]}", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("Share of each language's refusal gap to English closed", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_all(runs: Sequence[Run], folder: Path) -> list[Path]:
    """Every plot that the runs allow (the gap plot needs a before and an after)."""
    made = [plot_refusal(runs, folder / "refusal.png"), plot_benign(runs, folder / "benign.png")]
    if len(runs) == 2:
        made.append(plot_gap_closed(runs[0], runs[1], folder / "gap_closed.png"))
    return [path for path in made if path is not None]
