"""What users feel during an activation with the canary: held (no LoRA support) vs probed as
a LoRA adapter while the merged set serves (issue 21).

    .venv/bin/python bench/canary_traffic.py                  # default model (~15-25 min)
    .venv/bin/python bench/canary_traffic.py --model tiny     # smoke test

Two servers, one after the other (never both at once), each under ``nice -n 10``:

- held: `vsp serve --deltas none` (no LoRA support: the canary runs with the gate closed);
- adapter: the same plus `-- --enable-lora --max-lora-rank 32 --max-loras 2` (the canary
  probes `all` as an adapter; traffic is held for the drain and reload only).

On each: ``--idle`` greedy chat requests one after another with nothing else running (the
cost of `--enable-lora` to a request that uses no adapter); then the activation of `all`
with the canary (``--prompts`` per kind and language), timed at the client, while a user
request (``--max-tokens`` tokens, open loop) is sent every ``--every`` seconds; the
latencies of those sent during the activation, p50 and p99, and the set that answered each.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from _common import (
    ADMIN_TOKEN,
    Server,
    machine_note,
    post_json,
    prepare,
    probe,
    prompts,
    quantile,
)

LORA_FLAGS = ("--enable-lora", "--max-lora-rank", "32", "--max-loras", "2")


def chat(server: Server, text: str, max_tokens: int) -> tuple[float, str]:
    seconds, header, _ = probe(server, text, max_tokens, timeout=1800)
    return seconds, header


def arm(setup, name: str, extra: tuple[str, ...], args, texts: list[str]) -> dict:
    server = Server.vsp(setup, "none", extra=extra)
    server.argv = ["nice", "-n", "10", *server.argv]  # the cores are shared
    # Adapter probes are slower on CPU (LoRA kernels, shared batches): room for them.
    server.env["VSP_CANARY_TIMEOUT_S"] = "1800"
    with server:
        start = server.start()
        print(f"[{name}] healthy after {start:.1f} s ({machine_note()})", flush=True)
        chat(server, texts[0], args.max_tokens)  # warm-up
        idle = [chat(server, texts[i % len(texts)], args.max_tokens)[0] for i in range(args.idle)]
        print(
            f"[{name}] idle request ({args.max_tokens} tokens): median "
            f"{statistics.median(idle):.3f} s of {len(idle)} (min {min(idle):.3f}, "
            f"max {max(idle):.3f})",
            flush=True,
        )
        during: list[tuple[float, float, str]] = []
        lock = threading.Lock()
        done = threading.Event()

        def user(i: int) -> None:
            sent = time.monotonic()
            seconds, header = chat(server, texts[i % len(texts)], args.max_tokens)
            with lock:
                during.append((sent, seconds, header))

        body = {"deltas": ["all"], "canary": {"prompts": args.prompts}}
        result: dict = {}

        def switch() -> None:
            started = time.perf_counter()
            reply = post_json(server.url + "/v1/safety/deltas/activate", body, ADMIN_TOKEN, 3600)
            result["wall"] = time.perf_counter() - started
            result["reply"] = reply
            result["ended"] = time.monotonic()
            done.set()

        began = time.monotonic()
        switcher = threading.Thread(target=switch)
        switcher.start()
        users = []
        i = 0
        while not done.wait(args.every if i else 0.2):
            thread = threading.Thread(target=user, args=(i,))
            thread.start()
            users.append(thread)
            i += 1
        switcher.join()
        for thread in users:
            thread.join()
        reply = result["reply"]
        if reply.status_code != 200:
            raise SystemExit(f"[{name}] activation: HTTP {reply.status_code} {reply.text[:800]}")
        answer = reply.json()
        record, report = answer["switch"], answer["canary"]
        inside = [(s, sec, h) for s, sec, h in during if began < s < result["ended"]]
        latencies = [sec for _, sec, _ in inside]
        headers = sorted({h for _, _, h in inside})
        print(
            f"[{name}] activation of 'all' with the canary ({report['prompts']} probes per "
            f"kind and language, {report['max_tokens']} tokens, passed {report['passed']}): "
            f"{result['wall']:.1f} s at the client; server: verify "
            f"{record['verify_seconds']:.2f}, drain {record['drain_seconds']:.2f}, reload "
            f"{record['reload_seconds']:.2f}, canary {record['canary_seconds']:.1f} s",
            flush=True,
        )
        print(
            f"[{name}] {len(inside)} user requests sent during it: p50 "
            f"{quantile(latencies, 0.5):.2f} s, p99 {quantile(latencies, 0.99):.2f} s, max "
            f"{max(latencies, default=float('nan')):.2f} s; answered by {headers}",
            flush=True,
        )
        stop = server.stop()
    return {
        "idle": statistics.median(idle),
        "wall": result["wall"],
        "held": record["drain_seconds"]
        + record["reload_seconds"]
        + (record["canary_seconds"] if name == "held" else 0.0),
        "p50": quantile(latencies, 0.5),
        "p99": quantile(latencies, 0.99),
        "start": start,
        "stop": stop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a folder")
    parser.add_argument("--prompts", type=int, default=16, help="canary probes per kind, lang")
    parser.add_argument("--idle", type=int, default=8, help="idle requests per server")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between user requests")
    parser.add_argument("--max-tokens", type=int, default=8, help="of a user request")
    parser.add_argument("--arms", default="held,adapter", help="which, in order")
    args = parser.parse_args()

    setup = prepare(args.model, "canary_traffic")
    texts = [setup.clip(t) for _, t in prompts(40, ("mgsm",))]
    print(f"machine: {machine_note()}")
    print(f"model {setup.model}")
    found = {}
    for name in args.arms.split(","):
        found[name] = arm(setup, name, LORA_FLAGS if name == "adapter" else (), args, texts)
    print(f"machine after: {machine_note()}")
    if {"held", "adapter"} <= set(found):
        held, lora = found["held"], found["adapter"]
        restart = held["stop"] + held["start"]
        print(
            f"idle request, --enable-lora / without: {lora['idle'] / held['idle']:.3f} "
            f"({lora['idle']:.3f} s / {held['idle']:.3f} s)"
        )
        print(
            f"activation end to end, adapter / held: {lora['wall'] / held['wall']:.3f} "
            f"({lora['wall']:.1f} s / {held['wall']:.1f} s); restart (stop + start of the "
            f"held server) / activation: held {restart / held['wall']:.2f}x, adapter "
            f"{restart / lora['wall']:.2f}x"
        )
        print(
            f"traffic held by the server: held {held['held']:.2f} s, adapter {lora['held']:.2f} s"
        )
        print(
            f"requests during an activation, p50: held {held['p50']:.2f} s, adapter "
            f"{lora['p50']:.2f} s (ratio {lora['p50'] / held['p50']:.3f}); p99: held "
            f"{held['p99']:.2f} s, adapter {lora['p99']:.2f} s (ratio "
            f"{lora['p99'] / held['p99']:.3f})"
        )


if __name__ == "__main__":
    main()
