"""Measure a delta's effect in-process on held-out rows: refusal of harmful prompts per
language, over-refusal of benign prompts, MGSM accuracy; before and after, same prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from vllm_safety_patch.data import suite_languages
from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.delta.manifest import EffectRow
from vllm_safety_patch.delta.merge import edit_weight, edits_by_tensor
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.eval.local_generation import generate_chat
from vllm_safety_patch.eval.scoring import (
    MGSM_ACCURACY,
    OTHER_LANGUAGE,
    OVER_REFUSAL,
    REFUSAL_RATE,
    keyword_hits,
    mgsm_correct,
    other_language_share,
)
from vllm_safety_patch.eval.suites import (
    MGSM_TOKENS,
    REFUSAL_TOKENS,
    Task,
    held_out_rows,
    make_task,
)

__all__ = [
    "ENGINES",
    "EffectSettings",
    "Generator",
    "Results",
    "deltas_merged_into",
    "engine_generator",
    "effect_jobs",
    "measure_effect",
    "mgsm_correct",
    "run_jobs",
    "transformers_generator",
    "vllm_generator",
]


class EffectSettings(BaseModel):
    """Held-out rows and generation lengths for the measured effect."""

    model_config = ConfigDict(extra="forbid")

    multijail_ids: tuple[int, int] = Field(
        default=held_out_rows("multijail"), description="held-out ids"
    )
    harmless_val: int = Field(default=20, ge=0, description="PolyRefuse harmless val per lang")
    everyday_rows: int = Field(
        default=64, ge=0, description="everyday benign rows per language (0: none)"
    )
    everyday_split: Literal["val", "test"] = Field(
        default="test",
        description="everyday rows: 'val' to compare solver options, 'test' for reported figures",
    )
    mgsm_rows: tuple[int, int] = Field(
        default=held_out_rows("mgsm"), description="held-out MGSM rows"
    )
    refusal_tokens: int = Field(default=REFUSAL_TOKENS, gt=0, description="to see a refusal")
    mgsm_tokens: int = Field(default=MGSM_TOKENS, gt=0, description="to finish the answer")
    batch_size: int = 16


def effect_jobs(languages: Sequence[str], settings: EffectSettings) -> list[Task]:
    """English is always measured: the edit must not lower its refusal."""
    jobs = []
    for lang in ["en", *languages]:
        if lang in suite_languages("multijail"):
            jobs.append(
                make_task(REFUSAL_RATE, "multijail", lang, "dev", range(*settings.multijail_ids))
            )
        if settings.harmless_val and lang in suite_languages("polyrefuse-harmless"):
            jobs.append(
                make_task(
                    OVER_REFUSAL, "polyrefuse-harmless", lang, "val", range(settings.harmless_val)
                )
            )
        if settings.everyday_rows and lang in suite_languages("everyday"):
            jobs.append(
                make_task(
                    OVER_REFUSAL,
                    "everyday",
                    lang,
                    settings.everyday_split,
                    range(settings.everyday_rows),
                )
            )
        rows = range(*settings.mgsm_rows)
        if rows and lang in suite_languages("mgsm"):
            jobs.append(make_task(MGSM_ACCURACY, "mgsm", lang, "dev", rows))
    return jobs


def _score(job: Task, replies: list[str]) -> float:
    hits = keyword_hits(job.metric, replies, job.lang, job.answers)
    return sum(hits) / max(len(hits), 1)


# (delta files, [(prompt, max_tokens)]) -> greedy replies under base + those deltas
Generator = Callable[[Sequence[Path], Sequence[tuple[str, int]]], list[str]]
Results = dict[tuple[str, str, str], tuple[float, list[str]]]


def run_jobs(
    generate: Generator, delta_paths: Sequence[Path], jobs: Sequence[Task], settings: EffectSettings
) -> Results:
    """Generate every job's replies in one call (one engine, full batching), then score."""
    requests = []
    for job in jobs:
        tokens = settings.mgsm_tokens if job.metric == MGSM_ACCURACY else settings.refusal_tokens
        requests += [(text, tokens) for text in job.texts]
    replies = generate(delta_paths, requests)
    results: Results = {}
    position = 0
    for job in jobs:
        mine = replies[position : position + len(job.texts)]
        position += len(job.texts)
        results[(job.metric, job.suite, job.lang)] = (_score(job, mine), mine)
    return results


ENGINES = ("vllm", "transformers")


def engine_generator(engine: str, model_dir: Path) -> Generator:
    """The in-process generator ``--engine`` names: ``vllm`` (an offline engine) or
    ``transformers`` (the model loaded here); any other name is an error, never a fallback."""
    if engine == "vllm":
        return vllm_generator(model_dir)
    if engine == "transformers":
        from vllm_safety_patch.models.hf import load_causal_lm

        hf_model, tokenizer = load_causal_lm(model_dir)
        return transformers_generator(hf_model, tokenizer)
    raise VSPError(
        f"unknown engine '{engine}'", "use " + " or ".join(f"--engine {name}" for name in ENGINES)
    )


def vllm_generator(model_dir: Path) -> Generator:
    from vllm_safety_patch.eval.vllm_offline import generate_with_vllm

    return lambda delta_paths, requests: generate_with_vllm(model_dir, delta_paths, requests)


def transformers_generator(model, tokenizer, batch_size: int = 16) -> Generator:
    """In-process generation with the deltas merged into (and then removed from) ``model``."""
    from vllm_safety_patch.delta.io import read_delta

    def generate(delta_paths: Sequence[Path], requests: Sequence[tuple[str, int]]) -> list[str]:
        deltas = [read_delta(path) for path in delta_paths]
        replies: list[str] = [""] * len(requests)
        with deltas_merged_into(model, deltas):
            for tokens in sorted({tokens for _, tokens in requests}):
                items = [i for i, (_, wanted) in enumerate(requests) if wanted == tokens]
                texts = [requests[i][0] for i in items]
                for i, reply in zip(
                    items, generate_chat(model, tokenizer, texts, tokens, batch_size), strict=True
                ):
                    replies[i] = reply
        return replies

    return generate


class deltas_merged_into:
    """Context manager: deltas merged into a loaded transformers model, restored on exit."""

    def __init__(self, model, deltas: Sequence[Delta]) -> None:
        self.model, self.deltas, self.saved = model, deltas, {}

    def __enter__(self):
        with torch.no_grad():
            for name, edits in edits_by_tensor(self.deltas).items():
                parameter = self.model.get_parameter(name)
                self.saved[name] = parameter.detach().clone()
                parameter.copy_(edit_weight(parameter, edits))
        return self.model

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for name, original in self.saved.items():
                self.model.get_parameter(name).copy_(original)


def measure_effect(
    generate: Generator,
    delta_path: Path,
    languages: Sequence[str],
    settings: EffectSettings,
    baseline: Results | None = None,
) -> tuple[list[EffectRow], Results, Results]:
    """Rows for ``languages`` + English, before (``baseline`` if given) and after the delta."""
    jobs = effect_jobs(languages, settings)
    before = baseline if baseline is not None else run_jobs(generate, [], jobs, settings)
    after = run_jobs(generate, [delta_path], jobs, settings)
    rows = [
        EffectRow(
            metric=job.metric,
            suite=job.suite,
            lang=job.lang,
            split=job.split,
            n=len(job.texts),
            before=round(before[(job.metric, job.suite, job.lang)][0], 4),
            after=round(after[(job.metric, job.suite, job.lang)][0], 4),
        )
        for job in jobs
    ]
    # The everyday replies once more: answered in the request's language?
    rows += [
        EffectRow(
            metric=OTHER_LANGUAGE,
            suite=job.suite,
            lang=job.lang,
            split=job.split,
            n=len(job.texts),
            before=round(
                other_language_share(before[(job.metric, job.suite, job.lang)][1], job.lang), 4
            ),
            after=round(
                other_language_share(after[(job.metric, job.suite, job.lang)][1], job.lang), 4
            ),
        )
        for job in jobs
        if job.suite == "everyday"
    ]
    return rows, before, after
