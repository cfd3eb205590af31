"""The one error type of the safety routes, rendered as a JSON body naming problem and fix."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import JSONResponse

from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.server.protocol import CanaryReport, ErrorDetail, ErrorResponse


class SafetyAPIError(Exception):
    """Raised by a safety route; answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        problem: str,
        fix: str,
        kind: str = "safety_error",
        headers: Mapping[str, str] | None = None,
        failure: str | None = None,
        canary: CanaryReport | None = None,
    ) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.status = status
        self.problem = problem
        self.fix = fix
        self.kind = kind
        self.headers = dict(headers or {})
        # Set when a switch was attempted and failed: the reason label it is counted under
        # in vsp_hotpatch_failures_total (a refused request is not a failed switch).
        self.failure = failure
        # The probe table, when the canary refused the new set (422).
        self.canary = canary

    @classmethod
    def from_vsp(cls, status: int, error: VSPError, kind: str) -> SafetyAPIError:
        return cls(status, error.problem, error.fix, kind)

    def body(self) -> dict:
        detail = ErrorDetail(
            message=str(self), type=self.kind, code=self.status, problem=self.problem, fix=self.fix
        )
        body = ErrorResponse(error=detail, canary=self.canary).model_dump()
        if body["canary"] is None:  # only a canary failure carries the table
            del body["canary"]
        return body


def error_response(error: SafetyAPIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def handle_safety_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SafetyAPIError)
    return error_response(error)
