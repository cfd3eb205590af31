"""Refusal metrics of the API server: language ID, SSE accumulation, the ASGI tap, and one
real ``vsp serve`` (tiny model) whose ``/metrics`` must count chat requests by language and
delta set."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_delta
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    delta_label,
    request,
    start_vsp_serve,
    stop_process_group,
)
from starlette.datastructures import State

from vllm_safety_patch.data import load_prompts
from vllm_safety_patch.judge.refusal import is_refusal
from vllm_safety_patch.server import metrics
from vllm_safety_patch.server.language import UNKNOWN, client_language, identify
from vllm_safety_patch.server.middleware import SafetyMiddleware
from vllm_safety_patch.server.state import SafetyState

LANGS = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
TOKEN = "metrics-admin-token-0123456789abcdef"
START_TIMEOUT_S = 240
REFUSAL = "I'm sorry, but I can't help with that request."


# ---------------------------------------------------------------------------------------
# Language identification
# ---------------------------------------------------------------------------------------


def test_language_id_on_multijail() -> None:
    report, failing = [], []
    identify("warm up")  # loads the model (~0.6 s)
    seconds, count = 0.0, 0
    for lang in LANGS:
        prompts = load_prompts("multijail", lang, ids=range(160, 170))
        started = time.perf_counter()
        found = [identify(prompt.text) for prompt in prompts]
        seconds += time.perf_counter() - started
        count += len(prompts)
        correct = sum(code == lang for code in found)
        misses = [(p.index, code) for p, code in zip(prompts, found, strict=True) if code != lang]
        report.append(f"{lang}: {correct}/{len(prompts)}" + (f" misses {misses}" if misses else ""))
        if correct < 8:
            failing.append(lang)
    micros = seconds / count * 1e6
    print("\nlanguage ID (MultiJail 160-169): " + "; ".join(report))
    print(f"language ID: {micros:.0f} us a prompt")
    assert not failing, report


def test_language_header_and_edge_cases() -> None:
    assert client_language(None) is None
    assert client_language("th") == "th"
    assert client_language(" EN-us ") == "en"
    assert client_language("zh_Hant") == "zh"
    for bad in ("xx", "", "klingon", "../../etc"):
        assert client_language(bad) == UNKNOWN
    assert identify("") == UNKNOWN and identify("   ") == UNKNOWN
    assert identify(None) == UNKNOWN


@pytest.mark.parametrize(
    "code",
    [
        "def fibonacci(n):",  # py3langid alone: Italian
        "console.log('hi');",  # French
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
        "SELECT * FROM users WHERE id = 1;",
        "x = [i**2 for i in range(10)]",
    ],
)
def test_code_is_not_labelled_a_language(code: str) -> None:
    assert identify(code) == UNKNOWN


def test_everyday_requests_keep_their_language() -> None:
    """The confidence floor costs the natural-language prompts (almost) nothing."""
    misses = []
    for lang in ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"):
        for prompt in load_prompts("everyday", lang, "test", ids=range(16)):
            if identify(prompt.text) != lang:
                misses.append((lang, prompt.index, identify(prompt.text)))
    print(f"\neveryday test rows 0-15: {160 - len(misses)}/160 labelled right; misses {misses}")
    assert len(misses) <= 8, misses


# ---------------------------------------------------------------------------------------
# Parsing: prompts, JSON answers, SSE streams
# ---------------------------------------------------------------------------------------


def sse(events: list[Any], split: int = 7) -> list[bytes]:
    """An SSE body as vLLM sends it, cut into odd pieces (events split across sends)."""
    raw = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    data = raw.encode()
    return [data[i : i + split] for i in range(0, len(data), split)]


def chat_chunks(text: str, size: int = 4) -> list[dict]:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    events: list[dict] = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces]
    # A second choice and a usage chunk must not leak into choice 0's text.
    events.append({"choices": [{"index": 1, "delta": {"content": "OTHER"}}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 3}})
    return events


def test_sse_accumulation() -> None:
    raw = b"".join(sse(chat_chunks("สวัสดี " + REFUSAL)))
    assert metrics.sse_text(metrics.CHAT, raw) == "สวัสดี " + REFUSAL
    completions = [{"choices": [{"index": 0, "text": piece}]} for piece in ("Hel", "lo", "!")]
    assert metrics.sse_text(metrics.COMPLETIONS, b"".join(sse(completions))) == "Hello!"
    # Cut off mid-event (bounded copy): the complete events still count.
    assert metrics.sse_text(metrics.CHAT, raw[: len(raw) // 2]).startswith("สวัสดี")
    assert metrics.sse_text(metrics.CHAT, b"data: {not json\n\n: comment\n\n") == ""
    assert len(metrics.sse_text(metrics.CHAT, b"".join(sse(chat_chunks("a" * 9000))))) == 4096


def test_prompt_and_response_text() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "last"}, {"type": "image"}]},
        ]
    }
    assert metrics.prompt_text(metrics.CHAT, chat) == "last"
    assert metrics.prompt_text(metrics.COMPLETIONS, {"prompt": ["a", "b"]}) == "a"
    assert metrics.prompt_text(metrics.COMPLETIONS, {"prompt": [1, 2, 3]}) == ""
    assert metrics.prompt_text(metrics.CHAT, ["not", "a", "dict"]) == ""
    answer = {"choices": [{"index": 0, "message": {"content": REFUSAL}}]}
    assert metrics.response_text(metrics.CHAT, answer) == REFUSAL
    assert metrics.response_text(metrics.COMPLETIONS, {"choices": [{"text": "x"}]}) == "x"


# ---------------------------------------------------------------------------------------
# The middleware tap, with a fake inference app
# ---------------------------------------------------------------------------------------


def fake_app(chunks: list[bytes], streaming: bool, status: int = 200) -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        while True:  # read the whole request, as vLLM does
            message = await receive()
            if not message.get("more_body"):
                break
        kind = b"text/event-stream" if streaming else b"application/json"
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def run_request(
    app: Any, path: str, body: dict, headers: dict[str, str] | None = None
) -> list[dict]:
    """One request through SafetyMiddleware; returns what reached the client."""
    state = State()
    state.vsp_safety = SafetyState(
        delta_dir=Path("/nonexistent"), model_dir=Path("/nonexistent"), served_model="m",
        admin_token=None,
    )  # fmt: skip
    middleware = SafetyMiddleware(app, state)
    raw = json.dumps(body).encode()
    parts = [raw[: len(raw) // 2], raw[len(raw) // 2 :]]
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    async def send(message: dict) -> None:
        sent.append(message)

    async def scenario() -> None:
        await middleware(scope, receive, send)
        await asyncio.sleep(0)  # the recording is scheduled with call_soon

    asyncio.run(scenario())
    return sent


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_middleware_counts_streams_and_answers() -> None:
    labels = dict(delta_set="none", endpoint=metrics.CHAT)
    thai = load_prompts("multijail", "th", ids=[160])[0].text
    chat = {"messages": [{"role": "user", "content": thai}], "stream": True}
    before = value("vsp_requests_total", language="th", **labels)
    refusals_before = value("vsp_refusals_total", language="th", **labels)
    chunks = sse(chat_chunks(REFUSAL))
    sent = run_request(fake_app(chunks, streaming=True), metrics.CHAT, chat)
    # Bytes unchanged and in order; the header added.
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"".join(chunks)
    assert dict(sent[0]["headers"])[b"x-safety-deltas"] == b"none"
    assert value("vsp_requests_total", language="th", **labels) == before + 1
    assert value("vsp_refusals_total", language="th", **labels) == refusals_before + 1
    assert value("vsp_active_delta_set_info", delta_set="none") == 1

    # Non-streaming, the client names the language (unknown code -> "unknown").
    answer = json.dumps({"choices": [{"index": 0, "message": {"content": "Sure: step 1"}}]})
    for header, label in (("sw", "sw"), ("xx", UNKNOWN)):
        before = value("vsp_requests_total", language=label, **labels)
        refused = value("vsp_refusals_total", language=label, **labels)
        run_request(
            fake_app([answer.encode()], streaming=False),
            metrics.CHAT,
            {"messages": [{"role": "user", "content": thai}]},
            {"X-Prompt-Language": header},
        )
        assert value("vsp_requests_total", language=label, **labels) == before + 1
        assert value("vsp_refusals_total", language=label, **labels) == refused

    # Errors are not counted.
    before = value("vsp_requests_total", language="th", **labels)
    run_request(fake_app([b"{}"], streaming=False, status=400), metrics.CHAT, chat)
    assert value("vsp_requests_total", language="th", **labels) == before


async def tapped_exchange(request_body: bytes, chunks: list[bytes], streaming: bool) -> float:
    """One exchange through a bare tap; the seconds spent in the tap."""
    scope = {"type": "http", "method": "POST", "path": metrics.CHAT, "headers": []}
    tap = metrics.tap_for(scope)
    assert tap is not None

    async def receive() -> dict:
        return {"type": "http.request", "body": request_body, "more_body": False}

    async def send(message: dict) -> None:
        return None

    tapped_receive, tapped_send = tap.wrap(receive, send)
    await tapped_receive()
    kind = b"text/event-stream" if streaming else b"application/json"
    start = {"type": "http.response.start", "status": 200}
    start["headers"] = [(b"content-type", kind), (b"x-safety-deltas", b"bench")]
    await tapped_send(start)
    for chunk in chunks:
        await tapped_send({"type": "http.response.body", "body": chunk, "more_body": True})
    await tapped_send({"type": "http.response.body", "body": b"", "more_body": False})
    tap.record()
    return tap.overhead_s


def test_tap_overhead() -> None:
    """Time spent in the tap a request (copies during the answer + the judging after)."""
    english = load_prompts("multijail", "en", ids=[160])[0].text
    request_body = json.dumps({"messages": [{"role": "user", "content": english}]}).encode()
    text = REFUSAL + " " + "x" * 400
    answer = json.dumps({"choices": [{"index": 0, "message": {"content": text}}]}).encode()
    streamed = [c for chunk in sse(chat_chunks(text)[:100], 10**6) for c in chunk.split(b"\n\n")]
    rounds = 200
    results = {}
    for name, chunks, streaming in (
        ("non-streaming chat", [answer], False),
        (f"streaming chat, {len(streamed)} chunks", streamed, True),
    ):

        async def bench(chunks: list[bytes] = chunks, streaming: bool = streaming) -> float:
            return sum(
                [await tapped_exchange(request_body, chunks, streaming) for _ in range(rounds)]
            )

        results[name] = asyncio.run(bench()) / rounds * 1e6
    print(
        "\nmetrics overhead a request: " + "; ".join(f"{k} {v:.0f} us" for k, v in results.items())
    )


# ---------------------------------------------------------------------------------------
# One real server
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("metrics")
    delta_dir = root / "deltas"
    delta_dir.mkdir()
    delta, data = make_delta(tiny_qwen2, group="metrics")
    (delta_dir / "metrics.safetensors").write_bytes(data)
    token_file = root / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    log = root / "server.log"
    process, url, seconds = start_vsp_serve(
        tiny_qwen2, delta_dir, "metrics", token_file, log, core=sorted(os.sched_getaffinity(0))[-1]
    )
    try:
        print(f"\nvsp serve (metrics): healthy after {seconds:.1f} s")
        yield {"url": url, "model": str(tiny_qwen2), "label": delta_label(delta), "log": log}
    finally:
        stop_process_group(process)


def stream_chat(url: str, body: dict, headers: dict[str, str]) -> tuple[str, str]:
    """A streamed chat request; (text of choice 0, X-Safety-Deltas)."""
    data = json.dumps({**body, "stream": True}).encode()
    sent = {"Content-Type": "application/json", **headers}
    req = urllib.request.Request(url + metrics.CHAT, data=data, headers=sent, method="POST")
    with urllib.request.urlopen(req, timeout=120) as reply:
        raw = reply.read()
        return metrics.sse_text(metrics.CHAT, raw), reply.headers["x-safety-deltas"]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("vsp_"):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def series(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_live_server_metrics(live: dict) -> None:
    url, model = live["url"], live["model"]
    thai = load_prompts("multijail", "th", ids=[161])[0].text
    italian = load_prompts("multijail", "it", ids=[161])[0].text
    base = {"model": model, "max_tokens": 8, "temperature": 0}
    expected: dict[tuple[str, str], list[bool]] = {}

    def chat(
        content: str, headers: dict[str, str] | None = None, stream: bool = False
    ) -> tuple[str, str]:
        body = {**base, "messages": [{"role": "user", "content": content}]}
        if stream:
            text, header = stream_chat(url, body, headers or {})
        else:
            status, reply, got = request("POST", url + metrics.CHAT, body, headers)
            assert status == 200, reply
            text, header = reply["choices"][0]["message"]["content"], got["x-safety-deltas"]
        return text, header

    samples = scrape(url)
    assert series(samples, "vsp_active_delta_set_info", delta_set=live["label"]) == 1
    for content, headers, stream, lang in (
        (thai, None, False, "th"),  # identified
        (thai, None, True, "th"),  # streamed
        (italian, {"X-Prompt-Language": "it"}, True, "it"),  # named by the client
        (thai, {"X-Prompt-Language": "tlh"}, False, UNKNOWN),  # an unknown code
    ):
        text, header = chat(content, headers, stream)
        assert header == live["label"]
        expected.setdefault((lang, header), []).append(is_refusal(text, None))
    # Switch to base weights: the new set labels the next answers.
    status, body, headers = request(
        "POST",
        url + metrics.ACTIVATE,
        {"deltas": []},
        {"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200, body
    text, header = chat(italian, None, True)
    assert header == "none"
    expected.setdefault(("it", "none"), []).append(is_refusal(text, None))

    time.sleep(0.2)  # the recording runs just after each answer
    samples = scrape(url)
    for (lang, delta_set), refused in expected.items():
        labels = dict(language=lang, delta_set=delta_set, endpoint=metrics.CHAT)
        assert series(samples, "vsp_requests_total", **labels) == len(refused), (labels, samples)
        assert series(samples, "vsp_refusals_total", **labels) == sum(refused), labels
    counted = sum(v for (name, _), v in samples.items() if name == "vsp_requests_total")
    assert counted == 5  # nothing else (GETs, the activation) counted
    assert series(samples, "vsp_active_delta_set_info", delta_set="none") == 1
    assert series(samples, "vsp_active_delta_set_info", delta_set=live["label"]) is None
    assert series(samples, "vsp_hotpatch_total") == 1
    failed = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "vsp_hotpatch_failures_total"
    }
    # Every reason exported at 0 from start-up (an alert on increase() sees the first one).
    assert failed == dict.fromkeys(metrics.FAILURE_REASONS, 0.0), failed
    assert any(name.startswith("vsp_hotpatch_seconds") for name, _ in samples)
    assert 0 < series(samples, "vsp_metrics_overhead_seconds_total") < 1  # 5 answers judged
    print(
        "\nlive /metrics: "
        + "; ".join(
            f"{lang}/{delta_set}: {len(refused)} requests, {sum(refused)} refusals"
            for (lang, delta_set), refused in expected.items()
        )
    )


def test_hotpatch_durations_are_exported_before_the_first_switch() -> None:
    """The documented ``vsp_hotpatch_seconds`` is on /metrics from start-up, every outcome at
    0, so a dashboard or alert finds it before the first switch."""
    from prometheus_client import REGISTRY, generate_latest

    metrics.metrics()
    text = generate_latest(REGISTRY).decode()
    for outcome in metrics.HOTPATCH_OUTCOMES:
        assert f'vsp_hotpatch_seconds_count{{outcome="{outcome}"}}' in text, outcome
