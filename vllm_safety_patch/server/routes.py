"""The HTTP routes: one router per concern (listing, activation)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from vllm_safety_patch.server.auth import require_admin, safety_state
from vllm_safety_patch.server.hotpatch import activate
from vllm_safety_patch.server.protocol import (
    ActivateRequest,
    ActivateResponse,
    DeltaListResponse,
    ErrorResponse,
)
from vllm_safety_patch.server.state import SafetyState

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 422, 500, 503)}

# Read-only: lists names and short digests from the delta folder, never paths. Open like
# /v1/models (vLLM's --api-key still guards it); the active set is in every header anyway.
listing_router = APIRouter(tags=["safety"])
# Changes the served weights: admin token required.
activation_router = APIRouter(tags=["safety"])


def _listing(state: SafetyState) -> DeltaListResponse:
    return DeltaListResponse(
        model=state.served_model,
        active=[entry.public() for entry in state.active],
        header=state.header(),
        available=[state.describe(name) for name in state.available_names()],
        hot_patch=state.engine is not None and state.hot_patch_problem is None,
        hot_patch_problem=state.hot_patch_problem,
        last_switch=state.last_switch,
    )


@listing_router.get("/v1/safety/deltas", response_model=DeltaListResponse, responses=ERRORS)
async def list_deltas(state: Annotated[SafetyState, Depends(safety_state)]) -> DeltaListResponse:
    """Delta sets in the server's delta folder, whether each fits the model, the active set."""
    # Reading files and hashing base tensors blocks: keep the event loop serving.
    return await asyncio.to_thread(_listing, state)


@activation_router.post(
    "/v1/safety/deltas/activate", response_model=ActivateResponse, responses=ERRORS
)
async def activate_deltas(
    body: ActivateRequest, state: Annotated[SafetyState, Depends(require_admin)]
) -> ActivateResponse:
    """Serve exactly these delta sets (names in the delta folder; [] = base weights)."""
    return await activate(state, list(body.deltas))
