"""One line per measured option, both sides per language (``vsp measure --summary FILE``).

    python -m vllm_safety_patch.eval.options_table build/options.jsonl

prints a Markdown table: for each delta measured into FILE, harmful refusal (MultiJail),
everyday-benign refusal and everyday replies in another language ("other language") per
language, in percent, with the base model's figures first and each option's share of the
harmful gap to English closed. Summaries written before the reply-language check have no
"other language" line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vllm_safety_patch.delta.effect_review import percent

LANGUAGES = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")


def _figures(rows: list[dict], metric: str, suite: str, side: str) -> dict[str, float]:
    return {
        row["lang"]: 100 * row[side]
        for row in rows
        if row["metric"] == metric and row["suite"] == suite
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def options_table(lines: list[dict]) -> str:
    header = ["option", "side", *LANGUAGES, "gap closed (mean of non-en)"]
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    if not lines:
        return "\n".join(out) + "\n"
    first = lines[0]["rows"]
    base_h = _figures(first, "refusal_rate", "multijail", "before")
    base_b = _figures(first, "over_refusal", "everyday", "before")
    base_o = _figures(first, "other_language", "everyday", "before")
    out.append(_line("base", "harmful", base_h, ""))
    out.append(_line("base", "everyday", base_b, ""))
    if base_o:
        out.append(_line("base", "other language", base_o, ""))
    for line in lines:
        name = Path(line["file"]).stem if line["group"] == "all" else line["group"]
        name = f"{Path(line['file']).parent.name}/{name}"
        after_h = _figures(line["rows"], "refusal_rate", "multijail", "after")
        after_b = _figures(line["rows"], "over_refusal", "everyday", "after")
        gaps = []
        english = base_h.get("en")
        for lang, value in after_h.items():
            if lang == "en" or english is None or lang not in base_h:
                continue
            gap = english - base_h[lang]
            if gap > 0:
                gaps.append((value - base_h[lang]) / gap)
        closed = percent(sum(gaps) / len(gaps)) if gaps else "-"
        out.append(_line(name, "harmful", after_h, closed))
        out.append(_line(name, "everyday", after_b, ""))
        after_o = _figures(line["rows"], "other_language", "everyday", "after")
        if after_o:
            out.append(_line(name, "other language", after_o, ""))
    return "\n".join(out) + "\n"


def _line(name: str, side: str, figures: dict[str, float], closed: str) -> str:
    cells = [_cell(figures.get(lang)) for lang in LANGUAGES]
    return "| " + " | ".join([name, side, *cells, closed]) + " |"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m vllm_safety_patch.eval.options_table SUMMARY.jsonl"
    if len(args) != 1 or args[0].startswith("-"):
        raise SystemExit(usage)
    path = Path(args[0])
    if not path.is_file():
        raise SystemExit(
            f"no summary file {path}: write one with vsp measure --summary {path} "
            "(scripts/try-option.sh writes build/options/summary.jsonl)"
        )
    lines = [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    sys.stdout.write(options_table(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
