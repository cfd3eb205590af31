"""How long the commands that only read a delta's header take, and whether they import torch.

    .venv/bin/python bench/header_commands.py              # shipped deltas, 7 runs each
    .venv/bin/python bench/header_commands.py --runs 15

Runs each command as a user does (the ``vsp`` console script, a fresh process every time):
``vsp --version`` (the floor: Python, typer, rich and the CLI's own modules), ``vsp inspect``
(text and ``--json``), ``vsp verify --no-model`` on every shipped delta and ``vsp deltas
list`` against a stand-in server on loopback that answers ``GET /v1/safety/deltas`` with a
listing of the shipped deltas (what a real server sends; a real one would add vLLM's
start-up and nothing to the client's time). For reference, ``python -c "import torch"``.

Prints, per command, the median, min and max wall time, the median CPU time (user + system
of the child; wall time on a busy machine includes waiting for a core) and whether torch was
imported (``PYTHONPROFILEIMPORTTIME`` in one extra run). Target: well under 1 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYTHON, REPO, VSP, machine_note  # noqa: E402

DELTAS = REPO / "deltas" / "qwen2.5-coder-0.5b-instruct"


def listing(deltas: list[Path]) -> dict:
    """A ``GET /v1/safety/deltas`` answer for these files (its fields as the server sends)."""
    from vllm_safety_patch.delta_view import read_delta_header

    available = []
    for path in deltas:
        delta = read_delta_header(path)
        available.append(
            {
                "name": path.stem,
                "group": delta.group,
                "languages": delta.manifest.languages,
                "fingerprint": delta.manifest.base_model.fingerprint[:12],
                "sha256": delta.sha256[:12],
                "matches_model": True,
                "problem": None,
                "active": path.stem == "all",
            }
        )
    return {
        "model": "qwen2.5-coder-0.5b-instruct",
        "header": "all@" + available[0]["fingerprint"],
        "available": available,
        "hot_patch": True,
        "last_switch": None,
    }


def stand_in_server(payload: dict) -> ThreadingHTTPServer:
    body = json.dumps(payload).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            found = self.path == "/v1/safety/deltas"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if found else 2))
            self.end_headers()
            self.wfile.write(body if found else b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, child CPU s, stderr) of one run; a failed command stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stderr


def imports_torch(argv: list[str], env: dict[str, str]) -> bool:
    _, _, stderr = run_once(argv, {**env, "PYTHONPROFILEIMPORTTIME": "1"})
    # Lines read "import time: <self us> | <cumulative us> | <indent><module>".
    return any(
        line.startswith("import time:") and line.split("|")[-1].strip() == "torch"
        for line in stderr.splitlines()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (median shown)")
    args = parser.parse_args()

    deltas = sorted(DELTAS.glob("*.safetensors"))
    server = stand_in_server(listing(deltas))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    commands = {
        "vsp --version (floor)": [VSP, "--version"],
        "vsp inspect all.safetensors": [VSP, "inspect", str(DELTAS / "all.safetensors")],
        "vsp inspect --json all.safetensors": [
            VSP,
            "inspect",
            "--json",
            str(DELTAS / "all.safetensors"),
        ],
        f"vsp verify --no-model ({len(deltas)} shipped deltas)": [
            VSP,
            "verify",
            "--no-model",
            *map(str, deltas),
        ],
        "vsp deltas list (stand-in server)": [VSP, "deltas", "list", "--url", url],
        'python -c "import torch" (reference)': [PYTHON, "-c", "import torch"],
    }
    print(f"before: {machine_note()}")
    print(f"{'command':<44} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7}  torch")
    try:
        for label, argv in commands.items():
            run_once(argv, env)  # warm the page cache
            runs = [run_once(argv, env) for _ in range(args.runs)]
            walls = [wall for wall, _, _ in runs]
            cpu = statistics.median(cpu for _, cpu, _ in runs)
            torch = "yes" if imports_torch(argv, env) else "no"
            print(
                f"{label:<44} {statistics.median(walls):>9.3f} {min(walls):>7.3f} "
                f"{max(walls):>7.3f} {cpu:>7.3f}  {torch}",
                flush=True,
            )
    finally:
        server.shutdown()
    print(f"after: {machine_note()}")


if __name__ == "__main__":
    main()
