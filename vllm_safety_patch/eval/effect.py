"""Measure a delta's effect in-process on held-out rows: refusal of harmful prompts per
language, over-refusal of benign prompts, MGSM accuracy; before and after, same prompts."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from vllm_safety_patch.data import load_prompts, suite_languages
from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.delta.manifest import EffectRow
from vllm_safety_patch.delta.merge import edit_weight, edits_by_tensor
from vllm_safety_patch.eval.local_generation import generate_chat
from vllm_safety_patch.judge.refusal import is_refusal


class EffectSettings(BaseModel):
    """Held-out rows and generation lengths for the measured effect."""

    model_config = ConfigDict(extra="forbid")

    multijail_ids: tuple[int, int] = Field(default=(160, 210), description="held-out ids")
    harmless_val: int = Field(default=20, ge=0, description="PolyRefuse harmless val per lang")
    mgsm_rows: tuple[int, int] = Field(default=(170, 200), description="held-out MGSM rows")
    refusal_tokens: int = Field(default=48, gt=0, description="enough to see a refusal")
    mgsm_tokens: int = Field(default=320, gt=0, description="enough to finish the answer")
    batch_size: int = 16


@dataclass(frozen=True)
class _Job:
    metric: str
    suite: str
    lang: str
    split: str
    texts: list[str]
    answers: list[str | None]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def mgsm_correct(reply: str, answer: str | None) -> bool:
    """Exact match of the last number in the reply with the answer (commas ignored)."""
    numbers = _NUMBER.findall(reply)
    if not numbers or answer is None:
        return False
    try:
        return float(numbers[-1].replace(",", "")) == float(answer.replace(",", ""))
    except ValueError:
        return False


def effect_jobs(languages: Sequence[str], settings: EffectSettings) -> list[_Job]:
    """English is always measured: the edit must not lower its refusal."""
    jobs = []
    ids = range(*settings.multijail_ids)
    split = f"ids {ids.start}-{ids.stop - 1}"
    for lang in ["en", *languages]:
        if lang in suite_languages("multijail"):
            prompts = load_prompts("multijail", lang, ids=ids)
            jobs.append(
                _Job(
                    "refusal_rate",
                    "multijail",
                    lang,
                    split,
                    [p.text for p in prompts],
                    [None] * len(prompts),
                )
            )
        if settings.harmless_val and lang in suite_languages("polyrefuse-harmless"):
            prompts = load_prompts(
                "polyrefuse-harmless", lang, "val", ids=range(settings.harmless_val)
            )
            jobs.append(
                _Job(
                    "over_refusal",
                    "polyrefuse-harmless",
                    lang,
                    f"val 0-{settings.harmless_val - 1}",
                    [p.text for p in prompts],
                    [None] * len(prompts),
                )
            )
        rows = range(*settings.mgsm_rows)
        if rows and lang in suite_languages("mgsm"):
            prompts = load_prompts("mgsm", lang, ids=rows)
            jobs.append(
                _Job(
                    "mgsm_accuracy",
                    "mgsm",
                    lang,
                    f"rows {rows.start}-{rows.stop - 1}",
                    [p.text for p in prompts],
                    [p.answer for p in prompts],
                )
            )
    return jobs


def _score(job: _Job, replies: list[str]) -> float:
    if job.metric == "mgsm_accuracy":
        hits = [
            mgsm_correct(reply, answer) for reply, answer in zip(replies, job.answers, strict=True)
        ]
    else:
        hits = [is_refusal(reply, job.lang) for reply in replies]
    return sum(hits) / max(len(hits), 1)


# (delta files, [(prompt, max_tokens)]) -> greedy replies under base + those deltas
Generator = Callable[[Sequence[Path], Sequence[tuple[str, int]]], list[str]]
Results = dict[tuple[str, str, str], tuple[float, list[str]]]


def run_jobs(
    generate: Generator, delta_paths: Sequence[Path], jobs: Sequence[_Job], settings: EffectSettings
) -> Results:
    """Generate every job's replies in one call (one engine, full batching), then score."""
    requests = []
    for job in jobs:
        tokens = settings.mgsm_tokens if job.metric == "mgsm_accuracy" else settings.refusal_tokens
        requests += [(text, tokens) for text in job.texts]
    replies = generate(delta_paths, requests)
    results: Results = {}
    position = 0
    for job in jobs:
        mine = replies[position : position + len(job.texts)]
        position += len(job.texts)
        results[(job.metric, job.suite, job.lang)] = (_score(job, mine), mine)
    return results


def vllm_generator(model_dir: Path) -> Generator:
    from vllm_safety_patch.eval.vllm_offline import generate_with_vllm

    return lambda delta_paths, requests: generate_with_vllm(model_dir, delta_paths, requests)


def transformers_generator(model, tokenizer, batch_size: int = 16) -> Generator:
    """In-process generation with the deltas merged into (and then removed from) ``model``."""
    from vllm_safety_patch.delta.io import read_delta

    def generate(delta_paths: Sequence[Path], requests: Sequence[tuple[str, int]]) -> list[str]:
        deltas = [read_delta(path) for path in delta_paths]
        replies: list[str] = [""] * len(requests)
        with applied_deltas(model, deltas):
            for tokens in sorted({tokens for _, tokens in requests}):
                items = [i for i, (_, wanted) in enumerate(requests) if wanted == tokens]
                texts = [requests[i][0] for i in items]
                for i, reply in zip(
                    items, generate_chat(model, tokenizer, texts, tokens, batch_size), strict=True
                ):
                    replies[i] = reply
        return replies

    return generate


class applied_deltas:
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
    return rows, before, after
