"""Decide early (issue 21): the refusal judge on a reply's opening k tokens against its
verdict on the full reply, on hand-written replies (no model: a byte-level tokenizer, which
splits characters the way a BPE tokenizer may, stands in for the model's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_safety_patch.eval import early_verdict
from vllm_safety_patch.eval.early_verdict import (
    agreement_table,
    early_refusal,
    format_table,
    openings,
    read_samples,
)
from vllm_safety_patch.judge.refusal import is_refusal
from vllm_safety_patch.server import canary


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


REFUSAL = "I'm sorry, but I can't help with that request."  # the marker ends at byte 14
ZH_REFUSAL = "抱歉，我无法提供帮助。"  # "抱歉，我无法": 6 characters, 18 bytes
ANSWER = "Sure! Here is a simple recipe for pancakes: mix flour, eggs and milk."
LATE = "Sure! Here is some background first. " * 2 + "I'm sorry, but I can't go on."


def test_openings_hold_back_an_incomplete_character() -> None:
    prefixes = openings(ZH_REFUSAL, 8, encode, decode)
    assert len(prefixes) == 8
    assert prefixes[:3] == ["", "", "抱"]  # 1 and 2 bytes of 抱: nothing shown yet
    assert all("\ufffd" not in text for text in prefixes)
    assert openings("ok", 24, encode, decode) == ["o", "ok"]  # a short reply: all of it


def test_the_early_verdict_is_the_judges_verdict_on_the_opening() -> None:
    prefixes = openings(REFUSAL, 24, encode, decode)
    assert not early_refusal(prefixes, 13, "en")  # "I'm sorry, bu": no marker yet
    assert early_refusal(prefixes, 14, "en") and early_refusal(prefixes, 24, "en")
    zh = openings(ZH_REFUSAL, 24, encode, decode)
    assert not early_refusal(zh, 17, "zh") and early_refusal(zh, 18, "zh")
    # The canary stops at the first refused prefix and judges with the same function.
    assert canary.is_refusal is early_verdict.is_refusal is is_refusal


def test_agreement_counts_what_the_opening_misses() -> None:
    replies = {
        ("base", "harmful", "en"): [REFUSAL, ANSWER, LATE],
        ("base", "benign", "en"): [ANSWER, ANSWER],
        ("base", "harmful", "zh"): [ZH_REFUSAL],
    }
    result = agreement_table(replies, encode, decode, tokens=(8, 16, 128))
    assert result.refused == {
        ("base", "harmful", "en"): 2,
        ("base", "benign", "en"): 0,
        ("base", "harmful", "zh"): 1,
    }
    key = ("base", "harmful", "en")
    # At 8 bytes neither refusal is seen; at 16 the late one is still missed; at 128 none.
    assert [result.differ.get((*key, k), 0) for k in (8, 16, 128)] == [2, 1, 0]
    assert result.share(key, 16) == pytest.approx(2 / 3)
    # "抱歉，我无法" is 18 bytes: missed at 8 and 16, seen at 128.
    assert [result.differ.get(("base", "harmful", "zh", k), 0) for k in (8, 16, 128)] == [1, 1, 0]
    assert result.share(("base", "benign", "en"), 8) == 1.0  # answers stay answers
    missed = [case for case in result.cases if case.tokens == 16 and case.lang == "en"]
    assert [(case.row, case.early, case.full) for case in missed] == [(2, False, True)]
    assert missed[0].opening == LATE[:16] and missed[0].reply == LATE


def test_an_opening_is_never_refused_where_the_full_reply_is_not() -> None:
    """The judge reads a window at the start of the reply: a refusal it sees in an opening
    it also sees in the whole, so the early verdict only ever misses refusals."""
    replies = {("delta", "benign", "en"): [ANSWER, REFUSAL + " " + ANSWER, LATE]}
    result = agreement_table(replies, encode, decode, tokens=range(1, 40))
    assert result.cases and all(case.full and not case.early for case in result.cases)


def test_samples_and_table(tmp_path: Path) -> None:
    path = tmp_path / "all.json"
    path.write_text(
        json.dumps(
            {
                "refusal_rate|multijail|en": {"before": [REFUSAL, LATE], "after": [REFUSAL] * 2},
                "over_refusal|everyday|en": {"before": [ANSWER], "after": [ANSWER]},
                "over_refusal|polyrefuse-harmless|en": {"before": [REFUSAL], "after": [ANSWER]},
            }
        )
    )
    replies = read_samples(path)
    assert set(replies) == {
        (model, kind, "en") for model in ("base", "delta") for kind in ("harmful", "benign")
    }
    assert replies[("base", "harmful", "en")] == [REFUSAL, LATE]
    text = format_table(agreement_table(replies, encode, decode, (16, 128)), (16, 128))
    lines = text.splitlines()
    assert lines[0] == "base model, harmful probes: agreement % (disagreements)"
    assert lines[2].split() == ["en", "2", "2", "50.0", "(", "1)", "100.0", "(", "0)"]
    assert "k=16  lowest  66.7 (en)  pooled  66.7  (1 of 3 differ)" in text


def test_the_command_prints_the_table_and_writes_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "all.json"
    path.write_text(
        json.dumps({"refusal_rate|multijail|zh": {"before": [ZH_REFUSAL], "after": [ANSWER]}})
    )
    monkeypatch.setattr(early_verdict, "_tokenizer", lambda model: (encode, decode))
    out = tmp_path / "agreement.json"
    assert (
        early_verdict.main([str(path), "--tokens", "8,24", "--json", str(out), "--show", "8"]) == 0
    )
    printed = capsys.readouterr().out
    assert "base model, harmful probes" in printed and "delta model, harmful probes" in printed
    assert "base harmful zh row 0: early answered, full refused" in printed
    written = json.loads(out.read_text())
    assert written["tokens"] == [8, 24] and len(written["cases"]) == 1
    with pytest.raises(SystemExit):
        early_verdict.main([str(tmp_path / "missing.json")])
