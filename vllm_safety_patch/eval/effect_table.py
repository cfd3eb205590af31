"""Markdown tables of the measured effect stored in delta manifests (for deltas/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_safety_patch.delta.effect_review import percent
from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.eval.stats import wilson_interval

# One table per (metric, data suite), in this order.
TABLE_TITLES = {
    ("refusal_rate", "multijail"): "Refusal of held-out harmful prompts (MultiJail), %",
    ("over_refusal", "everyday"): "Refusal of everyday benign requests (the project's own set), %",
    (
        "over_refusal",
        "polyrefuse-harmless",
    ): "Over-refusal of benign prompts (PolyRefuse harmless), %",
    ("mgsm_accuracy", "mgsm"): "MGSM exact-match accuracy, %",
}


def gap_closed(before: float, after: float, english_before: float) -> float | None:
    """Share of a language's refusal gap to English that the edit closed."""
    gap = english_before - before
    return None if gap <= 0 else (after - before) / gap


def _cell(before: float, after: float, n: int) -> str:
    """'before → after [low-high]': the after figure's Wilson 95% interval."""
    low, high = wilson_interval(round(after * n), n)
    return f"{100 * before:.0f} → {100 * after:.0f} [{100 * low:.0f}-{100 * high:.0f}]"


def effect_markdown(deltas: Sequence[Delta]) -> str:
    """One table per metric and suite: rows are deltas, cells 'before → after [Wilson 95% of
    after]' per language."""
    lines: list[str] = []
    for (metric, suite), title in TABLE_TITLES.items():
        rows = [
            (d, [r for r in d.manifest.measured_effect if (r.metric, r.suite) == (metric, suite)])
            for d in deltas
        ]
        rows = [(d, effect) for d, effect in rows if effect]
        if not rows:
            continue
        languages: list[str] = []
        for _, effect in rows:
            for row in effect:
                if row.lang not in languages:
                    languages.append(row.lang)
        split = rows[0][1][0].split
        lines += [f"### {title} ({split})", ""]
        lines.append("| delta | " + " | ".join(languages) + " |")
        lines.append("| --- |" + " --- |" * len(languages))
        for delta, effect in rows:
            by_lang = {row.lang: row for row in effect}
            cells = []
            for lang in languages:
                row = by_lang.get(lang)
                cells.append("" if row is None else _cell(row.before, row.after, row.n))
            lines.append(f"| {delta.group} | " + " | ".join(cells) + " |")
        if metric == "refusal_rate":
            lines += ["", "Share of each language's gap to English closed:", ""]
            lines.append("| delta | " + " | ".join(languages[1:]) + " |")
            lines.append("| --- |" + " --- |" * (len(languages) - 1))
            for delta, effect in rows:
                by_lang = {row.lang: row for row in effect}
                english = by_lang.get("en")
                cells = []
                for lang in languages[1:]:
                    row = by_lang.get(lang)
                    share = (
                        gap_closed(row.before, row.after, english.before)
                        if row is not None and english is not None
                        else None
                    )
                    cells.append("" if share is None else percent(share))
                lines.append(f"| {delta.group} | " + " | ".join(cells) + " |")
        n = sorted({row.n for _, effect in rows for row in effect})
        lines += [
            "",
            f"n per language: {', '.join(map(str, n))}; in brackets the Wilson 95% interval "
            "of the figure after the edit",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vllm_safety_patch.eval.effect_table DIR``: print the tables of DIR's deltas."""
    import sys
    from pathlib import Path

    from vllm_safety_patch.delta.io import read_delta

    folder = Path((argv or sys.argv[1:])[0])
    deltas = [read_delta(path) for path in sorted(folder.glob("*.safetensors"))]
    print(effect_markdown(deltas))


if __name__ == "__main__":
    main()
