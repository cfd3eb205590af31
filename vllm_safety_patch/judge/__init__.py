"""Judging model responses: the project's one refusal classifier (see :mod:`.refusal`)."""

from vllm_safety_patch.judge.refusal import (
    MARKERS,
    WINDOW_CHARS,
    Marker,
    RefusalVerdict,
    is_refusal,
    judge_many,
    normalize,
    refusal_verdict,
)

__all__ = [
    "MARKERS",
    "WINDOW_CHARS",
    "Marker",
    "RefusalVerdict",
    "is_refusal",
    "judge_many",
    "normalize",
    "refusal_verdict",
]
