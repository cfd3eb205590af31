"""Outermost ASGI layer: the ``X-Safety-Deltas`` header on every response, and the gate.

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched. It is
installed around vLLM's whole middleware stack (see ``plugin.py``), so even a 401 from
vLLM's ``--api-key`` check or a 404 carries the header.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders, State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_safety_patch.server import metrics
from vllm_safety_patch.server.errors import SafetyAPIError, error_response
from vllm_safety_patch.server.lora import MAX_BODY_BYTES, labels_from_env, requested_model
from vllm_safety_patch.server.state import HEADER, SafetyState

SAFETY_PREFIX = "/v1/safety/"


def runs_inference(scope: Scope) -> bool:
    """Requests that may reach the model: every POST except our own routes.

    vLLM's inference routes are all POST (completions, chat, responses, embeddings,
    tokenize, invocations, ...); GETs (health, models, metrics) never run the model.
    """
    root = scope.get("root_path", "")
    path = scope["path"].removeprefix(root)
    return scope.get("method") == "POST" and not path.startswith(SAFETY_PREFIX)


class SafetyMiddleware:
    def __init__(self, app: ASGIApp, app_state: State) -> None:
        self.app = app
        self.app_state = app_state
        # Model name -> label of the per-request LoRA deltas (``vsp serve --lora``).
        self.lora_labels = labels_from_env()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        safety: SafetyState | None = getattr(self.app_state, "vsp_safety", None)
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
                # Read when the answer starts: inside the gate the set cannot change later.
                value = safety.header()
                adapter = self.lora_labels.get(requested_model(bytes(body)) or "")
                if adapter:  # a LoRA request: merged set + the adapter on top of it
                    value = f"{value}+{adapter}"
                MutableHeaders(scope=message)[HEADER] = value
            await send(message)

        if not runs_inference(scope):
            await self.app(scope, receive, send_with_header)
            return
        async with safety.gate.request():
            if safety.degraded is not None:
                refusal = SafetyAPIError(
                    503,
                    f"the served weights are unknown after a failed switch: {safety.degraded}",
                    "restart the server (vsp serve); the log names the failing worker",
                    "degraded",
                )
                await error_response(refusal)(scope, receive, send_with_header)
                return
            await self.app(scope, receive, send_with_header)
