"""Request and response bodies of the safety routes (JSON, pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_DELTAS_PER_REQUEST = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    total_seconds: float
    finished_at: float = Field(description="Unix time")


class DeltaListResponse(_Body):
    """``GET /v1/safety/deltas``."""

    model: str = Field(description="served model name")
    active: list[ActiveDelta]
    header: str = Field(description="the X-Safety-Deltas value for the active set")
    available: list[DeltaInfo]
    hot_patch: bool = Field(description="whether POST /v1/safety/deltas/activate can work")
    hot_patch_problem: str | None = None
    last_switch: SwitchRecord | None = None


class ActivateRequest(_Body):
    """``POST /v1/safety/deltas/activate``: names in the delta folder; [] serves base weights."""

    deltas: list[str] = Field(max_length=MAX_DELTAS_PER_REQUEST)


class ActivateResponse(_Body):
    changed: bool = Field(description="false when the requested set was already active")
    active: list[ActiveDelta]
    header: str
    switch: SwitchRecord | None = None


class ErrorDetail(_Body):
    message: str = Field(description="problem and fix in one line")
    type: str
    code: int
    problem: str
    fix: str


class ErrorResponse(_Body):
    """Every refusal of the safety routes (OpenAI-style ``error`` object + problem/fix)."""

    error: ErrorDetail
