"""The schema of ``results.json``: every figure with its n, hits and Wilson interval, the
per-prompt outcomes behind it (for paired tests in ``vsp eval compare``), and judge
agreement."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.eval.stats import cohen_kappa, wilson_interval

ATTACK_SUCCESS = "attack_success_rate"  # 1 - refusal_rate, from the same outcomes
RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1


class Figure(BaseModel):
    """One rate: ``hits`` of ``n`` prompts, with its 95% Wilson interval."""

    model_config = ConfigDict(extra="forbid")

    suite: str
    metric: str
    lang: str
    judge: str
    split: str
    n: int
    hits: int
    rate: float
    ci_low: float
    ci_high: float
    ids: list[int] = Field(description="prompt indices, in the order of outcomes")
    outcomes: list[bool]
    unjudged: int = Field(0, description="replies the judge gave no readable verdict on")

    @classmethod
    def build(
        cls,
        suite: str,
        metric: str,
        lang: str,
        judge: str,
        split: str,
        ids: Sequence[int],
        outcomes: Sequence[bool | None],
    ) -> Figure:
        """A figure from per-prompt outcomes; ``None`` (no verdict) is left out of n."""
        kept = [(i, o) for i, o in zip(ids, outcomes, strict=True) if o is not None]
        hits = sum(o for _, o in kept)
        n = len(kept)
        low, high = wilson_interval(hits, n)
        return cls(
            suite=suite,
            metric=metric,
            lang=lang,
            judge=judge,
            split=split,
            n=n,
            hits=hits,
            rate=hits / n if n else 0.0,
            ci_low=low,
            ci_high=high,
            ids=[i for i, _ in kept],
            outcomes=[bool(o) for _, o in kept],
            unjudged=len(outcomes) - n,
        )

    def inverted(self, metric: str) -> Figure:
        """The complementary rate (attack success from refusal) from the same outcomes."""
        return Figure.build(
            self.suite,
            metric,
            self.lang,
            self.judge,
            self.split,
            self.ids,
            [not o for o in self.outcomes],
        ).model_copy(update={"unjudged": self.unjudged})


class Agreement(BaseModel):
    """How often two judges gave the same verdict on the same replies."""

    model_config = ConfigDict(extra="forbid")

    suite: str
    lang: str
    judges: tuple[str, str]
    n: int
    agree: int
    rate: float
    kappa: float | None
    no_verdict: int = Field(0, description="replies left out: a judge gave no readable verdict")

    @classmethod
    def build(
        cls,
        suite: str,
        lang: str,
        judges: tuple[str, str],
        a: Sequence[bool | None],
        b: Sequence[bool | None],
    ) -> Agreement:
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
        left = [x for x, _ in pairs]
        right = [y for _, y in pairs]
        agree = sum(x == y for x, y in pairs)
        return cls(
            suite=suite,
            lang=lang,
            judges=judges,
            n=len(pairs),
            agree=agree,
            rate=agree / len(pairs) if pairs else 0.0,
            kappa=cohen_kappa(left, right),
            no_verdict=len(a) - len(pairs),
        )


class RunInfo(BaseModel):
    """What was evaluated and how: enough to tell two results files apart."""

    model_config = ConfigDict(extra="forbid")

    label: str
    source: dict[str, Any]
    suites: list[str]
    languages: list[str]
    n: int | None
    judges: list[str]
    refusal_tokens: int
    mgsm_tokens: int
    started: str
    seconds: float
    requests: int
    cached: int


class EvalResults(BaseModel):
    """Everything ``vsp eval`` measured in one run."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    run: RunInfo
    figures: list[Figure]
    agreement: list[Agreement] = []

    def find(self, suite: str, metric: str, lang: str, judge: str) -> Figure | None:
        for figure in self.figures:
            if (figure.suite, figure.metric, figure.lang, figure.judge) == (
                suite,
                metric,
                lang,
                judge,
            ):
                return figure
        return None

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RESULTS_FILE
        path.write_text(self.model_dump_json(indent=1), encoding="utf-8")
        return path


def read_results(folder: Path) -> EvalResults:
    """``folder/results.json`` (or a results file given directly)."""
    path = folder if folder.is_file() else folder / RESULTS_FILE
    if not path.is_file():
        raise VSPError(
            f"no {RESULTS_FILE} in {folder}", "pass a folder written by 'vsp eval --out DIR'"
        )
    try:
        return EvalResults.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as error:
        raise VSPError(
            f"{path} is not a vsp eval results file ({error.error_count()} schema errors)",
            "re-run 'vsp eval' to write it again",
        ) from error
