"""The bundled data loaders, run against the real files shipped in the package."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from vllm_safety_patch.data import (
    SUITES,
    Prompt,
    data_digest,
    load_pairs,
    load_prompts,
    suite_languages,
)
from vllm_safety_patch.errors import DataError

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "vllm_safety_patch"

EXPECTED_ROWS = [
    ("multijail", "dev", 210),
    ("polyrefuse-harmful", "train", 260),
    ("polyrefuse-harmful", "val", 39),
    ("polyrefuse-harmless", "train", 200),
    ("polyrefuse-harmless", "val", 200),
    ("mgsm", "dev", 200),
    ("everyday", "train", 192),
    ("everyday", "val", 64),
    ("everyday", "test", 64),
]


@pytest.mark.parametrize(("suite", "split", "rows"), EXPECTED_ROWS)
def test_every_language_has_the_expected_rows(suite: str, split: str, rows: int) -> None:
    for lang in suite_languages(suite):
        prompts = load_prompts(suite, lang, split)
        assert len(prompts) == rows, (suite, lang, split)
        assert [prompt.index for prompt in prompts] == list(range(rows))
        assert all(prompt.text and prompt.text == prompt.text.strip() for prompt in prompts)
        assert {(prompt.suite, prompt.lang) for prompt in prompts} == {(suite, lang)}
        assert all(prompt.harmful == SUITES[suite].harmful for prompt in prompts)


def test_suite_languages() -> None:
    assert suite_languages("multijail") == (
        "en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv",
    )  # fmt: skip
    assert len(suite_languages("polyrefuse-harmful")) == 14
    assert suite_languages("polyrefuse-harmless") == suite_languages("polyrefuse-harmful")
    assert len(suite_languages("mgsm")) == 11
    assert all(languages[0] == "en" for languages in map(suite_languages, SUITES))


def test_default_split_is_the_first() -> None:
    assert load_prompts("polyrefuse-harmful", "zh") == load_prompts(
        "polyrefuse-harmful", "zh", "train"
    )
    assert load_prompts("mgsm", "en") == load_prompts("mgsm", "en", "dev")


def test_multijail_row_content() -> None:
    first = load_prompts("multijail", "en", ids=[0])[0]
    assert first.text.startswith("How much money should I sell my 18 year old daughter")
    assert first.answer is None
    assert first.harmful


def test_mgsm_answers_are_the_answer_column() -> None:
    english = load_prompts("mgsm", "en")
    assert english[0].text.startswith("Janet’s ducks lay 16 eggs per day.")
    assert english[0].answer == "18"
    assert not english[0].harmful
    # Answers are language independent, so every translation carries the same ones.
    answers = [prompt.answer for prompt in english]
    for lang in suite_languages("mgsm"):
        assert [prompt.answer for prompt in load_prompts("mgsm", lang)] == answers


@pytest.mark.parametrize(("suite", "split"), [("multijail", "dev"), ("polyrefuse-harmful", "val")])
def test_pairs_are_aligned_by_index(suite: str, split: str) -> None:
    pairs = load_pairs(suite, "zh", split)
    assert len(pairs) == len(load_prompts(suite, "en", split))
    for english, chinese in pairs:
        assert (english.lang, chinese.lang) == ("en", "zh")
        assert english.index == chinese.index
        assert english.text != chinese.text
    english_texts = [english.text for english, _ in pairs]
    assert english_texts == [prompt.text for prompt in load_prompts(suite, "en", split)]


def test_pairs_respect_ids_even_from_a_one_shot_iterator() -> None:
    pairs = load_pairs("multijail", "sw", ids=iter([3, 1, 2]))
    assert [(english.index, swahili.index) for english, swahili in pairs] == [
        (1, 1),
        (2, 2),
        (3, 3),
    ]


def test_ids_filter_by_index() -> None:
    prompts = load_prompts("multijail", "th", ids=range(10, 20))
    assert [prompt.index for prompt in prompts] == list(range(10, 20))
    picked = load_prompts("polyrefuse-harmful", "yo", "val", ids={38, 0})
    assert [prompt.index for prompt in picked] == [0, 38]
    assert load_prompts("mgsm", "te", ids=[]) == []


def test_ids_outside_the_split_are_an_error() -> None:
    # MultiJail ids 210-314 are held out: asking for them must not quietly return fewer rows.
    with pytest.raises(DataError) as caught:
        load_prompts("multijail", "en", ids=range(200, 215))
    message = str(caught.value)
    assert "210-214" in message
    assert "0-209" in message


def test_prompts_are_frozen() -> None:
    prompt = load_prompts("mgsm", "en", ids=[0])[0]
    assert isinstance(prompt, Prompt)
    with pytest.raises(AttributeError):
        prompt.text = "changed"  # type: ignore[misc]


def test_digests_are_stable_and_distinct() -> None:
    digest = data_digest("polyrefuse-harmful", "zh", "train")
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert digest == data_digest("polyrefuse-harmful", "zh")
    assert digest == data_digest("polyrefuse-harmful", "zh", "train")
    files = [
        ("multijail", "en", "dev"),
        ("polyrefuse-harmful", "zh", "train"),
        ("polyrefuse-harmful", "zh", "val"),
        ("polyrefuse-harmful", "en", "train"),
        ("polyrefuse-harmless", "zh", "train"),
        ("polyrefuse-harmless", "zh", "val"),
        ("mgsm", "zh", "dev"),
        ("mgsm", "en", "dev"),
    ]
    digests = [data_digest(*file) for file in files]
    assert len(set(digests)) == len(files)


def test_multijail_languages_share_one_file_digest() -> None:
    assert data_digest("multijail", "zh") == data_digest("multijail", "en")


def _message(call: Callable[..., object], *arguments: object) -> str:
    """The text of the DataError that ``call(*arguments)`` must raise."""
    with pytest.raises(DataError) as caught:
        call(*arguments)
    return str(caught.value)


def test_unknown_suite_suggests_the_closest_and_lists_all() -> None:
    message = _message(load_prompts, "multijial", "en")
    assert "unknown suite 'multijial'" in message
    assert "did you mean 'multijail'" in message
    for suite in SUITES:
        assert suite in message
    assert "unknown suite" in _message(suite_languages, "nope")
    assert "unknown suite" in _message(data_digest, "nope", "en")
    assert "unknown suite" in _message(load_pairs, "nope", "en")


def test_unknown_split_lists_the_splits() -> None:
    message = _message(load_prompts, "polyrefuse-harmful", "en", "test")
    assert "no split 'test'" in message
    assert "train, val" in message
    assert "no split 'train'" in _message(data_digest, "multijail", "en", "train")


def test_unknown_language_code_is_rejected() -> None:
    message = _message(load_prompts, "multijail", "english")
    assert "unknown language code 'english'" in message
    assert "zh" in message


def test_language_the_suite_lacks_lists_its_languages() -> None:
    message = _message(load_prompts, "multijail", "ja")
    assert "suite 'multijail' has no language 'ja'" in message
    assert ", ".join(suite_languages("multijail")) in message
    assert "no language 'jv'" in _message(load_pairs, "polyrefuse-harmful", "jv")
    assert "no language 'yo'" in _message(data_digest, "mgsm", "yo")


@pytest.mark.parametrize("suite", ["polyrefuse-harmless", "mgsm"])
def test_pairs_need_an_aligned_harmful_suite(suite: str) -> None:
    message = _message(load_pairs, suite, "zh")
    assert f"suite '{suite}' has no translation pairs" in message
    assert "multijail, polyrefuse-harmful" in message


def test_bundled_files_carry_their_licences() -> None:
    files = PACKAGE_DIR / "data" / "files"
    assert (files / "README.md").is_file()
    for folder in ("multijail", "polyrefuse", "mgsm"):
        assert (files / folder / "LICENSE").is_file()


def test_no_code_reads_the_shared_data_folder() -> None:
    offenders = [
        str(path.relative_to(PACKAGE_DIR))
        for path in PACKAGE_DIR.rglob("*.py")
        if "shared/data" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def _everyday_rows(split: str, lang: str) -> list[dict]:
    path = PACKAGE_DIR / "data" / "files" / "everyday" / f"everyday_{split}_{lang}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def test_everyday_is_the_same_requests_in_every_language_split_by_id() -> None:
    """Row i is the same request in all ten languages; ids 5n+3 are val, 5n+4 test, the rest
    train (the solver's constraint), so the splits never share a request."""
    assert suite_languages("everyday") == (
        "en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv",
    )  # fmt: skip
    seen: set[int] = set()
    for split, residues in (("train", {0, 1, 2}), ("val", {3}), ("test", {4})):
        english = _everyday_rows(split, "en")
        ids = [row["id"] for row in english]
        assert {i % 5 for i in ids} == residues and not seen & set(ids)
        seen |= set(ids)
        assert sum(row["borderline"] for row in english) >= len(english) // 6  # XSTest-style
        assert len({row["category"] for row in english}) >= 14
        for lang in suite_languages("everyday")[1:]:
            rows = _everyday_rows(split, lang)
            assert [(r["id"], r["category"], r["borderline"]) for r in rows] == [
                (r["id"], r["category"], r["borderline"]) for r in english
            ], (split, lang)
            assert all(r["text"] != e["text"] for r, e in zip(rows, english, strict=True))
    assert seen == set(range(320))
    texts = [row["text"].casefold() for split in ("train", "val", "test") for row in
             _everyday_rows(split, "en")]  # fmt: skip
    assert len(set(texts)) == len(texts) >= 300


def test_everyday_loads_as_benign_rows_indexed_within_the_split() -> None:
    bengali = load_prompts("everyday", "bn", "val")
    assert [p.index for p in bengali] == list(range(64)) and not any(p.harmful for p in bengali)
    assert bengali[0].text == _everyday_rows("val", "bn")[0]["text"]
