"""Outermost ASGI layer: the ``X-Safety-Deltas`` header on every response, the gate, and
the route allow-list.

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched. It is
installed around vLLM's whole middleware stack (see ``plugin.py``), so even a 401 from
vLLM's ``--api-key`` check or a 404 carries the header.

An inference request enters the switch gate (``gate.py``) only once its body has been read,
which is when vLLM hands it to the engine: a client that sends headers and no body holds
nothing. Once inside, every write to the client is bounded: a write that waits longer than
``send_stall_timeout_s`` (a reader that stopped reading, with the socket buffers full) ends
the request, so a reader that never reads cannot hold a switch, or the gate, for longer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.datastructures import MutableHeaders, State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_safety_patch import settings
from vllm_safety_patch.server import metrics
from vllm_safety_patch.server.errors import SafetyAPIError, error_response
from vllm_safety_patch.server.lora import MAX_BODY_BYTES, labels_from_env, requested_model
from vllm_safety_patch.server.state import HEADER, SafetyState

SAFETY_PREFIX = "/v1/safety/"
logger = logging.getLogger(f"vllm.{__name__}")


def runs_inference(scope: Scope) -> bool:
    """Requests that may reach the model: every POST except our own routes.

    vLLM's inference routes are all POST (completions, chat, responses, embeddings,
    tokenize, invocations, ...); GETs (health, models, metrics) never run the model.
    """
    root = scope.get("root_path", "")
    path = scope["path"].removeprefix(root)
    return scope.get("method") == "POST" and not path.startswith(SAFETY_PREFIX)


def degraded_error(safety: SafetyState) -> SafetyAPIError:
    """What a user is told: no path and no worker error (the log and the admin routes
    have the detail, under the same incident id)."""
    return SafetyAPIError(
        503,
        "this server cannot answer: a failed weight switch left its weights unknown "
        f"(incident {safety.incident})",
        "send the request to another replica; the operator restarts this one (vsp serve), "
        "and its log names the cause under the incident id",
        "degraded",
        headers={"Retry-After": "30"},
    )


class _Refused(Exception):
    """Raised into the app from ``receive``: the server degraded while the request waited."""


class ClientStalledError(Exception):
    """Raised into the app from ``send``: the client read nothing for the stall timeout."""


class Admission:
    """One inference request's place in the switch gate.

    It is counted from the moment the app has read the whole body (the next step is the
    engine) until the middleware returns; never before, so a request whose body never
    comes cannot delay a switch.
    """

    def __init__(self, safety: SafetyState) -> None:
        self.safety = safety
        self.entered = False
        self.refused = False  # degraded while waiting: the middleware answers 503 itself
        self.stalled = False  # a write waited longer than the stall timeout

    def wrap_receive(self, receive: Receive) -> Receive:
        async def counted_receive() -> Message:
            message = await receive()
            if (
                not self.entered
                and message["type"] == "http.request"
                and not message.get("more_body", False)
            ):
                await self.safety.gate.enter()  # waits only while a switch runs
                self.entered = True
                if self.safety.degraded is not None:
                    self.refused = True
                    raise _Refused(self.safety.degraded)
            return message

        return counted_receive

    def wrap_send(self, send: Send) -> Send:
        async def bounded_send(message: Message) -> None:
            if self.refused:  # whatever the app answers to _Refused is replaced by a 503
                return
            if self.stalled:  # the app tries to write on (an error event): no second wait
                raise ClientStalledError("the client stopped reading")
            try:
                async with asyncio.timeout(self.safety.send_stall_timeout_s):
                    await send(message)
            except TimeoutError:
                self.stalled = True
                raise ClientStalledError(
                    f"the client read nothing for {self.safety.send_stall_timeout_s:g} s"
                ) from None

        return bounded_send

    async def leave(self) -> None:
        if self.entered:
            self.entered = False
            await self.safety.gate.leave()


def bound_shutdown(app_state: State, safety: SafetyState) -> None:
    """Give uvicorn a graceful-shutdown timeout (vLLM sets none, so uvicorn would wait for
    every open connection forever: a client that sent headers and no body kept a server
    alive for minutes after SIGTERM). vLLM stores its uvicorn server on ``app.state`` before
    serving; the lifespan start-up that reaches here comes after."""
    server = getattr(app_state, "server", None)
    config = getattr(server, "config", None)
    if config is not None and config.timeout_graceful_shutdown is None:
        config.timeout_graceful_shutdown = safety.shutdown_timeout_s
        logger.info(
            "vsp: after SIGTERM, open connections get at most %g s (%s) once the engine stopped",
            safety.shutdown_timeout_s,
            settings.SHUTDOWN_TIMEOUT_S.name,
        )


class SafetyMiddleware:
    def __init__(
        self, app: ASGIApp, app_state: State, route_guard: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.app_state = app_state
        # Re-applies the route allow-list if routes were added after start-up (routes.py).
        self.route_guard = route_guard
        # Model name -> label of the per-request LoRA deltas (``vsp serve --lora``).
        self.lora_labels = labels_from_env()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.route_guard is not None:
            self.route_guard()
        safety: SafetyState | None = getattr(self.app_state, "vsp_safety", None)
        if scope["type"] == "lifespan" and safety is not None:
            bound_shutdown(self.app_state, safety)
        if scope["type"] != "http" or safety is None:
            await self.app(scope, receive, send)
            return
        # Refusal and hot-patch metrics (metrics.py): copies what passes, judges afterwards.
        metrics.publish_active(safety.header())
        receive, send, finish_metrics = metrics.tapped(scope, receive, send)
        try:
            await self._call(scope, receive, send, safety)
        finally:
            finish_metrics()

    async def _call(self, scope: Scope, receive: Receive, send: Send, safety: SafetyState) -> None:
        body = bytearray()
        if self.lora_labels and runs_inference(scope):
            inner_receive = receive

            async def receive() -> Message:
                message = await inner_receive()
                if message["type"] == "http.request" and len(body) <= MAX_BODY_BYTES:
                    body.extend(message.get("body", b""))
                return message

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Read when the answer starts: a request that reached the model is inside the
                # gate by then, so the set cannot change under it later.
                value = safety.header()
                adapter = self.lora_labels.get(requested_model(bytes(body)) or "")
                if adapter:  # a LoRA request: merged set + the adapter on top of it
                    value = f"{value}+{adapter}"
                MutableHeaders(scope=message)[HEADER] = value
            await send(message)

        if not runs_inference(scope):
            await self.app(scope, receive, send_with_header)
            return
        if safety.degraded is not None:
            await error_response(degraded_error(safety))(scope, receive, send_with_header)
            return
        admission = Admission(safety)
        try:
            await self.app(
                scope, admission.wrap_receive(receive), admission.wrap_send(send_with_header)
            )
        except Exception:
            if not (admission.refused or admission.stalled):
                raise
        finally:
            await admission.leave()
        if admission.stalled:
            # Returning with the answer unfinished makes the server close the connection;
            # vLLM aborts the generation when its stream is dropped.
            logger.warning(
                "vsp: cut off %s: its client read nothing for %g s (%s)",
                scope["path"],
                safety.send_stall_timeout_s,
                settings.SEND_STALL_TIMEOUT_S.name,
            )
        elif admission.refused:
            await error_response(degraded_error(safety))(scope, receive, send_with_header)
