"""`vsp eval` of the default model served by stock vLLM and by `vsp serve`, then compare.

    .venv/bin/python bench/eval_stock_vs_vsp.py           # default model (~30-40 min)
    .venv/bin/python bench/eval_stock_vs_vsp.py --model tiny --n 2 --langs it \
        --suites multijail,polyrefuse                       # smoke test (512-token model)

Issue 6's end-to-end check, one server at a time (a real-model vLLM worker holds ~6.5 GB):

1. stock vLLM (no plugin of ours loaded) serves the base checkpoint; `vsp eval` writes
   results.json, report.md and plots to OUT/stock;
2. `vsp serve --deltas DELTAS` serves the same checkpoint with the delta merged at load;
   `vsp eval --baseline OUT/stock` writes OUT/vsp with before/after plots;
3. `vsp eval compare OUT/stock OUT/vsp` prints the differences and their significance
   (exact McNemar on the paired prompts) and writes OUT/compare.

Both arms get the same vLLM flags, prompts (held-out rows) and greedy decoding; only the
weights differ. Nothing here is timed: the figures are refusal rates and accuracies.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from _common import REPO, SERVED_NAME, VSP, Server, check_stock, machine_note, prepare

# Rich wraps tables at 80 columns when not on a terminal; these go to logs.
WIDE = {**os.environ, "COLUMNS": "160"}


def evaluate(server: Server, args: argparse.Namespace, out: Path, extra: list[str]) -> None:
    command = [VSP, "eval", "--base-url", server.url + "/v1", "--model", SERVED_NAME]
    command += ["--suites", args.suites, "--n", str(args.n), "--out", str(out)]
    command += ["--mgsm-tokens", str(args.mgsm_tokens), "--concurrency", str(args.concurrency)]
    command += ["--langs", args.langs] if args.langs else []
    print("$", " ".join(command + extra), flush=True)
    subprocess.run(command + extra, check=True, env=WIDE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a folder")
    parser.add_argument("--deltas", default="all", help="what `vsp serve --deltas` merges")
    parser.add_argument("--suites", default="multijail,polyrefuse,mgsm")
    parser.add_argument(
        "--langs",
        default="zh,it,vi,ar,ko,th,bn,sw,jv",
        help="languages (en always); default: the nine MultiJail ones",
    )
    parser.add_argument("--n", type=int, default=12, help="held-out prompts per suite+language")
    parser.add_argument("--mgsm-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "eval")
    args = parser.parse_args()

    setup = prepare(args.model, "eval_stock_vs_vsp")
    check_stock()
    print(f"machine: {machine_note()}")
    print(f"model {setup.model}; vsp serve --deltas {args.deltas}", flush=True)
    stock_out, vsp_out = args.out / "stock", args.out / "vsp"

    with Server.stock(setup, setup.model) as stock:
        print(f"stock vLLM healthy after {stock.start():.1f} s", flush=True)
        evaluate(stock, args, stock_out, ["--label", "stock vLLM"])
    with Server.vsp(setup, args.deltas) as patched:
        print(f"vsp serve healthy after {patched.start():.1f} s", flush=True)
        label = f"vsp serve --deltas {args.deltas}"
        evaluate(patched, args, vsp_out, ["--label", label, "--baseline", str(stock_out)])

    command = [VSP, "eval", "compare", str(stock_out), str(vsp_out)]
    command += ["--out", str(args.out / "compare")]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=WIDE)


if __name__ == "__main__":
    main()
