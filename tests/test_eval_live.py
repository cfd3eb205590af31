"""``vsp eval`` against a real ``vsp serve`` (vLLM's OpenAI server with a delta merged at
load) on a tiny random-weight model: the harness speaks to the real server, a second run is
served from the cache. One server start (~1-2 min on 2 cores)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_delta
from serving_helpers import (
    engine_env,
    free_port,
    start_logged,
    stop_process_group,
    vsp_command,
    wait_healthy,
)
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.eval.results import read_results

START_TIMEOUT_S = 360


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("eval-live")
    _, blob = make_delta(tiny_qwen2, group="eval", languages=("th",))
    delta = root / "eval.safetensors"
    delta.write_bytes(blob)
    port = free_port()
    command = vsp_command(
        "serve",
        "--model",
        str(tiny_qwen2),
        "--deltas",
        str(delta),
        "--port",
        str(port),
        "--",
        "--max-model-len",
        "512",
        "--seed",
        "0",
    )
    log = root / "server.log"
    cores = sorted(os.sched_getaffinity(0))
    process = start_logged(command, engine_env(cores[-1]), log)
    try:
        url = f"http://127.0.0.1:{port}"
        seconds = wait_healthy(process, url, log, START_TIMEOUT_S)
        print(f"\nvsp serve (eval): healthy after {seconds:.1f} s")
        yield {"url": url, "model": str(tiny_qwen2), "log": log}
    finally:
        stop_process_group(process)


def test_eval_against_vsp_serve_and_resume(served: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["eval", "--base-url", served["url"], "--model", served["model"]]
    # Chinese: its MGSM problems fit the tiny model's 512-token window (one token a character).
    args += ["--suites", "multijail,polyrefuse,mgsm", "--langs", "zh", "--n", "3"]
    args += ["--refusal-tokens", "8", "--mgsm-tokens", "8", "--concurrency", "4"]
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output + served["log"].read_text()[-3000:]
    results = read_results(out)
    assert results.run.requests == 24 and results.run.cached == 0
    assert results.run.source == {"endpoint": served["url"] + "/v1", "model": served["model"]}
    cells = {(f.suite, f.metric, f.lang) for f in results.figures if f.judge == "keywords"}
    assert ("multijail", "refusal_rate", "zh") in cells
    assert ("polyrefuse-harmless", "over_refusal", "zh") in cells
    assert ("mgsm", "mgsm_accuracy", "zh") in cells
    assert all(f.n == 3 and 0 <= f.ci_low <= f.rate <= f.ci_high <= 1 for f in results.figures)
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 24 and any(r["reply"] for r in replies)  # the tiny model babbles
    assert (out / "refusal.png").stat().st_size > 0 and (out / "report.md").is_file()

    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "24 requests (24 cached)" in again.output
    assert read_results(out).figures == results.figures
