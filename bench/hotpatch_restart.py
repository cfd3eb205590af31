"""Hot-patch time vs a restart to the same weights.

    .venv/bin/python bench/hotpatch_restart.py                 # default model (~3-4 min)
    .venv/bin/python bench/hotpatch_restart.py --model tiny    # smoke test

One run on one server:

1. start-up: `vsp serve --deltas none` until /health answers;
2. hot patch: POST /v1/safety/deltas/activate, {"deltas": ["all"]} and back to [] in turn,
   ``--switches`` times; each timed at the client (request sent to answer read), with the
   server's own breakdown (verify / drain / reload) from the reply;
3. restart to the same weights: stop that server (SIGTERM to its process group, until every
   process is gone) and start `vsp serve --deltas all` until /health answers.

The same greedy probe answer is read after the hot patch and after the restart: the two
ways to the `all` weights must give identical text. Target: restart / hot patch >= 50.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import ADMIN_TOKEN, Server, machine_note, post_json, prepare, probe, prompts

TARGET = 50.0


def activate(server: Server, names: list[str]) -> tuple[float, dict]:
    """Client wall time of one switch, and the server's reply."""
    started = time.perf_counter()
    # The switch alone, as measured before the canary existed (its cost: README, "Canary").
    body = {"deltas": names, "canary": False}
    reply = post_json(server.url + "/v1/safety/deltas/activate", body, ADMIN_TOKEN)
    seconds = time.perf_counter() - started
    if reply.status_code != 200:
        raise SystemExit(f"activation refused: HTTP {reply.status_code} {reply.text[:500]}")
    return seconds, reply.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a folder")
    parser.add_argument("--switches", type=int, default=7, help="hot patches (odd)")
    parser.add_argument("--max-tokens", type=int, default=24, help="of the probe answer")
    args = parser.parse_args()

    setup = prepare(args.model, "hotpatch_restart")
    # A Thai MultiJail prompt: the 'all' delta changes this model's answer to it.
    text = setup.clip(next(t for lang, t in prompts(20, ("multijail",)) if lang == "th"))
    print(f"machine: {machine_note()}")
    print(f"model {setup.model}")

    first = Server.vsp(setup, "none")
    try:
        start_up = first.start()
        print(f"start-up (vsp serve --deltas none, to /health): {start_up:.1f} s", flush=True)
        seconds, header, base_answer = probe(first, text, args.max_tokens)
        print(f"first request: {seconds:.2f} s, served '{header}'")
        to_all, to_none = [], []
        # An odd count: base -> all -> base ... -> all, the weights the restart will serve.
        for i in range(args.switches | 1):
            names = ["all"] if i % 2 == 0 else []
            wall, reply = activate(first, names)
            switch = reply["switch"]
            (to_all if names else to_none).append(wall)
            print(
                f"  switch to {names or 'base'}: {wall:.3f} s at the client; server: verify "
                f"{switch['verify_seconds']:.3f}, drain {switch['drain_seconds']:.3f}, reload "
                f"{switch['reload_seconds']:.3f} ({switch['tensors']} tensors), total "
                f"{switch['total_seconds']:.3f} s",
                flush=True,
            )
        seconds, header, patched_answer = probe(first, text, args.max_tokens)
        print(f"after the hot patch: served '{header}', probe {seconds:.2f} s")
    finally:
        stop = first.stop()
    print(f"stop (SIGTERM until every process is gone): {stop:.1f} s", flush=True)
    with Server.vsp(setup, "all") as second:
        start_all = second.start()
        print(f"start (vsp serve --deltas all, to /health): {start_all:.1f} s", flush=True)
        seconds, header, restarted_answer = probe(second, text, args.max_tokens)
        print(f"after the restart: served '{header}', first request {seconds:.2f} s")

    hot = statistics.median(to_all)
    restart = stop + start_all
    same = patched_answer == restarted_answer
    print(f"probe answer, base:      {base_answer!r}")
    print(f"probe answer, hot patch: {patched_answer!r}")
    print(f"probe answer, restart:   {restarted_answer!r}")
    print(f"hot patch and restart serve the same weights (identical greedy answer): {same}")
    print(
        f"hot patch to 'all': median {hot:.3f} s of {len(to_all)} "
        f"(min {min(to_all):.3f}, max {max(to_all):.3f}); back to base: median "
        f"{statistics.median(to_none) if to_none else float('nan'):.3f} s"
    )
    print(f"restart to the same weights: {restart:.1f} s (stop {stop:.1f} + start {start_all:.1f})")
    ratio = restart / hot
    verdict = "MET" if ratio >= TARGET else "MISSED"
    print(f"ratio restart / hot patch: {ratio:.0f}x (target >= {TARGET:.0f}x): {verdict}")
    print(f"machine after: {machine_note()}")
    if not same:
        raise SystemExit("the hot-patched and the restarted server answer differently")


if __name__ == "__main__":
    main()
