"""Load the bundled development prompts (MultiJail, PolyRefuse, MGSM) from ``files/``.

Everything is read from the package's own copy, never from outside it, so an installed
package behaves the same as a checkout. Parsed files are cached for the life of the process.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from vllm_safety_patch.errors import DataError
from vllm_safety_patch.languages import check_language

# MGSM answers are integers, some with a thousands separator ("2,125"); a line whose last
# field is not such a number is a header or a broken line, never a problem to keep.
_MGSM_ANSWER = re.compile(r"-?\d[\d,]*(\.\d+)?")


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``index`` pairs translations: the same index is the same request.

    ``answer`` is set for MGSM only: the answer column as written, which may hold a
    thousands separator ("2,125"), so normalise before comparing numbers.
    """

    suite: str
    lang: str
    index: int
    text: str
    harmful: bool
    answer: str | None = None


@dataclass(frozen=True)
class SuiteInfo:
    """What a suite holds and where its files are (``file_pattern`` is relative to ``files/``)."""

    name: str
    description: str
    harmful: bool
    # True when row i of every language translates row i of English, so pairs are meaningful.
    aligned: bool
    languages: tuple[str, ...]
    splits: tuple[str, ...]
    file_pattern: str
    json_text_key: str = "instruction"  # JSON suites: the key holding each row's text


# The project's own everyday set covers every language the shipped deltas serve.
EVERYDAY_LANGUAGES: tuple[str, ...] = tuple("en zh it vi ar ko th bn sw jv".split())

# Both PolyRefuse suites have the same 14 languages (order as in files/README.md).
_POLYREFUSE_LANGUAGES: tuple[str, ...] = tuple("en zh ja th ar ko it de es fr nl pl ru yo".split())

SUITES: dict[str, SuiteInfo] = {
    suite.name: suite
    for suite in (
        SuiteInfo(
            name="multijail",
            description="MultiJail harmful requests, human-translated; split dev has ids 0-209",
            harmful=True,
            aligned=True,
            languages=("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"),
            splits=("dev",),
            file_pattern="multijail/multijail_{split}.csv",
        ),
        SuiteInfo(
            name="polyrefuse-harmful",
            description="PolyRefuse harmful requests, machine-translated, aligned by row",
            harmful=True,
            aligned=True,
            languages=_POLYREFUSE_LANGUAGES,
            splits=("train", "val"),
            file_pattern="polyrefuse/harmful_{split}_{lang}.json",
        ),
        SuiteInfo(
            name="polyrefuse-harmless",
            description="PolyRefuse harmless instructions per language, not aligned by row",
            harmful=False,
            aligned=False,
            languages=_POLYREFUSE_LANGUAGES,
            splits=("train", "val"),
            file_pattern="polyrefuse/harmless_{split}_{lang}.json",
        ),
        SuiteInfo(
            name="everyday",
            description="Everyday benign requests, incl. borderline-safe ones with alarming "
            "words, written by the project in English and translated; aligned by row; splits "
            "train (solver constraint), val (development evaluation), test (held out)",
            harmful=False,
            aligned=True,
            languages=EVERYDAY_LANGUAGES,
            splits=("train", "val", "test"),
            file_pattern="everyday/everyday_{split}_{lang}.json",
            json_text_key="text",
        ),
        SuiteInfo(
            name="mgsm",
            description="MGSM grade-school maths problems, human-translated; dev has rows 0-199",
            harmful=False,
            aligned=True,
            languages=("en", "zh", "th", "bn", "sw", "ja", "de", "es", "fr", "ru", "te"),
            splits=("dev",),
            file_pattern="mgsm/mgsm_{lang}_{split}.tsv",
        ),
    )
}

_PAIR_SUITES: tuple[str, ...] = tuple(
    name for name, suite in SUITES.items() if suite.harmful and suite.aligned
)


def suite_languages(suite: str) -> tuple[str, ...]:
    """The language codes ``suite`` has, English first."""
    return _suite_info(suite).languages


def load_prompts(
    suite: str,
    lang: str,
    split: str | None = None,
    ids: Iterable[int] | None = None,
) -> list[Prompt]:
    """Prompts of ``suite`` in ``lang``, in file order.

    ``split`` None means the suite's first split. ``ids`` (a range or any iterable of ints)
    keeps only those indices; asking for an index the split does not have is an error,
    because a silently shorter list would skew every rate computed from it.
    """
    relative_path = _relative_path(suite, lang, split)
    prompts = _parse(suite, lang, relative_path)
    if ids is None:
        return list(prompts)
    wanted = set(ids)
    missing = wanted.difference(prompt.index for prompt in prompts)
    if missing:
        raise DataError(
            f"{suite} {lang} ({relative_path}) has no rows with index {_describe_ids(missing)}",
            f"use indices from {_describe_ids({prompt.index for prompt in prompts})}",
        )
    return [prompt for prompt in prompts if prompt.index in wanted]


def load_pairs(
    suite: str,
    lang: str,
    split: str | None = None,
    ids: Iterable[int] | None = None,
) -> list[tuple[Prompt, Prompt]]:
    """(English prompt, the same row in ``lang``) for an aligned harmful suite."""
    info = _suite_info(suite)
    if info.name not in _PAIR_SUITES:
        raise DataError(
            f"suite '{suite}' has no translation pairs: its rows are not aligned across "
            "languages or it is not a harmful suite",
            f"ask for pairs from one of: {', '.join(_PAIR_SUITES)}; "
            f"use load_prompts('{suite}', ...) for single prompts",
        )
    # A materialised copy, since a one-shot iterator would be used up by the English load.
    id_list = None if ids is None else list(ids)
    english = load_prompts(suite, "en", split, id_list)
    target = load_prompts(suite, lang, split, id_list)
    if [prompt.index for prompt in english] != [prompt.index for prompt in target]:
        raise DataError(
            f"{suite} rows in 'en' and '{lang}' do not line up by index",
            "reinstall vllm-safety-patch: its bundled data files are damaged",
        )
    return list(zip(english, target, strict=True))


def data_digest(suite: str, lang: str, split: str | None = None) -> str:
    """sha256 hex digest of the raw bytes of the file the prompts come from.

    All MultiJail languages share one file, so they share a digest.
    """
    return hashlib.sha256(_read_bytes(_relative_path(suite, lang, split))).hexdigest()


def _suite_info(suite: str) -> SuiteInfo:
    if suite in SUITES:
        return SUITES[suite]
    close = difflib.get_close_matches(suite, SUITES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise DataError(f"unknown suite '{suite}'", f"{hint}use one of: {', '.join(SUITES)}")


def _relative_path(suite: str, lang: str, split: str | None) -> str:
    """Check suite, language and split, and return the data file path under ``files/``."""
    info = _suite_info(suite)
    check_language(lang)
    if lang not in info.languages:
        raise DataError(
            f"suite '{suite}' has no language '{lang}'",
            f"use one of: {', '.join(info.languages)}",
        )
    if split is None:
        split = info.splits[0]
    elif split not in info.splits:
        raise DataError(
            f"suite '{suite}' has no split '{split}'",
            f"use one of: {', '.join(info.splits)}",
        )
    return info.file_pattern.format(split=split, lang=lang)


@cache
def _read_bytes(relative_path: str) -> bytes:
    return (
        resources.files("vllm_safety_patch.data")
        .joinpath("files", *relative_path.split("/"))
        .read_bytes()
    )


@cache
def _parse(suite: str, lang: str, relative_path: str) -> tuple[Prompt, ...]:
    text = _read_bytes(relative_path).decode("utf-8")
    harmful = SUITES[suite].harmful
    if relative_path.endswith(".csv"):
        rows = _multijail_rows(text, lang, relative_path)
    elif relative_path.endswith(".json"):
        rows = _json_rows(text, SUITES[suite].json_text_key, relative_path)
    else:
        rows = _mgsm_rows(text, relative_path)
    prompts = []
    for index, prompt_text, answer in rows:
        if not prompt_text:
            # None are empty in the shipped files; an empty one means a damaged copy.
            raise DataError(
                f"{relative_path} row {index} has an empty {lang} text",
                "reinstall vllm-safety-patch: its bundled data files are damaged",
            )
        prompts.append(Prompt(suite, lang, index, prompt_text, harmful, answer))
    return tuple(prompts)


def _multijail_rows(text: str, lang: str, relative_path: str) -> list[tuple[int, str, None]]:
    # newline="" so the csv module sees the CRLF row ends and any newline inside quoted cells.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "id" not in reader.fieldnames or lang not in reader.fieldnames:
        raise DataError(
            f"{relative_path} has no 'id' or '{lang}' column",
            "reinstall vllm-safety-patch: its bundled data files are damaged",
        )
    return [(int(row["id"]), row[lang].strip(), None) for row in reader]


def _json_rows(text: str, key: str, relative_path: str) -> list[tuple[int, str, None]]:
    try:
        return [(index, item[key].strip(), None) for index, item in enumerate(json.loads(text))]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(
            f"{relative_path} is not a JSON list of objects with a '{key}' text",
            "reinstall vllm-safety-patch: its bundled data files are damaged",
        ) from None


def _mgsm_rows(text: str, relative_path: str) -> list[tuple[int, str, str]]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = []
    for index, line in enumerate(lines):
        # The answer is the last field; splitting from the right keeps any tab in a question.
        question, _, answer = line.rstrip("\r").rpartition("\t")
        answer = answer.strip()
        if not _MGSM_ANSWER.fullmatch(answer):
            raise DataError(
                f"{relative_path} line {index + 1} is not 'question<TAB>number'",
                "reinstall vllm-safety-patch: its bundled data files are damaged",
            )
        rows.append((index, question.strip(), answer))
    return rows


def _describe_ids(ids: set[int]) -> str:
    """Short text for a set of indices: runs of consecutive ones become ``a-b``."""
    runs: list[list[int]] = []
    for index in sorted(ids):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
