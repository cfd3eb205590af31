"""The one-line-per-option comparison (vsp measure --summary, eval.options_table)."""

from __future__ import annotations

import json

from vllm_safety_patch.eval.options_table import main, options_table


def _row(metric: str, suite: str, lang: str, before: float, after: float) -> dict:
    return dict(metric=metric, suite=suite, lang=lang, split="x", n=40, before=before, after=after)


def test_both_sides_per_language_and_gap_closed(tmp_path, capsys) -> None:
    rows = [
        _row("refusal_rate", "multijail", "en", 0.6, 0.6),
        _row("refusal_rate", "multijail", "bn", 0.0, 0.45),
        _row("refusal_rate", "multijail", "zh", 0.4, 0.4),
        _row("over_refusal", "everyday", "bn", 0.02, 0.05),
    ]
    line = {"file": "build/options/late/all.safetensors", "group": "all", "rows": rows}
    table = options_table([line])
    assert "| base | harmful | 60 | 40 | - | - | - | - | - | 0 | - | - |" in table
    # bn closes 75% of its gap, zh 0%: mean 38%
    assert "| late/all | harmful | 60 | 40 |" in table and "| 38% |" in table
    assert "| late/all | everyday | - | - | - | - | - | - | - | 5 |" in table
    summary = tmp_path / "summary.jsonl"
    summary.write_text(json.dumps(line) + "\n")
    main([str(summary)])
    assert capsys.readouterr().out == table


def test_help_and_a_missing_summary_get_a_message_not_a_traceback(tmp_path) -> None:
    import pytest

    with pytest.raises(SystemExit, match="usage"):
        main(["--help"])
    with pytest.raises(SystemExit, match="vsp measure --summary"):
        main([str(tmp_path / "none.jsonl")])


def test_replies_in_another_language_get_their_own_line_when_measured() -> None:
    rows = [
        _row("refusal_rate", "multijail", "en", 0.6, 0.6),
        _row("over_refusal", "everyday", "jv", 0.17, 0.3),
        _row("other_language", "everyday", "jv", 0.09, 0.36),
    ]
    table = options_table(
        [{"file": "build/options/x/all.safetensors", "group": "all", "rows": rows}]
    )
    assert "| base | other language | - | - | - | - | - | - | - | - | - | 9 |" in table
    assert "| x/all | other language | - | - | - | - | - | - | - | - | - | 36 |" in table
    # an older summary without the check prints no such line
    old = [row for row in rows if row["metric"] != "other_language"]
    table = options_table(
        [{"file": "build/options/x/all.safetensors", "group": "all", "rows": old}]
    )
    assert "other language" not in table
