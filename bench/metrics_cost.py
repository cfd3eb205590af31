"""Refusal metrics + language identification cost per request.

    .venv/bin/python bench/metrics_cost.py                 # default model (~3-4 min)
    .venv/bin/python bench/metrics_cost.py --model tiny --n 10    # smoke test

1. Real traffic: `vsp serve --deltas all` (metrics on) answers streamed greedy chats of
   MultiJail prompts in its ten languages (no X-Prompt-Language header, so every request is
   language-identified). The mean request time (client: sent to last byte) is the
   denominator; /metrics must have counted every request.
2. Per-request cost: each captured exchange (request body, response headers, the SSE
   events as the server sent them) is replayed through the server's own tap
   (``metrics.tapped``: the copies made while the answer streams, then the parsing, language
   ID and refusal judgment), plus the middleware's ``publish_active`` call, ``--repeat``
   times, in this process after the server has stopped (a quiet CPU: the figure is the
   tap's own cost, not queueing behind the engine).

Target: tap cost / mean request time < 1%.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter

from _common import (
    Reply,
    Server,
    chat_body,
    counted_requests,
    machine_note,
    prepare,
    prompts,
    run_load,
)

TARGET = 0.01


def events(reply: Reply) -> list[bytes]:
    """The SSE events of a reply, one ASGI body message each (as vLLM sends them)."""
    raw = b"".join(reply.chunks)
    return [block + b"\n\n" for block in raw.split(b"\n\n") if block]


async def replay(reply: Reply, body_messages: list[bytes]) -> tuple[float, str, bool]:
    """One exchange through the tap: (seconds spent in the metrics code, language, refused)."""
    from vllm_safety_patch.server import metrics

    scope = {"type": "http", "method": "POST", "path": metrics.CHAT, "headers": []}
    headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
    headers.append((b"x-safety-deltas", reply.headers.get("x-safety-deltas", "?").encode()))

    async def receive() -> dict:
        return {"type": "http.request", "body": reply.request, "more_body": False}

    async def send(message: dict) -> None:
        return None

    # What the middleware does while the answer streams: publish_active, the tap's copies.
    # The dummy receive/send are inside the timing: a slight overestimate, never an under.
    started = time.perf_counter()
    metrics.publish_active(headers[1][1].decode())
    tap = metrics.tap_for(scope)
    assert tap is not None
    tapped_receive, tapped_send = tap.wrap(receive, send)
    await tapped_receive()
    await tapped_send({"type": "http.response.start", "status": 200, "headers": headers})
    for body in body_messages:
        await tapped_send({"type": "http.response.body", "body": body, "more_body": True})
    await tapped_send({"type": "http.response.body", "body": b"", "more_body": False})
    # What finish() schedules on the event loop once the last byte is sent (parsing,
    # language ID, refusal judgment, counters), called directly: the work, not the loop.
    tap.record()
    seconds = time.perf_counter() - started
    lang, refused = tap.judge()
    return seconds, lang, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a folder")
    parser.add_argument("--n", type=int, default=40, help="requests (ten languages in turn)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=20, help="replays of each exchange")
    args = parser.parse_args()

    setup = prepare(args.model, "metrics_cost")
    chosen = prompts(args.n, ("multijail",))
    # Real answers (no ignore_eos): a refusal ends early, as in production.
    bodies = [chat_body(setup.clip(text), args.max_tokens, ignore_eos=False) for _, text in chosen]
    print(f"machine: {machine_note()}")
    print(
        f"model {setup.model}; {args.n} MultiJail chats, concurrency {args.concurrency}, "
        f"max {args.max_tokens} tokens, streamed"
    )
    with Server.vsp(setup, "all") as server:
        print(f"vsp serve healthy after {server.start():.1f} s", flush=True)
        run_load(server, bodies[:2], 2)  # warm-up
        before = server.cpu_seconds()
        load = run_load(server, bodies, args.concurrency)
        server_cpu = server.cpu_seconds() - before
        counted = counted_requests(server)
    print(f"traffic: {load.summary()}")
    print(f"/metrics counted {counted:.0f} requests (sent {args.n} + 2 warm-up)")
    if len(load.ok) < len(load.replies):
        raise SystemExit(f"failed requests: {[r.error for r in load.replies if r.error][:3]}")

    messages = [events(reply) for reply in load.replies]
    per_request: list[float] = []
    found: list[tuple[str, str, bool]] = []

    async def run_all() -> None:
        await replay(load.replies[0], messages[0])  # loads the language model, makes counters
        for _ in range(args.repeat):
            for (lang, _), reply, bodies_sent in zip(chosen, load.replies, messages, strict=True):
                seconds, identified, refused = await replay(reply, bodies_sent)
                per_request.append(seconds)
                if len(found) < len(chosen):
                    found.append((lang, identified, refused))

    asyncio.run(run_all())
    cost = statistics.fmean(per_request)
    request_time = load.mean_latency
    right = sum(lang == identified for lang, identified, _ in found)
    refusals = Counter(lang for lang, _, refused in found if refused)
    print(
        f"language ID right for {right}/{len(found)} prompts; refusals judged: "
        + (", ".join(f"{k} {v}" for k, v in sorted(refusals.items())) or "none")
    )
    events_mean = statistics.fmean(len(m) for m in messages)
    print(
        f"tap cost a request: mean {cost * 1e6:.0f} us, p95 "
        f"{statistics.quantiles(per_request, n=20)[-1] * 1e6:.0f} us "
        f"({events_mean:.0f} SSE events a request on average, {len(per_request)} replays)"
    )
    print(
        f"mean request time: {request_time:.2f} s; server CPU a request: "
        f"{server_cpu / args.n:.2f} s (all its processes)"
    )
    share = cost / request_time
    verdict = "MET" if share < TARGET else "MISSED"
    print(
        f"metrics cost / request time: {share * 100:.4f}% (target < {TARGET * 100:.0f}%): "
        f"{verdict}; / server CPU a request: {cost / (server_cpu / args.n) * 100:.4f}%"
    )
    print(f"machine after: {machine_note()}")


if __name__ == "__main__":
    main()
