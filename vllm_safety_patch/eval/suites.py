"""What is measured: evaluation suites, their held-out rows, and the tasks they expand to.

A task is one (metric, data suite, language) cell: a list of prompts whose replies are
scored alike. ``vsp eval`` and the solver's in-process measurement (``eval/effect.py``)
build their tasks here, so both read the same rows the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vllm_safety_patch.data import Prompt, load_prompts, suite_languages
from vllm_safety_patch.errors import DataError
from vllm_safety_patch.eval.scoring import MGSM_ACCURACY, OVER_REFUSAL, REFUSAL_RATE
from vllm_safety_patch.languages import check_language


@dataclass(frozen=True)
class HeldOut:
    """Rows of a data suite the solver never fits on: where evaluation figures come from."""

    dataset: str
    metric: str
    split: str
    rows: range | None  # None: every row of the split


# The solver fits on MultiJail ids 0-159, PolyRefuse train, MGSM rows 0-169 and everyday
# train; the rest of the bundled development data is held out (data/files/README.md). The
# everyday val split is for comparing solver settings (`vsp measure --everyday-split val`);
# `vsp eval` reports on its test split, which nothing is tuned on.
HELD_OUT: dict[str, HeldOut] = {
    held.dataset: held
    for held in (
        HeldOut("multijail", REFUSAL_RATE, "dev", range(160, 210)),
        HeldOut("polyrefuse-harmful", REFUSAL_RATE, "val", None),
        HeldOut("polyrefuse-harmless", OVER_REFUSAL, "val", None),
        HeldOut("mgsm", MGSM_ACCURACY, "dev", range(170, 200)),
        HeldOut("everyday", OVER_REFUSAL, "test", None),
    )
}

# Generation lengths of every measurement (`vsp measure`, `vsp eval`, the canary's probes):
# a refusal shows in its first words; a maths answer needs room to finish.
REFUSAL_TOKENS = 40
MGSM_TOKENS = 320


def held_out_rows(dataset: str) -> tuple[int, int]:
    """[start, stop) of a suite's held-out rows (for those held out by row number)."""
    rows = HELD_OUT[dataset].rows
    assert rows is not None, dataset
    return rows.start, rows.stop


# What ``--suites`` accepts: a short name expands to its data suites.
SUITE_GROUPS: dict[str, tuple[str, ...]] = {
    "multijail": ("multijail",),
    "polyrefuse": ("polyrefuse-harmful", "polyrefuse-harmless"),
    "mgsm": ("mgsm",),
    **{dataset: (dataset,) for dataset in HELD_OUT if dataset not in ("multijail", "mgsm")},
}
DEFAULT_SUITES = ("multijail", "polyrefuse", "everyday", "mgsm")


@dataclass(frozen=True)
class Task:
    """Prompts of one data suite in one language, scored for one metric."""

    metric: str
    suite: str  # the data suite ("multijail", "polyrefuse-harmless", ...)
    lang: str
    split: str  # which rows, in words ("ids 160-209")
    prompts: tuple[Prompt, ...]

    @property
    def texts(self) -> list[str]:
        return [prompt.text for prompt in self.prompts]

    @property
    def answers(self) -> list[str | None]:
        return [prompt.answer for prompt in self.prompts]

    @property
    def harmful(self) -> bool:
        return self.metric == REFUSAL_RATE


def describe_rows(dataset: str, split: str, rows: Sequence[int]) -> str:
    """ "ids 160-209" (MultiJail), "rows 170-199" (MGSM), "val 0-19" (PolyRefuse)."""
    label = {"multijail": "ids", "mgsm": "rows"}.get(dataset, split)
    if not rows:
        return f"{label} (none)"
    if list(rows) == list(range(rows[0], rows[-1] + 1)):
        return f"{label} {rows[0]}-{rows[-1]}"
    return f"{label} {','.join(map(str, rows))}"


def make_task(metric: str, dataset: str, lang: str, split: str, ids: Iterable[int] | None) -> Task:
    prompts = tuple(load_prompts(dataset, lang, split, ids=ids))
    split_text = describe_rows(dataset, split, [prompt.index for prompt in prompts])
    return Task(metric, dataset, lang, split_text, prompts)


def expand_suites(names: Sequence[str]) -> list[str]:
    """Data suites named by ``--suites`` (short or data names), in order, without repeats."""
    datasets: list[str] = []
    for name in names:
        if name not in SUITE_GROUPS:
            close = difflib.get_close_matches(name, SUITE_GROUPS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise DataError(
                f"unknown evaluation suite '{name}'",
                f"{hint}use one or more of: {', '.join(SUITE_GROUPS)}",
            )
        datasets += [d for d in SUITE_GROUPS[name] if d not in datasets]
    return datasets


def eval_tasks(
    suites: Sequence[str] = DEFAULT_SUITES,
    languages: Sequence[str] | None = None,
    n: int | None = None,
) -> list[Task]:
    """Held-out tasks of ``suites`` in ``languages`` (None: every language a suite has).

    English always comes first: every gap is measured against it. ``n`` keeps the first n
    held-out rows of each task. A language no chosen suite has is an error; one that only
    some suites have is measured where it exists.
    """
    datasets = expand_suites(suites)
    if n is not None and n <= 0:
        raise DataError(f"--n {n} leaves no prompts", "use a positive --n, or leave it out")
    if languages is not None:
        for lang in languages:
            check_language(lang)
        wanted = ["en", *(lang for lang in dict.fromkeys(languages) if lang != "en")]
        orphans = [lang for lang in wanted if not any(lang in suite_languages(d) for d in datasets)]
        if orphans:
            have = sorted({lang for d in datasets for lang in suite_languages(d)})
            raise DataError(
                f"no chosen suite has language(s) {', '.join(orphans)}",
                f"pick from {', '.join(have)} or add a suite that has them",
            )
    tasks = []
    for dataset in datasets:
        held = HELD_OUT[dataset]
        langs = suite_languages(dataset) if languages is None else wanted
        for lang in langs:
            if lang not in suite_languages(dataset):
                continue
            ids = held.rows
            if ids is None:
                ids = [p.index for p in load_prompts(dataset, lang, held.split)]
            ids = list(ids)[:n] if n is not None else ids
            tasks.append(make_task(held.metric, dataset, lang, held.split, ids))
    return tasks
