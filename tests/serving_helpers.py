"""Shared by the tests that start a real vLLM server on loopback (loader, hot-patch, metrics)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


# Loaded by every Python process of one test server (PYTHONPATH), never by production code.
_FORCED_REFUSAL = """\
from vllm_safety_patch.server import canary

_judge = canary.is_refusal


def _forced(text, lang):
    return text.lstrip().startswith({marker!r}) or _judge(text, lang)


canary.is_refusal = _forced
"""


def forced_refusal_env(folder: Path, marker: str) -> dict[str, str]:
    """Environment for a test server whose canary also counts a reply opening with
    ``marker`` as a refusal (the tiny random models never refuse): a ``sitecustomize``
    module in ``folder``, on that server's PYTHONPATH only, replaces the canary's judge."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_FORCED_REFUSAL.format(marker=marker))
    path = os.pathsep.join(filter(None, (str(folder), os.environ.get("PYTHONPATH"))))
    return {"PYTHONPATH": path}


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


# ---------------------------------------------------------------------------------------
# A stand-in replica (issue 20): one that redirects, lies or answers late
# ---------------------------------------------------------------------------------------

LISTING = "/v1/safety/deltas"
CHECK = "/v1/safety/deltas/check"
ACTIVATE = "/v1/safety/deltas/activate"


class Stub:
    """A replica on 127.0.0.1 that serves one set by name and records every request.

    ``activate`` says how it answers an activation: ``ok``; ``slow`` (answers after
    ``delay`` s, and its listing reports ``switching`` until then, as vsp serve does);
    ``nonjson`` (switches, then answers 200 with an HTML page); ``redirect`` (302 to
    ``location``); ``redirect_all`` redirects every route. ``answers`` replaces any
    other answer (a lying replica copies a real one's listing and check)."""

    def __init__(
        self, serving: str, activate: str = "ok", delay: float = 0.0, token: str = ""
    ) -> None:
        self.serving = serving
        self.token = token  # the admin token, to tell where it was sent
        # (method, path) -> (status, JSON): answers that replace the scripted ones.
        self.answers: dict[tuple[str, str], tuple[int, dict]] = {}
        self.activate = activate
        self.delay = delay
        self.location = ""
        self.switching = False
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stub.handle(self, "GET")

            def do_POST(self) -> None:
                stub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def entry(self, name: str) -> list[dict]:
        return [{"name": name, "group": name, "fingerprint": "f", "sha256": name}] if name else []

    def listing(self) -> dict:
        return {
            "hot_patch": True,
            "active": self.entry(self.serving),
            "header": self.serving or "none",
            "switching": self.switching,
        }

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        self.requests.append((method, handler.path, dict(handler.headers)))
        if self.activate == "redirect_all" or (
            self.activate == "redirect" and handler.path == ACTIVATE
        ):
            return self.send(handler, 302, b"", {"Location": self.location})
        if (method, handler.path) in self.answers and not (
            handler.path == ACTIVATE and self.activate == "nonjson"
        ):
            return self.send(handler, *self.answers[(method, handler.path)])
        if handler.path == LISTING and method == "GET":
            return self.send(handler, 200, self.listing())
        if handler.path == CHECK:
            target = ",".join(body["deltas"])
            return self.send(
                handler,
                200,
                {
                    "changed": target != self.serving,
                    "requested": self.entry(target),
                    "requested_header": target or "none",
                },
            )
        if handler.path == ACTIVATE:
            return self.switch(handler, body)
        return self.send(handler, 404, {"error": {"message": "no such route"}})

    def switch(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        target = ",".join(body["deltas"])
        rollback = body.get("canary") is False
        if self.activate == "slow" and not rollback:
            self.switching = True
            time.sleep(self.delay)  # the client gave up meanwhile; the switch goes on
            self.switching = False
        changed, self.serving = target != self.serving, target
        if self.activate == "nonjson" and not rollback:
            return self.send(handler, 200, b"<html>switched</html>", {"Content-Type": "text/html"})
        self.send(handler, 200, {"changed": changed, "header": target or "none", "canary": None})

    def send(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        body: dict | bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            handler.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # the client hung up (timed out)
            pass

    def saw_token(self, path: str) -> bool:
        return any(
            self.token in json.dumps(headers) for _, seen, headers in self.requests if seen == path
        )
