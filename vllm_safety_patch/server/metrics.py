"""Prometheus refusal metrics of the API server (default registry: vLLM's ``/metrics``).

Series (all in the API-server process, where vLLM exposes the default registry):

- ``vsp_requests_total{language, delta_set, endpoint}``: 2xx answers of
  ``/v1/chat/completions`` and ``/v1/completions`` (streaming or not);
- ``vsp_refusals_total{language, delta_set, endpoint}``: those whose first choice
  :func:`~vllm_safety_patch.judge.refusal.is_refusal` calls a refusal;
- ``vsp_active_delta_set_info{delta_set}``: 1 for the served set (the others are removed);
- ``vsp_hotpatch_total``: activation calls answered 2xx;
- ``vsp_hotpatch_failures_total{reason}``: switches attempted that did not happen or went
  wrong (``FAILURE_REASONS``: the drain or the engine pause timed out (409 busy), a worker
  refused the files (422) or failed mid-switch (500), the canary refused the set (422), the
  server shut down or its engine died under it (503)), counted by ``hotpatch.py``; every
  reason is exported from start-up at 0, so an alert on ``increase()`` sees the first one.
  Refused requests (bad name, no token) count in neither, and neither do dry runs (a
  preview that restores whatever happens), except ``restore_failed``: a dry run that left
  the server degraded. ``vsp_hotpatch_seconds{outcome}``: switch durations
  (``HOTPATCH_OUTCOMES``, exported from start-up);
- ``vsp_canary_refusal_ratio{language, kind, delta_set}``: the share of the last canary's
  ``harmful`` or ``benign`` probe prompts that were refused, and beside it
  ``vsp_canary_probes{language, kind, delta_set}``, how many prompts that share is of; both
  hold the last canary's series only (a new canary removes the previous set's);
  ``vsp_canary_runs_total{outcome, mode}`` (passed, failed, timeout, error; activate or
  dry_run; from start-up at 0) and ``vsp_canary_seconds`` (its duration).

``delta_set`` is the ``X-Safety-Deltas`` value of the answer; ``language`` is the client's
``X-Prompt-Language`` (validated) or the identified language of the last user message
(chat) or the prompt (completions). A :class:`Tap` only copies what passes through the ASGI
``receive``/``send`` (forwarded first, unchanged); the parsing, language ID and refusal check
run once the last byte has been sent, scheduled on the event loop (~100 us a request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from vllm_safety_patch.judge.refusal import is_refusal
from vllm_safety_patch.server.language import LANGUAGE_HEADER, UNKNOWN, client_language, identify

logger = logging.getLogger(f"vllm.{__name__}")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
ACTIVATE = "/v1/safety/deltas/activate"
LABELS = ("language", "delta_set", "endpoint")
FAILURE_REASONS = (
    "drain_timeout",  # requests still running after the drain timeout (409 busy)
    "engine_busy",  # the engine did not pause in time (409 busy)
    "worker_refused",  # a worker could not read or check the files; nothing touched (422)
    "switch_failed",  # a worker failed mid-switch; the previous set was restored (500)
    "restore_failed",  # ... and restoring failed too: the server is degraded (500)
    "canary",  # the canary refused the new set; the previous set was restored (422)
    "shutdown",  # the server began shutting down mid-switch (503)
    "engine_stopped",  # the engine died mid-switch (503)
    "error",  # anything unexpected
)
HOTPATCH_OUTCOMES = ("ok", "dry_run", "canary_failed", "drain_timeout", "failed")
CANARY_KINDS = ("harmful", "benign")
# timeout: the probes outlasted VSP_CANARY_TIMEOUT_S; error: they could not run at all.
CANARY_OUTCOMES = ("passed", "failed", "timeout", "error")
CANARY_MODES = ("activate", "dry_run")
# Copies are bounded: a prompt's language and a response's refusal are both in its opening.
MAX_REQUEST_BYTES = 4 << 20
MAX_RESPONSE_BYTES = 256 << 10
MAX_RESPONSE_CHARS = 4096

_HEADER_KEY = b"x-safety-deltas"
_LANGUAGE_KEY = LANGUAGE_HEADER.lower().encode()


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = _get_or_make(
            Counter, "vsp_requests", "Completed 2xx chat/completion answers", LABELS
        )
        self.refusals = _get_or_make(
            Counter, "vsp_refusals", "Of vsp_requests_total, answers judged refusals", LABELS
        )
        self.active = _get_or_make(
            Gauge,
            "vsp_active_delta_set_info",
            "The served safety delta set (X-Safety-Deltas value): 1 for the active set",
            ("delta_set",),
        )
        self.hotpatch = _get_or_make(
            Counter, "vsp_hotpatch", "Delta activation calls answered 2xx", ()
        )
        self.hotpatch_failures = _get_or_make(
            Counter,
            "vsp_hotpatch_failures",
            "Delta switches that failed: drain or pause timed out, a worker refused or failed",
            ("reason",),
        )
        for reason in FAILURE_REASONS:  # exported at 0, so increase() sees the first failure
            self.hotpatch_failures.labels(reason)
        self.hotpatch_seconds = _get_or_make(
            Histogram,
            "vsp_hotpatch_seconds",
            "Duration of safety delta switches (POST /v1/safety/deltas/activate)",
            ("outcome",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        for outcome in HOTPATCH_OUTCOMES:  # exported from start-up, before the first switch
            self.hotpatch_seconds.labels(outcome)
        self.canary_ratio = _get_or_make(
            Gauge,
            "vsp_canary_refusal_ratio",
            "Share of the last canary's probe prompts refused, per language, kind and delta set",
            ("language", "kind", "delta_set"),
        )
        self.canary_probes = _get_or_make(
            Gauge,
            "vsp_canary_probes",
            "Probe prompts behind vsp_canary_refusal_ratio (its sample size), per language, "
            "kind and delta set",
            ("language", "kind", "delta_set"),
        )
        self.canary_runs = _get_or_make(
            Counter, "vsp_canary_runs", "Canary runs on activation", ("outcome", "mode")
        )
        for outcome in CANARY_OUTCOMES:
            for mode in CANARY_MODES:
                self.canary_runs.labels(outcome, mode)
        self.canary_seconds = _get_or_make(
            Histogram,
            "vsp_canary_seconds",
            "Duration of the canary's probes on the live engine",
            (),
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
        )
        # The taps' own cost, so operators can check it against request time in production
        # (bench/metrics_cost.py measures the same by replay).
        self.overhead = _get_or_make(
            Counter,
            "vsp_metrics_overhead_seconds",
            "Seconds spent by the refusal metrics (copies, language ID, judging)",
            (),
        )
        self.published: str | None = None


def _get_or_make(kind: Any, name: str, doc: str, labels: tuple[str, ...], **options: Any) -> Any:
    from prometheus_client import REGISTRY

    try:
        return kind(name, doc, labels, **options)
    except ValueError:  # already registered (module reloaded): reuse it
        names = getattr(REGISTRY, "_names_to_collectors", {})
        return names.get(name) or names.get(f"{name}_total") or names[f"{name}_count"]


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def hotpatch_failed(reason: str) -> None:
    """Count one failed switch under ``reason`` (one of ``FAILURE_REASONS``)."""
    try:
        metrics().hotpatch_failures.labels(reason).inc()
    except Exception:  # metrics must never break serving
        logger.exception("vsp: cannot count a failed switch (%s)", reason)


def hotpatch_timed(seconds: float, outcome: str) -> None:
    """One switch's duration under ``outcome`` (one of ``HOTPATCH_OUTCOMES``)."""
    try:
        metrics().hotpatch_seconds.labels(outcome).observe(seconds)
    except Exception:  # metrics must never break serving
        logger.exception("vsp: cannot time a switch (%s)", outcome)


def canary_observed(report: Any, dry_run: bool) -> None:
    """Record one canary run (a :class:`~vllm_safety_patch.server.protocol.CanaryReport`)."""
    try:
        m = metrics()
        # The last canary's series only: one set per probe would pile up series forever.
        m.canary_ratio.clear()
        m.canary_probes.clear()
        for row in report.languages:
            for kind, refused, n in (
                ("harmful", row.harmful_refused, row.harmful_n),
                ("benign", row.benign_refused, row.benign_n),
            ):
                if n:
                    labels = (row.language, kind, report.delta_set)
                    m.canary_ratio.labels(*labels).set(refused / n)
                    m.canary_probes.labels(*labels).set(n)
        outcome = "passed" if report.passed else "failed"
        m.canary_runs.labels(outcome, "dry_run" if dry_run else "activate").inc()
        m.canary_seconds.observe(report.seconds)
    except Exception:  # metrics must never break serving
        logger.exception("vsp: cannot record the canary's figures")


def canary_errored(outcome: str, dry_run: bool) -> None:
    """Count a canary that gave no verdict: ``timeout`` or ``error``."""
    try:
        metrics().canary_runs.labels(outcome, "dry_run" if dry_run else "activate").inc()
    except Exception:  # metrics must never break serving
        logger.exception("vsp: cannot count a canary run (%s)", outcome)


def publish_active(label: str) -> None:
    """Point ``vsp_active_delta_set_info`` at ``label`` (a string compare when unchanged)."""
    try:
        m = metrics()
        if m.published == label:
            return
        if m.published is not None:
            try:
                m.active.remove(m.published)
            except KeyError:
                pass
        m.active.labels(label).set(1)
        m.published = label
    except Exception:  # metrics must never break serving
        logger.exception("vsp: cannot update vsp_active_delta_set_info")


# ---------------------------------------------------------------------------------------
# Parsing: request prompt, JSON response text, SSE stream text
# ---------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url"...}]
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_text(endpoint: str, body: Any) -> str:
    """The last user message (chat) or the prompt (completions; the first string of a
    list); empty when there is none (token ids, malformed body)."""
    if not isinstance(body, dict):
        return ""
    if endpoint == CHAT:
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    return _content_text(message.get("content"))
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = next((item for item in prompt if isinstance(item, str)), "")
    return prompt if isinstance(prompt, str) else ""


def _choice_text(endpoint: str, choice: dict, streaming: bool) -> str:
    if endpoint == COMPLETIONS:
        text = choice.get("text")
    else:
        part = choice.get("delta" if streaming else "message")
        text = part.get("content") if isinstance(part, dict) else None
    return text if isinstance(text, str) else ""


def response_text(endpoint: str, body: Any) -> str:
    """Text of the first choice of a non-streamed answer."""
    if not isinstance(body, dict):
        return ""
    for choice in body.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return _choice_text(endpoint, choice, streaming=False)
    return ""


def sse_text(endpoint: str, raw: bytes, limit: int = MAX_RESPONSE_CHARS) -> str:
    """The first choice's text, accumulated over the ``data:`` events of an SSE stream.

    Events that are cut off (the copy is bounded), ``[DONE]``, errors and usage chunks are
    skipped; the text stops growing at ``limit`` characters (the judge reads the opening).
    """
    parts: list[str] = []
    size = 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == "[DONE]":
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                text = _choice_text(endpoint, choice, streaming=True)
                parts.append(text)
                size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


# ---------------------------------------------------------------------------------------
# The ASGI tap
# ---------------------------------------------------------------------------------------


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", ""))


class Tap:
    """Copies one request and its answer as they pass; :meth:`finish` records them."""

    def __init__(self, scope: Scope, endpoint: str) -> None:
        self.endpoint = endpoint
        self.scope = scope
        self.request = bytearray()
        self.request_complete = True
        self.response = bytearray()
        self.status = 0
        self.delta_set = ""
        self.streaming = False
        self.done = False
        self.overhead_s = 0.0  # time spent in this tap (copies + record)

    def wrap(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        async def tapped_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                started = time.perf_counter()
                if len(self.request) + len(message.get("body", b"")) <= MAX_REQUEST_BYTES:
                    self.request += message.get("body", b"")
                else:
                    self.request_complete = False
                self.overhead_s += time.perf_counter() - started
            return message

        async def tapped_send(message: Message) -> None:
            await send(message)  # the bytes go first, unchanged
            started = time.perf_counter()
            kind = message["type"]
            if kind == "http.response.start":
                self.status = message["status"]
                for key, value in message.get("headers", ()):
                    key = key.lower()
                    if key == _HEADER_KEY:
                        self.delta_set = value.decode("latin-1")
                    elif key == b"content-type":
                        self.streaming = value.startswith(b"text/event-stream")
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if body and len(self.response) < MAX_RESPONSE_BYTES:
                    self.response += body
                if not message.get("more_body", False):
                    self.done = True
            self.overhead_s += time.perf_counter() - started

        return tapped_receive, tapped_send

    def finish(self) -> None:
        """Schedule :meth:`record` (the response is sent by now; nothing waits on it)."""
        if not self.done:  # cut off (client gone, error): nothing to count
            return
        try:
            asyncio.get_running_loop().call_soon(self.record)
        except RuntimeError:
            self.record()

    def language(self, body: Any) -> str:
        for key, value in self.scope.get("headers", ()):
            if key.lower() == _LANGUAGE_KEY:
                return client_language(value.decode("latin-1")) or UNKNOWN
        if not self.request_complete:
            return UNKNOWN
        return identify(prompt_text(self.endpoint, body))

    def judge(self) -> tuple[str, bool]:
        """(language, refused) of the finished exchange."""
        try:
            body = json.loads(self.request) if self.request_complete else None
        except ValueError:
            body = None
        if self.streaming:
            text = sse_text(self.endpoint, bytes(self.response))
        else:
            try:
                text = response_text(self.endpoint, json.loads(self.response))
            except ValueError:
                text = ""
        lang = self.language(body)
        return lang, bool(text) and is_refusal(text, lang if lang != UNKNOWN else None)

    def record(self) -> None:
        if not 200 <= self.status < 300:
            return
        started = time.perf_counter()
        try:
            lang, refused = self.judge()
            m = metrics()
            labels = (lang, self.delta_set or "unknown", self.endpoint)
            m.requests.labels(*labels).inc()
            m.refusals.labels(*labels).inc(1 if refused else 0)  # the series exists at 0
        except Exception:  # metrics must never break serving
            logger.exception("vsp: refusal metrics failed for one %s answer", self.endpoint)
        self.overhead_s += time.perf_counter() - started
        try:
            metrics().overhead.inc(self.overhead_s)
        except Exception:  # metrics must never break serving
            logger.exception("vsp: cannot count the metrics overhead")


class ActivationTap(Tap):
    """Counts activation calls answered 2xx (failures are counted where their reason is
    known, in ``hotpatch.py``) and publishes the set the answer names."""

    def wrap(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        async def tapped_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start":
                self.status = message["status"]
                for key, value in message.get("headers", ()):
                    if key.lower() == _HEADER_KEY:
                        self.delta_set = value.decode("latin-1")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self.done = True

        return receive, tapped_send

    def record(self) -> None:
        if 200 <= self.status < 300:
            metrics().hotpatch.inc()
        if self.delta_set:
            publish_active(self.delta_set)


def tap_for(scope: Scope) -> Tap | None:
    """A tap for the requests these metrics count (POSTs of the two endpoints and of the
    activation route), None for everything else."""
    if scope.get("method") != "POST":
        return None
    path = _path(scope).rstrip("/")
    if path in ENDPOINTS:
        return Tap(scope, path)
    if path == ACTIVATE:
        return ActivationTap(scope, path)
    return None


def tapped(scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send, Callable[[], None]]:
    """``receive``/``send`` to pass on, and what to call once the app returned."""
    tap = tap_for(scope)
    if tap is None:
        return receive, send, _nothing
    receive, send = tap.wrap(receive, send)
    return receive, send, tap.finish


def _nothing() -> None:
    return None
