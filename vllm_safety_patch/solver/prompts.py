"""The prompts a solve reads, with their roles, drawn from the bundled development data."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_safety_patch.data import data_digest, load_prompts, suite_languages
from vllm_safety_patch.errors import DataError
from vllm_safety_patch.solver.settings import DataSettings


@dataclass(frozen=True)
class SolvePrompt:
    text: str
    lang: str
    # English list: "harmful_en", "harmless_en" (neuron scoring), "benign_en" (everyday);
    # others: "harmful_lr", "benign" (no twin), "benign_lr" (everyday, has an English twin)
    role: str
    pair: str | None  # "<suite>:<index>" linking a low-resource prompt to its English twin


@dataclass(frozen=True)
class SolveData:
    english: list[SolvePrompt]  # harmful twins and harmless, scored for neuron selection
    others: list[SolvePrompt]  # low-resource harmful prompts and benign prompts
    digests: dict[str, str]


def gather_solve_data(languages: list[str], settings: DataSettings) -> SolveData:
    """English twins, low-resource pairs for ``languages`` and benign prompts."""
    digests: dict[str, str] = {}
    english: list[SolvePrompt] = []
    others: list[SolvePrompt] = []

    def note(suite: str, lang: str, split: str | None = None) -> None:
        digests[f"{suite}/{split or 'dev'}/{lang}"] = data_digest(suite, lang, split)

    multijail_ids = range(*settings.multijail_ids)
    for prompt in load_prompts("multijail", "en", ids=multijail_ids):
        english.append(SolvePrompt(prompt.text, "en", "harmful_en", f"multijail:{prompt.index}"))
    note("multijail", "en")
    polyrefuse_ids = range(settings.polyrefuse_pairs)
    if settings.polyrefuse_pairs:
        for prompt in load_prompts("polyrefuse-harmful", "en", "train", ids=polyrefuse_ids):
            pair = f"polyrefuse:{prompt.index}"
            english.append(SolvePrompt(prompt.text, "en", "harmful_en", pair))
        note("polyrefuse-harmful", "en", "train")
    harmless_ids = range(settings.english_harmless)
    for prompt in load_prompts("polyrefuse-harmless", "en", "train", ids=harmless_ids):
        english.append(SolvePrompt(prompt.text, "en", "harmless_en", None))
    note("polyrefuse-harmless", "en", "train")
    everyday_ids = range(settings.everyday_rows)
    if settings.everyday_rows:
        for prompt in load_prompts("everyday", "en", "train", ids=everyday_ids):
            english.append(SolvePrompt(prompt.text, "en", "benign_en", f"everyday:{prompt.index}"))
        note("everyday", "en", "train")

    for lang in languages:
        paired = 0
        if lang in suite_languages("multijail"):
            for prompt in load_prompts("multijail", lang, ids=multijail_ids):
                pair = f"multijail:{prompt.index}"
                others.append(SolvePrompt(prompt.text, lang, "harmful_lr", pair))
                paired += 1
        if settings.polyrefuse_pairs and lang in suite_languages("polyrefuse-harmful"):
            for prompt in load_prompts("polyrefuse-harmful", lang, "train", ids=polyrefuse_ids):
                pair = f"polyrefuse:{prompt.index}"
                others.append(SolvePrompt(prompt.text, lang, "harmful_lr", pair))
                paired += 1
            note("polyrefuse-harmful", lang, "train")
        if not paired:
            raise DataError(
                f"no paired harmful data for language '{lang}'",
                "pair data exists for: "
                + ", ".join(sorted(set(suite_languages("multijail")) - {"en"})),
            )

    benign_ids = range(settings.benign_per_language)
    for lang in ["en", *languages]:
        if lang != "en" and settings.benign_per_language:
            if lang in suite_languages("polyrefuse-harmless"):
                for prompt in load_prompts("polyrefuse-harmless", lang, "train", ids=benign_ids):
                    others.append(SolvePrompt(prompt.text, lang, "benign", None))
                note("polyrefuse-harmless", lang, "train")
        if lang != "en" and settings.everyday_rows:
            if lang not in suite_languages("everyday"):
                raise DataError(
                    f"the everyday benign set has no language '{lang}'",
                    "set everyday_rows = 0 or add its translation to the everyday suite",
                )
            for prompt in load_prompts("everyday", lang, "train", ids=everyday_ids):
                pair = f"everyday:{prompt.index}"
                others.append(SolvePrompt(prompt.text, lang, "benign_lr", pair))
            note("everyday", lang, "train")
        if lang in suite_languages("mgsm") and settings.mgsm_rows[1] > settings.mgsm_rows[0]:
            for prompt in load_prompts("mgsm", lang, ids=range(*settings.mgsm_rows)):
                others.append(SolvePrompt(prompt.text, lang, "benign", None))
            note("mgsm", lang)
    return SolveData(english=english, others=others, digests=digests)
