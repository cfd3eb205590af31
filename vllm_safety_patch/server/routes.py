"""The HTTP routes: one router per concern (listing, activation), and the allow-list of the
vLLM routes ``vsp serve`` keeps."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.routing import BaseRoute, Mount, Router

from vllm_safety_patch.server.auth import require_admin, safety_state
from vllm_safety_patch.server.hotpatch import activate, check
from vllm_safety_patch.server.protocol import (
    ActivateRequest,
    ActivateResponse,
    CheckRequest,
    CheckResponse,
    DeltaListResponse,
    ErrorResponse,
)
from vllm_safety_patch.server.state import SafetyState

logger = logging.getLogger(f"vllm.{__name__}")

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
        available=state.available(),
        hot_patch=state.engine is not None and state.hot_patch_problem is None,
        hot_patch_problem=state.hot_patch_problem,
        switching=state.switch_lock.locked(),
        last_switch=state.last_switch,
    )


@listing_router.get("/v1/safety/deltas", response_model=DeltaListResponse, responses=ERRORS)
async def list_deltas(state: Annotated[SafetyState, Depends(safety_state)]) -> DeltaListResponse:
    """Delta sets in the server's delta folder, whether each fits the model, the active set."""
    # Stats files, and reads headers of new ones (hashing base tensors once): blocking.
    return await asyncio.to_thread(_listing, state)


@activation_router.post(
    "/v1/safety/deltas/activate", response_model=ActivateResponse, responses=ERRORS
)
async def activate_deltas(
    body: ActivateRequest, state: Annotated[SafetyState, Depends(require_admin)]
) -> ActivateResponse:
    """Serve exactly these delta sets (names in the delta folder; [] = base weights), once
    the canary passed on the live engine (``canary``, ``dry_run``: see ActivateRequest)."""
    return await activate(state, body)


@activation_router.post("/v1/safety/deltas/check", response_model=CheckResponse, responses=ERRORS)
async def check_deltas(
    body: CheckRequest, state: Annotated[SafetyState, Depends(require_admin)]
) -> CheckResponse:
    """Read and check these delta sets here and on every worker, without switching: what a
    fleet rollout asks every replica before it switches any."""
    return await check(state, list(body.deltas))


# ---------------------------------------------------------------------------------------
# The allow-list: every other route of vLLM's app is removed before the server answers
# ---------------------------------------------------------------------------------------

_GET, _POST, _PAGE = frozenset({"GET"}), frozenset({"POST"}), frozenset({"GET", "HEAD"})
# Reviewed against vLLM 0.32 (every task, dev mode, runtime LoRA, fault tolerance). Kept:
# inference (POST: it passes the switch gate), render-only routes, and read-only status.
# Removed, because they change the engine or the weights with no authentication
# (``--api-key`` guards only /v1, /v2, /inference and /cohere paths): /scale_elastic_ep,
# /is_scaling_elastic_ep, /abort_requests, /inference/v1/abort_requests, runtime LoRA
# (/v1/load_lora_adapter, /v1/unload_lora_adapter, /adapters), every dev-mode route
# (/collective_rpc, /update_weights, /pause, /sleep, /reset_prefix_cache, ...),
# /fault_tolerance/*, /start_profile, /stop_profile; and the websocket /v1/realtime, which
# the switch gate cannot hold. A route a later vLLM adds is removed until it is listed here.
ALLOWED_ROUTES: dict[str, frozenset[str]] = {
    # status and documentation
    "/health": _GET,
    "/ping": frozenset({"GET", "POST"}),  # SageMaker health check
    "/load": _GET,
    "/version": _GET,
    "/v1/models": _GET,
    "/metrics": _GET,
    "/tokenizer_info": _GET,
    "/openapi.json": _PAGE,
    "/docs": _PAGE,
    "/docs/oauth2-redirect": _PAGE,
    "/redoc": _PAGE,
    # inference
    "/v1/completions": _POST,
    "/v1/chat/completions": _POST,
    "/v1/chat/completions/batch": _POST,
    "/v1/responses": _POST,
    "/v1/responses/{response_id}": _GET,
    "/v1/responses/{response_id}/cancel": _POST,  # a client's own background response
    "/v1/messages": _POST,
    "/v1/messages/count_tokens": _POST,
    "/tokenize": _POST,
    "/detokenize": _POST,
    "/invocations": _POST,  # SageMaker: dispatches to the inference routes above
    "/v1/systemone": _POST,
    "/generative_scoring": _POST,
    "/inference/v1/generate": _POST,
    "/v1/audio/transcriptions": _POST,
    "/v1/audio/translations": _POST,
    "/v1/embeddings": _POST,
    "/v2/embed": _POST,
    "/pooling": _POST,
    "/classify": _POST,
    "/score": _POST,
    "/v1/score": _POST,
    "/rerank": _POST,
    "/v1/rerank": _POST,
    "/v2/rerank": _POST,
    # prompt rendering only (no model)
    "/v1/chat/completions/render": _POST,
    "/v1/completions/render": _POST,
    "/v1/messages/render": _POST,
    "/v1/responses/render": _POST,
    "/v1/chat/completions/derender": _POST,
    "/v1/completions/derender": _POST,
    # ours (activation and check check the admin token themselves)
    "/v1/safety/deltas": _GET,
    "/v1/safety/deltas/activate": _POST,
    "/v1/safety/deltas/check": _POST,
}
# Mounted apps: Prometheus' exporter, and the offline docs' static files.
ALLOWED_MOUNTS = frozenset({"/metrics", "/static"})


def route_allowed(route: BaseRoute) -> bool:
    if isinstance(route, Mount):
        return route.path in ALLOWED_MOUNTS
    methods: Any = getattr(route, "methods", None)
    path = getattr(route, "path", None)
    if not methods or not isinstance(path, str):  # websockets, hosts, anything unknown
        return False
    return set(methods) <= ALLOWED_ROUTES.get(path, frozenset())


def describe_route(route: BaseRoute) -> str:
    methods = ",".join(sorted(getattr(route, "methods", None) or ())) or type(route).__name__
    return f"{methods} {getattr(route, 'path', '?')}"


def remove_unlisted_routes(router: Router) -> list[str]:
    """Drop every route not on the allow-list from ``router``; what was removed."""
    kept = [route for route in router.routes if route_allowed(route)]
    removed = [describe_route(route) for route in router.routes if not route_allowed(route)]
    router.routes[:] = kept
    return removed


class RouteGuard:
    """Applies the allow-list when the app's middleware is built, and again on every call
    that finds the route table changed (a length check): routes added after the stack was
    built, as SageMaker's are, are removed before the first request is routed."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.seen = -1

    def __call__(self) -> None:
        if len(self.router.routes) == self.seen:
            return
        removed = remove_unlisted_routes(self.router)
        self.seen = len(self.router.routes)
        if removed:
            logger.info(
                "vsp: removed %d vLLM routes that are not on vsp's allow-list (they change "
                "the engine, or are not reviewed yet): %s",
                len(removed),
                "; ".join(removed),
            )
