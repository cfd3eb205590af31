"""Admin authentication for the routes that change (or reveal) the served weights.

vLLM's ``--api-key`` does not cover plugin semantics (and dev-mode routes are not covered at
all), so the admin routes carry their own check: ``Authorization: Bearer <token>``, compared
in constant time. With ``--api-key`` set, vLLM's middleware already claims the Authorization
header for every /v1 path; the admin token then travels in ``X-VSP-Admin-Token`` instead.
Never a 2xx without the token: no token configured is 403, a missing or wrong one 401.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from vllm_safety_patch.server import ADMIN_HEADER
from vllm_safety_patch.server.errors import SafetyAPIError
from vllm_safety_patch.server.state import SafetyState
from vllm_safety_patch.settings import TOKEN_FIX


def safety_state(request: Request) -> SafetyState:
    state = getattr(request.app.state, "vsp_safety", None)
    if state is None:  # init_state has not run: not a server we can answer for
        raise SafetyAPIError(
            503,
            "the safety plugin is not initialised on this server",
            "start the server with 'vsp serve' (VLLM_PLUGINS must name vllm_safety_patch_server)",
            "unavailable",
        )
    return state


def _presented(request: Request) -> list[str]:
    tokens = []
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        tokens.append(value.strip())
    if request.headers.get(ADMIN_HEADER, "").strip():
        tokens.append(request.headers[ADMIN_HEADER].strip())
    return tokens


def require_admin(request: Request) -> SafetyState:
    """FastAPI dependency: the state, if the request carries the admin token."""
    state = safety_state(request)
    if state.admin_token is None:
        raise SafetyAPIError(
            403, "admin routes are disabled: this server has no admin token", TOKEN_FIX, "forbidden"
        )
    expected = state.admin_token.encode()
    presented = _presented(request)
    # Compare every presented token (no early exit) so timing says nothing about which matched.
    matched = False
    for token in presented:
        matched |= hmac.compare_digest(token.encode(), expected)
    if not matched:
        problem = "wrong admin token" if presented else "no admin token in the request"
        raise SafetyAPIError(
            401,
            problem,
            f"send 'Authorization: Bearer <token>' (or '{ADMIN_HEADER}: <token>' when the "
            "server uses --api-key) with the token the server was started with",
            "unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="vsp-admin"'},
        )
    return state
