"""Serving throughput and time to first token: stock vLLM vs `vsp serve`.

    .venv/bin/python bench/serve_throughput.py                # default model (~8 min)
    .venv/bin/python bench/serve_throughput.py --model tiny --n 8 --pairs 1   # smoke test

Arms, same prompts, same vLLM flags, same environment apart from the plugins:

- stock: vLLM's OpenAI server on the merged checkpoint from `vsp export --format merged`
  (the same weights), with `VLLM_PLUGINS=""`, which loads none of our plugins (checked
  before the run: no vsp loader, no worker methods, no general plugin);
- vsp: `vsp serve --deltas all` on the base checkpoint: the delta merged by our loader,
  our endpoint plugin (X-Safety-Deltas header, the hot-patch gate, refusal metrics on).

Both servers stay up and take turns (A B, B A, ...) so background load hits both; the idle
one's CPU use during the other's rounds is printed to show it does not interfere.
Target: vsp/stock >= 0.99 for tokens/s and for TTFT speed (stock TTFT / vsp TTFT).
"""

from __future__ import annotations

import argparse
import statistics

from _common import (
    Arm,
    Server,
    add_round_options,
    alternate,
    chat_body,
    check_stock,
    counted_requests,
    export,
    machine_note,
    pooled_tokens_per_s,
    prepare,
    prompts,
    ratio_line,
)

TARGET = 0.99


def verdict(values: list[float]) -> str:
    """MET / MISSED only when every pair agrees; a spread across the target resolves nothing."""
    if min(values) >= TARGET:
        return "MET"
    if max(values) < TARGET:
        return "MISSED"
    return f"NOT RESOLVED (median {statistics.median(values):.3f}; the pairs span the target)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_round_options(parser)
    args = parser.parse_args()

    check_stock()
    setup = prepare(args.model, "serve_throughput")
    merged = export(setup, "merged")
    bodies = [chat_body(setup.clip(text), args.max_tokens) for _, text in prompts(args.n)]
    print(f"machine: {machine_note()}")
    print(
        f"model {setup.model}; {args.n} requests a round, concurrency {args.concurrency}, "
        f"{args.max_tokens} tokens each (ignore_eos), {args.pairs} rounds per arm"
    )
    stock = Server.stock(setup, merged)
    ours = Server.vsp(setup, "all")
    with stock, ours:
        # One at a time: two engines starting together would share the two cores.
        for server in (stock, ours):
            print(f"{server.name}: healthy after {server.start():.1f} s", flush=True)
        arms = [Arm(stock, bodies), Arm(ours, bodies)]
        alternate(arms, args.pairs, args.concurrency, args.warmup)
        counted = counted_requests(ours)
    stock_arm, vsp_arm = arms
    pairs = list(zip(stock_arm.loads, vsp_arm.loads, strict=True))
    throughput = [v.tokens_per_s / s.tokens_per_s for s, v in pairs]
    ttft50 = [s.ttft(0.5) / v.ttft(0.5) for s, v in pairs]
    ttft95 = [s.ttft(0.95) / v.ttft(0.95) for s, v in pairs]
    print(f"vsp serve counted {counted:.0f} requests in vsp_requests_total (metrics on)")
    for arm in arms:
        tps = [load.tokens_per_s for load in arm.loads]
        print(
            f"{arm.server.name:>8}: tokens/s median {statistics.median(tps):.1f}; "
            f"TTFT p50 median {statistics.median(x.ttft(0.5) for x in arm.loads):.3f} s, "
            f"p95 median {statistics.median(x.ttft(0.95) for x in arm.loads):.3f} s; "
            f"CPU while idle: {max(arm.idle_cpu):.2f} s at most a round; "
            f"X-Safety-Deltas: {arm.loads[-1].served()}"
        )
    for label, values in (
        ("throughput vsp/stock", throughput),
        ("TTFT p50 speed stock/vsp", ttft50),
        ("TTFT p95 speed stock/vsp", ttft95),
    ):
        print(ratio_line(label, values, f"target >= {TARGET}: {verdict(values)}"))
    pooled = pooled_tokens_per_s(vsp_arm.loads) / pooled_tokens_per_s(stock_arm.loads)
    print(f"throughput vsp/stock pooled over all rounds (tokens / seconds): {pooled:.3f}")
    print(f"machine after: {machine_note()}")


if __name__ == "__main__":
    main()
