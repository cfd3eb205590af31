"""Request and response bodies of the safety routes (JSON, pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from vllm_safety_patch import settings
from vllm_safety_patch.languages import LANGUAGE_NAMES

MAX_DELTAS_PER_REQUEST = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LanguageEffectInfo(_Body):
    """Both sides of one language's measured effect (held-out rows; rates 0-1)."""

    lang: str
    harmful_before: float | None = Field(None, description="MultiJail refusal, base")
    harmful_after: float | None = Field(None, description="MultiJail refusal, with the delta")
    benign_before: float | None = Field(None, description="everyday-benign refusal, base")
    benign_after: float | None = Field(None, description="everyday-benign refusal, with it")
    benign_n: int = 0


class DeltaInfo(_Body):
    """One delta file in the server's delta folder."""

    name: str = Field(description="what to pass to activate: the file name without .safetensors")
    group: str | None = Field(None, description="language group from the manifest")
    languages: list[str] = Field(default_factory=list)
    fingerprint: str | None = Field(None, description="base-model fingerprint, 12 characters")
    sha256: str | None = Field(
        None,
        description="digest of the file, 12 characters; null until the server has read the "
        "whole file (at start-up or activation): the listing reads headers only",
    )
    matches_model: bool = Field(
        description="its header fits the served checkpoint (architecture, shapes, fingerprint);"
        " the tensor data is checked when it is activated"
    )
    active: bool = False
    problem: str | None = Field(None, description="why it cannot be activated, if it cannot")
    effect: list[LanguageEffectInfo] = Field(
        default_factory=list,
        description="its manifest's measured effect: English and each of its languages",
    )
    flags: list[str] = Field(
        default_factory=list,
        description="a language without an everyday-benign figure, or whose benign refusal "
        "rose more than 3 points (delta/effect_review.py)",
    )


class ActiveDelta(_Body):
    """One delta merged into the weights being served."""

    name: str | None = Field(description="name in the delta folder; null if loaded from elsewhere")
    group: str
    fingerprint: str = Field(description="12 characters")
    sha256: str = Field(description="12 characters")


class SwitchRecord(_Body):
    """What the last weight switch did and how long it took."""

    from_deltas: list[str] = Field(description="header value before the switch")
    to_deltas: list[str] = Field(description="header value after the switch")
    tensors: int = Field(description="HF tensors reloaded on every worker")
    verify_seconds: float = Field(description="reading and checking the new set (no pause)")
    drain_seconds: float = Field(description="waiting for in-flight requests to finish")
    reload_seconds: float = Field(description="weights reloaded + prefix cache reset (paused)")
    canary_seconds: float | None = Field(
        None,
        description="the canary's probes on the new weights, and the restore after a dry run "
        "(gate still closed); null when skipped",
    )
    total_seconds: float
    finished_at: float = Field(description="Unix time")


class DeltaListResponse(_Body):
    """``GET /v1/safety/deltas``."""

    model: str = Field(description="served model name")
    active: list[ActiveDelta]
    header: str = Field(description="the X-Safety-Deltas value for the active set")
    available: list[DeltaInfo]
    hot_patch: bool = Field(description="whether POST /v1/safety/deltas/activate can work")
    hot_patch_problem: str | None = Field(
        None, description="why not, in words for any reader (the server log has the detail)"
    )
    switching: bool = Field(
        False,
        description="an activation or check runs now: the active set may change when it ends "
        "(a fleet rollout waits for this to clear before it decides what a replica serves)",
    )
    last_switch: SwitchRecord | None = None


class LanguageThreshold(_Body):
    """One language's canary thresholds, as shares of its probe prompts."""

    harmful_min: float | None = Field(
        None, ge=0, le=1, description="least share of harmful probes that must be refused"
    )
    benign_max: float | None = Field(
        None, ge=0, le=1, description="largest share of benign probes that may be refused"
    )


class CanaryOptions(_Body):
    """Per-request canary settings; each left out takes the server's (``VSP_CANARY_*``)."""

    prompts: int | None = Field(
        None,
        ge=settings.CANARY_PROMPTS.low,
        le=settings.CANARY_PROMPTS.high,
        description="probes per language and kind",
    )
    max_tokens: int | None = Field(
        None,
        ge=settings.CANARY_MAX_TOKENS.low,
        le=settings.CANARY_MAX_TOKENS.high,
        description="tokens per probe reply",
    )
    thresholds: dict[str, LanguageThreshold] = Field(
        default_factory=dict,
        description="by ISO 639-1 code; win over the settings and the manifests",
    )

    @field_validator("thresholds")
    @classmethod
    def _languages(cls, value: dict[str, LanguageThreshold]) -> dict[str, LanguageThreshold]:
        unknown = [lang for lang in value if lang not in LANGUAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown language code {unknown[0][:20]!r}")
        return value


class CanaryLanguage(_Body):
    """One row of the canary's table."""

    language: str
    harmful_refused: int
    harmful_n: int
    harmful_min: float | None = Field(description="threshold (share); null: no harmful rule")
    harmful_source: str = Field(description="request | settings | baseline | manifest | none")
    harmful_reference: float | None = Field(
        None, description="the refusal rate the binomial rule tested against (null: a share)"
    )
    harmful_fails_at: int | None = Field(
        None, description="this many harmful refusals or fewer fail; null: no count fails"
    )
    benign_refused: int
    benign_n: int
    benign_max: float | None = Field(description="threshold (share)")
    benign_source: str = Field(description="request | settings | baseline | manifest | default")
    benign_reference: float | None = Field(
        None, description="the over-refusal the binomial rule tested against (null: a share)"
    )
    benign_fails_at: int | None = Field(
        None, description="this many benign refusals or more fail; null: no count fails"
    )
    verdict: Literal["pass", "fail", "not probed"]
    reason: str | None = None


class CanaryReport(_Body):
    """What the canary saw on the live engine, per language."""

    delta_set: str = Field(description="X-Safety-Deltas value of the set probed")
    passed: bool
    prompts: int = Field(description="probes per language and kind (fewer if rows did not fit)")
    max_tokens: int
    seconds: float
    languages: list[CanaryLanguage]


class ActivateRequest(_Body):
    """``POST /v1/safety/deltas/activate``: names in the delta folder; [] serves base weights."""

    deltas: list[str] = Field(max_length=MAX_DELTAS_PER_REQUEST)
    dry_run: StrictBool = Field(
        False, description="switch, run the canary, and restore the previous set whatever it says"
    )
    canary: StrictBool | CanaryOptions = Field(
        True, description="false skips the canary (explicitly); an object sets its options"
    )


class CheckRequest(_Body):
    """``POST /v1/safety/deltas/check``: what activate would do, without switching."""

    deltas: list[str] = Field(max_length=MAX_DELTAS_PER_REQUEST)


class CheckResponse(_Body):
    changed: bool = Field(description="whether activating these would change the served set")
    active: list[ActiveDelta] = Field(description="the set served now")
    header: str
    requested: list[ActiveDelta] = Field(description="the set these names resolve to here")
    requested_header: str


class ActivateResponse(_Body):
    changed: bool = Field(description="false when the requested set was already active")
    active: list[ActiveDelta]
    header: str
    switch: SwitchRecord | None = None
    dry_run: bool = False
    canary: CanaryReport | None = Field(None, description="null when skipped or nothing changed")


class ErrorDetail(_Body):
    message: str = Field(description="problem and fix in one line")
    type: str
    code: int
    problem: str
    fix: str


class ErrorResponse(_Body):
    """Every refusal of the safety routes (OpenAI-style ``error`` object + problem/fix)."""

    error: ErrorDetail
    canary: CanaryReport | None = Field(None, description="the table, when the canary failed")
