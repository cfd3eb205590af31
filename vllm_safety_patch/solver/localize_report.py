"""Tables of a localisation (``vsp localize``): printed with rich, or as Markdown for the docs.

Every table is built from the result's JSON form, so a saved run can be rendered again.
"""

from __future__ import annotations

from typing import Any

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def _pct(counts: dict[str, int] | None) -> str:
    if not counts or not counts["total"]:
        return "-"
    return f"{100 * counts['refused'] / counts['total']:.0f}"


def localization_tables(result: dict[str, Any]) -> list[Table]:
    languages = list(result["languages"])
    data = result["languages"]
    tables: list[Table] = []
    kinds = sorted({site.split(":")[0] for site in result["sites"]}, key=_kind_order)
    header = ["site", *languages]
    base_h = ["none", *(_pct(data[lang]["harmful"].get("none")) for lang in languages)]
    base_b = ["none", *(_pct(data[lang]["benign"].get("none")) for lang in languages)]
    for kind in kinds:
        sites = [site for site in result["sites"] if site.startswith(f"{kind}:")]
        rows = [base_h]
        for site in sites:
            rows.append([site, *(_pct(data[lang]["harmful"].get(site)) for lang in languages)])
        tables.append(
            (f"harmful refused % with the English twin's {kind} patched in", header, rows)
        )
        rows = [base_b]
        for site in sites:
            rows.append([site, *(_pct(data[lang]["benign"].get(site)) for lang in languages)])
        tables.append(
            (f"everyday refused % with the English twin's {kind} patched in", header, rows)
        )
    n_h = [str(data[lang]["harmful"].get("none", {}).get("total", 0)) for lang in languages]
    n_b = [str(data[lang]["benign"].get("none", {}).get("total", 0)) for lang in languages]
    agreement = [_pct_of(data[lang]["opening_agreement"]) for lang in languages]
    tables.append(
        (
            "rows per language (harmful: pairs whose English twin is refused) and agreement of "
            "the opening verdict with the full-reply judge (unpatched, %)",
            ["", *languages],
            [["harmful n", *n_h], ["everyday n", *n_b], ["agreement %", *agreement]],
        )
    )
    probe_rows, share_rows = [], []
    for layer in range(result["layers"]):
        probe_rows.append(
            [str(layer), *(f"{data[lang]['probe_accuracy'][layer]:.2f}" for lang in languages)]
        )
        share_rows.append(
            [str(layer), *(f"{data[lang]['direction_share'][layer]:.2f}" for lang in languages)]
        )
    tables.append(
        (
            "linear probe, harmful vs everyday within the language, held-out accuracy "
            "(last prompt token, residual stream after the layer)",
            ["layer", *languages],
            probe_rows,
        )
    )
    tables.append(
        (
            "harmful-minus-everyday gap along the English refusal direction, as a share of "
            "English's own gap (1.00 = as in English)",
            ["layer", *languages],
            share_rows,
        )
    )
    return tables


def _pct_of(counts: dict[str, int]) -> str:
    return _pct(counts)


def _kind_order(kind: str) -> int:
    order = ["resid", "dir", "dirs", "attn", "mlp"]
    return order.index(kind) if kind in order else len(order)


def print_localization(result, console) -> None:
    from rich.table import Table as RichTable

    data = result if isinstance(result, dict) else result.to_json()
    for title, header, rows in localization_tables(data):
        table = RichTable(title=title)
        for column in header:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    english = data["english_refused"]
    console.print(
        f"English twins refused: {english['refused']} of {english['total']}; "
        f"{data['seconds']:.0f} s; rows {data['settings']}",
        highlight=False,
    )


def markdown_tables(result: dict[str, Any]) -> str:
    parts = []
    for title, header, rows in localization_tables(result):
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + " --- |" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm_safety_patch.solver.localize_report RESULT.json``: Markdown tables."""
    import json
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m vllm_safety_patch.solver.localize_report RESULT.json")
    sys.stdout.write(markdown_tables(json.loads(Path(args[0]).read_text())))


if __name__ == "__main__":  # pragma: no cover
    main()
