"""Both sides of a delta's effect where operators look (issue 12, item 4): ``vsp inspect``,
``GET /v1/safety/deltas`` (through ``SafetyState.available``, what the route returns), the
``vsp deltas list`` table and ``vsp serve``'s start-up lines; flags for a language without an
everyday-benign figure or with benign refusal up more than 3 points. Real delta files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_delta
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.cli.serving import print_listing
from vllm_safety_patch.delta.effect_review import BENIGN_RISE_LIMIT, review_effect
from vllm_safety_patch.delta.io import write_delta
from vllm_safety_patch.delta.manifest import EffectRow
from vllm_safety_patch.server.state import SafetyState

runner = CliRunner()


def rows(bn_benign_after: float | None, with_english_benign: bool = True) -> list[EffectRow]:
    def row(metric: str, suite: str, lang: str, n: int, before: float, after: float) -> EffectRow:
        return EffectRow(
            metric=metric, suite=suite, lang=lang, split="held out", n=n, before=before,
            after=after,
        )  # fmt: skip

    found = [
        row("refusal_rate", "multijail", "en", 50, 0.66, 0.66),
        row("refusal_rate", "multijail", "bn", 50, 0.02, 0.48),
        row("over_refusal", "polyrefuse-harmless", "bn", 20, 0.0, 0.0),  # not the everyday set
    ]
    if with_english_benign:
        found.append(row("over_refusal", "everyday", "en", 64, 0.094, 0.094))
    if bn_benign_after is not None:
        found.append(row("over_refusal", "everyday", "bn", 64, 2 / 64, bn_benign_after))
    return found


def delta_file(model: Path, folder: Path, name: str, effect: list[EffectRow]) -> Path:
    delta, _ = make_delta(model, group=name, languages=("bn",), layers=(1,))
    measured = delta.manifest.model_copy(update={"measured_effect": effect})
    path = folder / f"{name}.safetensors"
    write_delta(path, measured, delta.edits)
    return path


def test_both_sides_per_language_and_the_flags(tiny_qwen2: Path) -> None:
    delta, _ = make_delta(tiny_qwen2, group="south-asian", languages=("bn",), layers=(1,))

    def review(effect: list[EffectRow]):
        return review_effect(delta.manifest.model_copy(update={"measured_effect": effect}))

    one_more = review(rows(3 / 64))  # one more prompt of 64 refused: +1.6 points
    assert one_more.ok and [row.lang for row in one_more.languages] == ["en", "bn"]
    bn = one_more.languages[1]
    assert (bn.harmful_before, bn.harmful_after, bn.benign_n) == (0.02, 0.48, 64)

    over = review(rows(4 / 64))  # two more: +3.1 points, over the limit
    assert BENIGN_RISE_LIMIT == 0.03 and len(over.flags) == 1
    assert over.flags[0].startswith("bn: everyday-benign refusal 3.1% -> 6.2%, +3.1 points")

    missing = review(rows(None, with_english_benign=False))
    assert missing.flags == (
        "no everyday-benign refusal figure for en, bn; measure it: vsp measure FILE "
        "(writes both sides into the manifest)",
    )  # a PolyRefuse figure does not stand in for everyday requests
    assert review([]).flags[0].startswith("no measured effect")


@pytest.fixture
def folder(tiny_qwen2: Path, tmp_path: Path) -> Path:
    delta_file(tiny_qwen2, tmp_path, "kept", rows(3 / 64))
    delta_file(tiny_qwen2, tmp_path, "refuses-bengali", rows(40 / 64))
    delta_file(tiny_qwen2, tmp_path, "unmeasured", [])
    return tmp_path


def test_inspect_shows_both_sides_and_flags(folder: Path) -> None:
    kept = runner.invoke(app, ["inspect", str(folder / "kept.safetensors")])
    assert kept.exit_code == 0, kept.output
    assert "both sides" in kept.stdout and "2% -> 48%" in kept.stdout
    assert "no benign flag" in kept.stdout
    flagged = runner.invoke(app, ["inspect", str(folder / "refuses-bengali.safetensors")])
    assert "flag: bn: everyday-benign refusal 3.1% -> 62.5%" in flagged.stdout


def test_the_listing_carries_both_sides_and_flags(
    folder: Path, tiny_qwen2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = SafetyState(
        delta_dir=folder, model_dir=tiny_qwen2, served_model="tiny", admin_token=None
    )
    listed = {info.name: info for info in state.available()}
    assert listed["kept"].flags == [] and listed["kept"].effect[1].benign_after == 3 / 64
    assert listed["refuses-bengali"].flags[0].startswith("bn: everyday-benign refusal")
    assert listed["unmeasured"].flags[0].startswith("no measured effect")
    payload = {
        "model": "tiny", "header": "none", "active": [],
        "available": [info.model_dump(mode="json") for info in listed.values()],
    }  # fmt: skip
    print_listing(payload)  # what `vsp deltas list` prints from GET /v1/safety/deltas
    printed = capsys.readouterr().out
    assert "benign flags" in printed and "delta base fingerprint" in printed
    assert "flag: refuses-bengali: bn: everyday-benign refusal" in printed


def test_serve_start_up_shows_both_sides_and_flags(folder: Path, tiny_qwen2: Path) -> None:
    result = runner.invoke(
        app,
        ["serve", "--model", str(tiny_qwen2), "--delta-dir", str(folder),
         "--deltas", "refuses-bengali", "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "refuses-bengali: refused, harmful / everyday benign: en 66%->66% / 9%->9%, " in (
        "\n".join(lines)
    )
    assert any(line.startswith("flag: refuses-bengali: bn: everyday-benign") for line in lines)
