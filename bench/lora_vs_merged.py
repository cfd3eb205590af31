"""Per-request LoRA mode vs merged mode: what per-request delta selection costs (item 5).

    .venv/bin/python bench/lora_vs_merged.py                  # default model (~8 min)
    .venv/bin/python bench/lora_vs_merged.py --model tiny --n 8 --pairs 1   # smoke test

Arms, same prompts, same vLLM flags, both `vsp serve` (metrics on in both):

- merged: `vsp serve --deltas all`, the delta merged into the weights at load;
- lora: `vsp serve --deltas none --lora all`, the same delta as a vLLM multi-LoRA adapter
  (rank 32 on down_proj), which a request selects by model name "all". ``--lora-share``
  of the requests ask for it (default: all of them), the rest for the base model.

Both servers stay up and take turns (A B, B A, ...). No target: the ratio is the price of
choosing deltas per request instead of per server.
"""

from __future__ import annotations

import argparse
import statistics

from _common import (
    SERVED_NAME,
    Arm,
    Server,
    add_round_options,
    alternate,
    chat_body,
    machine_note,
    pooled_tokens_per_s,
    prepare,
    prompts,
    ratio_line,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_round_options(parser)
    parser.add_argument("--lora-share", type=float, default=1.0, help="share asking for 'all'")
    args = parser.parse_args()

    setup = prepare(args.model, "lora_vs_merged")
    texts = [setup.clip(text) for _, text in prompts(args.n)]
    merged_bodies = [chat_body(text, args.max_tokens) for text in texts]
    # Every k-th request asks for the adapter, evenly spread over the round.
    names = ["all" if _picked(i, args.lora_share) else SERVED_NAME for i in range(len(texts))]
    chosen = zip(texts, names, strict=True)
    lora_bodies = [chat_body(text, args.max_tokens, model=name) for text, name in chosen]
    share = sum(body["model"] == "all" for body in lora_bodies) / len(lora_bodies)
    print(f"machine: {machine_note()}")
    print(
        f"model {setup.model}; {args.n} requests a round ({share:.0%} ask for the LoRA "
        f"adapter in the lora arm), concurrency {args.concurrency}, {args.max_tokens} tokens "
        f"each (ignore_eos), {args.pairs} rounds per arm"
    )
    merged = Server.vsp(setup, "all")
    lora = Server.vsp(setup, "none", lora="all")
    with merged, lora:
        for server in (merged, lora):
            print(f"{server.name}: healthy after {server.start():.1f} s", flush=True)
        arms = [Arm(merged, merged_bodies), Arm(lora, lora_bodies)]
        alternate(arms, args.pairs, args.concurrency, args.warmup)
    merged_arm, lora_arm = arms
    pairs = list(zip(merged_arm.loads, lora_arm.loads, strict=True))
    for arm in arms:
        tps = [load.tokens_per_s for load in arm.loads]
        print(
            f"{arm.server.name:>17}: tokens/s median {statistics.median(tps):.1f}; "
            f"TTFT p50 median {statistics.median(x.ttft(0.5) for x in arm.loads):.3f} s, "
            f"p95 median {statistics.median(x.ttft(0.95) for x in arm.loads):.3f} s; "
            f"CPU while idle: {max(arm.idle_cpu):.2f} s at most a round; "
            f"X-Safety-Deltas: {arm.loads[-1].served()}"
        )
    print(
        ratio_line(
            "throughput lora/merged",
            [b.tokens_per_s / a.tokens_per_s for a, b in pairs],
            "(1 = free)",
        )
    )
    print(
        ratio_line(
            "TTFT p50 speed merged/lora",
            [a.ttft(0.5) / b.ttft(0.5) for a, b in pairs],
            "(1 = free)",
        )
    )
    print(
        ratio_line(
            "TTFT p95 speed merged/lora",
            [a.ttft(0.95) / b.ttft(0.95) for a, b in pairs],
            "(1 = free)",
        )
    )
    pooled = pooled_tokens_per_s(lora_arm.loads) / pooled_tokens_per_s(merged_arm.loads)
    print(f"throughput lora/merged pooled over all rounds (tokens / seconds): {pooled:.3f}")
    print(f"machine after: {machine_note()}")


def _picked(index: int, share: float) -> bool:
    """Spread ``share`` of the indices evenly (Bresenham): 0.5 -> every other one."""
    return int((index + 1) * share) > int(index * share)


if __name__ == "__main__":
    main()
