"""Shared by the tests that start a real vLLM server on loopback (loader, hot-patch, metrics)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def engine_env(core: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB: plenty for a 512-token tiny model
        # One core each: OpenMP threads spread over the shared cores spin-wait against the
        # other jobs; and the same thread count on both sides keeps the sums in one order.
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for name in ("VSP_DELTAS", "VSP_ADMIN_TOKEN", "VSP_ADMIN_TOKEN_FILE", "VLLM_PLUGINS"):
        env.pop(name, None)
    return env


def vsp_command(*args: str) -> list[str]:
    """``vsp ARGS`` with this interpreter's console script (or ``python -m`` without one)."""
    vsp = Path(sys.executable).with_name("vsp")
    prefix = [str(vsp)] if vsp.exists() else [sys.executable, "-m", "vllm_safety_patch.cli"]
    return [*prefix, *args]


def start_logged(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A server in a session of its own (so its whole group can be stopped), output to ``log``."""
    with log.open("w") as handle:
        return subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process and everything in its session (vLLM's EngineCore and workers)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(2)
    if process.poll() is None:
        process.wait(timeout=30)


def request(
    method: str,
    url: str,
    body: dict | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, Any, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    sent = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            raw = reply.read()
            return reply.status, json.loads(raw) if raw else None, dict(reply.headers)
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None, dict(error.headers)


def wait_healthy(process: subprocess.Popen, base_url: str, log: Path, timeout_s: float) -> float:
    """Seconds until ``/health`` answers 200; fails the test with the log tail otherwise."""
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            pytest.fail(f"vsp serve exited ({process.returncode}):\n{log.read_text()[-6000:]}")
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"server not healthy in {timeout_s} s:\n{log.read_text()[-6000:]}")
        try:
            if request("GET", base_url + "/health")[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)


SERVE_START_TIMEOUT_S = 360


def delta_label(delta: Any) -> str:
    """What ``X-Safety-Deltas`` says for one delta: ``group@fingerprint[:12]``."""
    return f"{delta.group}@{delta.manifest.base_model.fingerprint[:12]}"


def start_vsp_serve(
    model: Path,
    delta_dir: Path,
    deltas: str,
    token_file: Path,
    log: Path,
    core: int,
    env_extra: dict[str, str] | None = None,
    timeout_s: float = SERVE_START_TIMEOUT_S,
) -> tuple[subprocess.Popen, str, float]:
    """``vsp serve`` of a (tiny) model on loopback, pinned to one core: (process, URL,
    seconds to healthy). The caller stops it with :func:`stop_process_group`."""
    port = free_port()
    command = vsp_command(
        "serve", "--model", str(model), "--delta-dir", str(delta_dir), "--deltas", deltas,
        "--admin-token-file", str(token_file), "--port", str(port),
        "--", "--max-model-len", "512", "--seed", "0",
    )  # fmt: skip
    env = {**engine_env(core), **(env_extra or {})}
    process = start_logged(command, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_healthy(process, url, log, timeout_s)
    except BaseException:
        stop_process_group(process)
        raise
    return process, url, seconds
