"""The few error types users see. Each message names the problem and the fix."""

from __future__ import annotations


class VSPError(Exception):
    """Base error: ``problem`` says what is wrong, ``fix`` what to do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}")


class DeltaFormatError(VSPError):
    """A delta file is unreadable, malformed or internally inconsistent."""


class DeltaMismatchError(VSPError):
    """A well-formed delta does not belong to the model it is applied to."""


class ModelPrepareError(VSPError):
    """The default model could not be fetched, checked or converted."""


class DataError(VSPError):
    """An unknown suite, split or language was asked for."""
