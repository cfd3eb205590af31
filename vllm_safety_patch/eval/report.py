"""``report.md``: one run's figures as tables, each rate with its 95% Wilson interval and n."""

from __future__ import annotations

import json

from vllm_safety_patch.delta.effect_review import percent
from vllm_safety_patch.eval.results import ATTACK_SUCCESS, EvalResults, Figure
from vllm_safety_patch.eval.scoring import MGSM_ACCURACY, OVER_REFUSAL, REFUSAL_RATE

TITLES = {
    REFUSAL_RATE: "Harmful prompts: refusal rate and attack success rate",
    OVER_REFUSAL: "Benign prompts: over-refusal",
    MGSM_ACCURACY: "MGSM: exact-match accuracy of the final number",
}


def rate_cell(figure: Figure | None) -> str:
    """ "62% [48–74]" (rate and 95% Wilson interval, in percent)."""
    if figure is None:
        return ""
    return f"{percent(figure.rate)} [{100 * figure.ci_low:.0f}–{100 * figure.ci_high:.0f}]"


def _section(results: EvalResults, metric: str) -> list[str]:
    figures = [f for f in results.figures if f.metric == metric]
    if not figures:
        return []
    lines = [f"## {TITLES[metric]}", ""]
    judges = list(dict.fromkeys(f.judge for f in figures))
    for suite in dict.fromkeys(f.suite for f in figures):
        mine = [f for f in figures if f.suite == suite and f.judge == judges[0]]
        lines += [f"### {suite} ({mine[0].split})", ""]
        header = ["lang", "n"]
        for judge in judges:
            header.append(f"{'refusal' if metric == REFUSAL_RATE else 'rate'} ({judge})")
            if metric == REFUSAL_RATE:
                header.append(f"attack success ({judge})")
        if metric == REFUSAL_RATE:
            header.append("gap to en")
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        english = results.find(suite, metric, "en", judges[0])
        for figure in mine:
            cells = [figure.lang, str(figure.n)]
            for judge in judges:
                cells.append(rate_cell(results.find(suite, metric, figure.lang, judge)))
                if metric == REFUSAL_RATE:
                    cells.append(rate_cell(results.find(suite, ATTACK_SUCCESS, figure.lang, judge)))
            if metric == REFUSAL_RATE:
                gap = "" if english is None else f"{100 * (english.rate - figure.rate):+.0f} pp"
                cells.append("" if figure.lang == "en" else gap)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def report_markdown(results: EvalResults, extra: str = "") -> str:
    """The whole report; ``extra`` (e.g. a comparison with a baseline) goes at the end."""
    run = results.run
    lines = [
        f"# Evaluation: {run.label or run.source.get('model', '')}",
        "",
        f"- source: `{json.dumps(run.source, ensure_ascii=False)}`",
        f"- suites: {', '.join(run.suites)}; languages: {', '.join(run.languages)}",
        f"- judges: {', '.join(run.judges)}; max tokens: {run.refusal_tokens} "
        f"(refusal), {run.mgsm_tokens} (MGSM); greedy decoding",
        f"- {run.requests} requests ({run.cached} from the cache), {run.seconds:.0f} s, "
        f"started {run.started}",
        "",
        "Rates in percent with their 95% Wilson interval; attack success = 1 − refusal. "
        "'gap to en' is English's refusal rate minus the language's.",
        "",
    ]
    for metric in (REFUSAL_RATE, OVER_REFUSAL, MGSM_ACCURACY):
        lines += _section(results, metric)
    if results.agreement:
        lines += [
            "## Agreement between judges (harmful prompts)",
            "",
            "| suite | lang | judges | n | agree | Cohen's kappa | no verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in results.agreement:
            kappa = "n/a" if row.kappa is None else f"{row.kappa:.2f}"
            lines.append(
                f"| {row.suite} | {row.lang} | {' vs '.join(row.judges)} | {row.n} | "
                f"{percent(row.rate)} | {kappa} | {row.no_verdict} |"
            )
        lines.append("")
    if extra:
        lines += [extra]
    return "\n".join(lines)
