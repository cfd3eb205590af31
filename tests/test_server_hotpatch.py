"""Hot-patching a live vLLM server: ``vsp serve`` + the /v1/safety routes, on a tiny model.

One real server (started through ``vsp serve``, the real launcher) serves the tiny Qwen2
with delta ``first``; the tests switch it between ``second``, base weights and ``first`` and
compare its greedy token ids with references computed separately: vLLM offline engines on
checkpoints merged offline (``write_merged_checkpoint``), one engine after another in a
helper subprocess (this file run as a script), started while the server starts. The auth
dependency, the launcher and the restore-on-failure path are also checked without vLLM
(FastAPI TestClient, fake engine), which is cheaper than a second server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import random_edit
from serving_helpers import (
    delta_label,
    engine_env,
    free_port,
    request,
    start_logged,
    stop_process_group,
    vsp_command,
    wait_healthy,
)

from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.export import write_merged_checkpoint
from vllm_safety_patch.delta.io import TensorEdit, read_delta
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.vllm_plugin.worker_extension import RELOAD_METHOD, reload_names

PROMPTS = ["Hello world", "The cat", "1 2 3 4"]  # under one KV block: no prefix-cache reuse
MAX_TOKENS = 12
MAX_MODEL_LEN = 512
TOKEN = "test-admin-token-0123456789abcdef"
START_TIMEOUT_S = 360
REFERENCE_TIMEOUT_S = 420


# ---------------------------------------------------------------------------------------
# Files: tiny model, deltas with a large effect, merged reference checkpoints
# ---------------------------------------------------------------------------------------


def strong_delta(model: Path, group: str, seed: int, layers: tuple[int, ...]) -> bytes:
    """A valid delta on down_proj columns and up_proj rows, large enough to change greedy
    tokens (conftest's make_delta is scaled for format tests, not for visible effects)."""
    checkpoint = Checkpoint(model)
    edits = []
    for offset, layer in enumerate(layers):
        for part, (name, axis) in enumerate((("down_proj", "columns"), ("up_proj", "rows"))):
            edit = random_edit(
                checkpoint,
                f"model.layers.{layer}.mlp.{name}.weight",
                axis,
                k=48,
                rank=4,
                seed=seed + 2 * offset + part,
            )
            edits.append(TensorEdit(spec=edit.spec, neurons=edit.neurons, B=edit.B * 5, A=edit.A))
    return build_delta(
        group=group,
        languages=("th",),
        model_id=model.name,
        config=checkpoint.config,
        base_tensors=checkpoint.get_many([edit.name for edit in edits]),
        edits=edits,
        solver={"method": "random-test"},
    )[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path, tiny_llama: Path) -> dict:
    root = tmp_path_factory.mktemp("hotpatch")
    delta_dir = root / "deltas"
    delta_dir.mkdir()
    # `second` shares layer 2 with `first` and leaves layer 0 alone: switching first ->
    # second must both undo first's layer-0 edit and replace its layer-2 edit.
    (delta_dir / "first.safetensors").write_bytes(strong_delta(tiny_qwen2, "first", 0, (0, 2)))
    (delta_dir / "second.safetensors").write_bytes(strong_delta(tiny_qwen2, "second", 100, (1, 2)))
    (delta_dir / "llama.safetensors").write_bytes(strong_delta(tiny_llama, "llama", 5, (0,)))
    (delta_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    token_file = root / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    base = Checkpoint(tiny_qwen2)
    first = read_delta(delta_dir / "first.safetensors")
    second = read_delta(delta_dir / "second.safetensors")
    return {
        "root": root,
        "model": tiny_qwen2,
        "delta_dir": delta_dir,
        "token_file": token_file,
        "first": first,
        "second": second,
        "merged": {
            "base": tiny_qwen2,
            "first": write_merged_checkpoint(base, [first], root / "merged-first"),
            "second": write_merged_checkpoint(base, [second], root / "merged-second"),
        },
    }


# ---------------------------------------------------------------------------------------
# Processes: the server (through `vsp serve`) and the reference runner, started together
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(files: dict) -> Iterator[dict]:
    cores = sorted(os.sched_getaffinity(0))
    root = files["root"]
    # The reference engines run while the server starts (both mostly wait on imports).
    spec = root / "reference-spec.json"
    spec.write_text(json.dumps({name: str(path) for name, path in files["merged"].items()}))
    reference_log = (root / "reference.log").open("w")
    reference = subprocess.Popen(
        [sys.executable, __file__, str(spec), str(root / "reference.json")],
        env=dict(engine_env(cores[0]), VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        stdout=reference_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # The worker methods come from the general plugin (vllm_plugin.register), as in production.
    extra = ["--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    port = free_port()
    command = vsp_command(
        "serve",
        "--model",
        str(files["model"]),
        "--delta-dir",
        str(files["delta_dir"]),
        "--deltas",
        "first",
        "--admin-token-file",
        str(files["token_file"]),
        "--port",
        str(port),
        "--",
        *extra,
    )
    log = root / "server.log"
    process = start_logged(command, engine_env(cores[-1]), log)
    try:
        base_url = f"http://127.0.0.1:{port}"
        start_seconds = wait_healthy(process, base_url, log, START_TIMEOUT_S)
        print(f"\nvsp serve: healthy after {start_seconds:.1f} s")
        try:
            reference.wait(timeout=REFERENCE_TIMEOUT_S)
        finally:
            reference_log.close()
        if reference.returncode != 0:
            pytest.fail(f"reference runner failed:\n{(root / 'reference.log').read_text()[-6000:]}")
        yield {
            "url": base_url,
            "model": str(files["model"]),
            "log": log,
            "start_seconds": start_seconds,
            "reference": json.loads((root / "reference.json").read_text()),
            "outputs": {},
        }
    finally:
        stop_process_group(reference)
        stop_process_group(process)


# ---------------------------------------------------------------------------------------
# HTTP helpers (urllib: no client library needed)
# ---------------------------------------------------------------------------------------


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def activate(server: dict, names: list[str], headers: dict[str, str] | None = None) -> tuple:
    url = server["url"] + "/v1/safety/deltas/activate"
    return request("POST", url, {"deltas": names}, admin() if headers is None else headers, 300)


def listing(server: dict) -> dict:
    status, body, headers = request("GET", server["url"] + "/v1/safety/deltas")
    assert status == 200, body
    assert headers["x-safety-deltas"] == body["header"]
    return body


def greedy(server: dict) -> tuple[list[list[int]], set[str]]:
    """Greedy token ids for every prompt (one request at a time: a batch of one, like the
    reference engines) and the X-Safety-Deltas values the answers carried."""
    ids, seen = [], set()
    for prompt in PROMPTS:
        body = {
            "model": server["model"],
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        }
        status, reply, headers = request("POST", server["url"] + "/v1/completions", body)
        assert status == 200, reply
        ids.append(reply["choices"][0]["token_ids"])
        seen.add(headers["x-safety-deltas"])
    return ids, seen


# ---------------------------------------------------------------------------------------
# (a)-(f): the real server
# ---------------------------------------------------------------------------------------


def test_a_lists_deltas_and_headers(server: dict, files: dict) -> None:
    body = listing(server)
    first, second = files["first"], files["second"]
    assert [entry["name"] for entry in body["active"]] == ["first"]
    assert body["header"] == delta_label(first)
    assert body["hot_patch"] is True, body["hot_patch_problem"]
    available = {entry["name"]: entry for entry in body["available"]}
    assert set(available) == {"first", "second", "llama", "corrupt"}
    assert available["first"]["active"] and available["first"]["matches_model"]
    assert available["second"]["matches_model"] and not available["second"]["active"]
    # The listing reads headers only: a digest is known once the server read the file whole.
    assert available["second"]["sha256"] is None
    assert available["first"]["sha256"] == first.sha256[:12]
    assert available["second"]["fingerprint"] == second.manifest.base_model.fingerprint[:12]
    assert available["second"]["group"] == "second" and available["second"]["languages"] == ["th"]
    assert not available["llama"]["matches_model"]
    assert "another architecture" in available["llama"]["problem"]
    assert not available["corrupt"]["matches_model"] and available["corrupt"]["problem"]
    # The listing is open: it must not reveal where the server keeps its files.
    assert str(files["delta_dir"]) not in json.dumps(body)

    ids, seen = greedy(server)
    assert seen == {delta_label(first)}
    assert ids == server["reference"]["first"], "load-time merge differs from merged checkpoint"
    server["outputs"]["first"] = ids
    # Every route carries the header, even a 404 and /health.
    for path in ("/health", "/v1/models", "/no-such-route"):
        status, _, headers = request("GET", server["url"] + path)
        assert headers.get("x-safety-deltas") == delta_label(first), (path, status)


def test_b_activate_second_matches_its_merged_checkpoint(server: dict, files: dict) -> None:
    reference = server["reference"]
    # The three weight sets give three different greedy outputs, or the test proves nothing.
    assert reference["first"] != reference["second"] != reference["base"] != reference["first"]
    status, body, headers = activate(server, ["second"])
    assert status == 200, body
    assert body["changed"] and headers["x-safety-deltas"] == delta_label(files["second"])
    switch = body["switch"]
    print(
        f"\nhot patch first -> second: {switch['tensors']} tensors, reload "
        f"{switch['reload_seconds']:.3f} s, total {switch['total_seconds']:.3f} s "
        f"(server start {server['start_seconds']:.1f} s)"
    )
    ids, seen = greedy(server)
    assert seen == {delta_label(files["second"])}
    assert ids == reference["second"]
    listed = listing(server)
    assert listed["last_switch"]["to_deltas"] == [delta_label(files["second"])]
    available = {entry["name"]: entry for entry in listed["available"]}
    assert available["second"]["active"] and not available["first"]["active"]
    assert available["second"]["sha256"] == files["second"].sha256[:12]  # read when activated


def test_c_base_and_back_to_first_exactly(server: dict, files: dict) -> None:
    status, body, headers = activate(server, [])
    assert status == 200, body
    assert body["active"] == [] and headers["x-safety-deltas"] == "none"
    ids, seen = greedy(server)
    assert seen == {"none"}
    assert ids == server["reference"]["base"]

    status, body, _ = activate(server, ["first"])
    assert status == 200 and body["changed"], body
    ids, _ = greedy(server)
    assert ids == server["outputs"]["first"] == server["reference"]["first"]
    # The same set again: nothing to reload.
    status, body, _ = activate(server, ["first"])
    assert status == 200 and body["changed"] is False and body["switch"] is None


@pytest.mark.parametrize(
    ("names", "status", "kind", "words"),
    [
        (["llama"], 422, "delta_mismatch", "another architecture"),
        (["corrupt"], 422, "invalid_delta", "corrupt.safetensors"),
        (["../x"], 400, "invalid_name", "not a delta name"),
        (["..", "first"], 400, "invalid_name", "not a delta name"),
        (["nope"], 404, "unknown_delta", "no delta named 'nope'"),
        (["second", "nope"], 404, "unknown_delta", "no delta named 'nope'"),
        (["first", "first"], 422, "duplicate_delta", "given twice"),
    ],
)
def test_d_refusals_change_nothing(
    server: dict, files: dict, names: list[str], status: int, kind: str, words: str
) -> None:
    code, body, headers = activate(server, names)
    assert code == status, body
    error = body["error"]
    assert error["type"] == kind and error["code"] == status
    assert words in error["problem"] and error["fix"] and "Fix:" in error["message"]
    assert headers["x-safety-deltas"] == delta_label(files["first"])
    assert [entry["name"] for entry in listing(server)["active"]] == ["first"]


def test_d_outputs_unchanged_after_refusals(server: dict) -> None:
    ids, _ = greedy(server)
    assert ids == server["outputs"]["first"]


def test_e_auth_on_the_real_server(server: dict) -> None:
    for headers, problem in (
        ({}, "no admin token"),
        (admin("wrong-token-wrong-token-wrong"), "wrong admin token"),
        ({"Authorization": f"Basic {TOKEN}"}, "no admin token"),
    ):
        status, body, reply_headers = activate(server, ["second"], headers)
        assert status == 401, body
        assert body["error"]["problem"].startswith(problem)
        assert reply_headers["www-authenticate"].startswith("Bearer")
    assert [entry["name"] for entry in listing(server)["active"]] == ["first"]
    status, body, _ = activate(server, ["first"], {"X-VSP-Admin-Token": TOKEN})
    assert status == 200, body


def test_f_streams_survive_repeated_switches(server: dict, files: dict) -> None:
    labels = {delta_label(files["first"]), delta_label(files["second"]), "none"}
    stop = threading.Event()
    results: dict[str, Any] = {"ok": 0, "failed": [], "headers": {}, "latency": []}
    lock = threading.Lock()

    def client(index: int) -> None:
        for _ in range(200):  # bounded even if the switches hang
            if stop.is_set():
                return
            body = {
                "model": server["model"],
                "prompt": f"Stream {index}",
                "max_tokens": 24,
                "temperature": 0,
                "stream": True,
            }
            started = time.monotonic()
            try:
                req = urllib.request.Request(
                    server["url"] + "/v1/completions",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=120) as reply:
                    header = reply.headers.get("x-safety-deltas")
                    text = reply.read().decode()
                chunks = [line for line in text.splitlines() if line.startswith("data: ")]
                assert chunks and chunks[-1] == "data: [DONE]", text[-300:]
                assert not any('"error"' in chunk for chunk in chunks), text[:300]
                assert header in labels, header
                with lock:
                    results["ok"] += 1
                    results["headers"][header] = results["headers"].get(header, 0) + 1
                    results["latency"].append(time.monotonic() - started)
            except Exception as error:  # counted, reported, and fails the test below
                with lock:
                    results["failed"].append(repr(error)[:300])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    switches = []
    try:
        time.sleep(1.0)
        for step in range(9):
            names = [["second"], [], ["first"]][step % 3]
            status, body, _ = activate(server, names)
            assert status == 200, body
            switches.append(body["switch"])
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    latency = sorted(results["latency"])
    print(
        f"\nload: {results['ok']} streamed requests ok, {len(results['failed'])} failed, "
        f"by set {results['headers']}; {len(switches)} switches: reload mean "
        f"{sum(s['reload_seconds'] for s in switches) / len(switches):.3f} s, "
        f"drain max {max(s['drain_seconds'] for s in switches):.3f} s, total max "
        f"{max(s['total_seconds'] for s in switches):.3f} s; request latency p50 "
        f"{latency[len(latency) // 2]:.2f} s, max {latency[-1]:.2f} s"
    )
    assert not results["failed"], results["failed"][:3]
    assert results["ok"] >= 20 and len(results["headers"]) == 3
    # Switch durations are on the API server's /metrics too.
    with urllib.request.urlopen(server["url"] + "/metrics", timeout=60) as reply:
        assert 'vsp_hotpatch_seconds_count{outcome="ok"}' in reply.read().decode()
    # Back where we started: first, with its exact outputs.
    assert [entry["name"] for entry in listing(server)["active"]] == ["first"]
    ids, _ = greedy(server)
    assert ids == server["outputs"]["first"]


def test_g_cli_client(server: dict, files: dict) -> None:
    from typer.testing import CliRunner

    from vllm_safety_patch.cli import app

    runner = CliRunner()
    url = ["--url", server["url"]]
    listed = runner.invoke(app, ["deltas", "list", *url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["header"] == delta_label(files["first"])
    table = runner.invoke(app, ["deltas", "list", *url])
    assert table.exit_code == 0 and "second" in table.stdout and "llama" in table.stdout
    token = ["--token-file", str(files["token_file"])]
    switched = runner.invoke(app, ["deltas", "activate", "second", *url, *token])
    assert switched.exit_code == 0, switched.output
    assert f"active: {delta_label(files['second'])}" in switched.stdout
    no_token = {"VSP_ADMIN_TOKEN": None}
    refused = runner.invoke(app, ["deltas", "activate", "first", *url], env=no_token)
    assert refused.exit_code == 2 and "HTTP 401" in refused.output
    back = runner.invoke(app, ["deltas", "activate", "none", *url, *token])
    assert back.exit_code == 0 and "active: none" in back.stdout
    back = runner.invoke(app, ["deltas", "activate", "first", *url, *token])
    assert back.exit_code == 0 and f"active: {delta_label(files['first'])}" in back.stdout


# ---------------------------------------------------------------------------------------
# Without vLLM: auth dependency, header middleware, restore on failure, launcher, helpers
# ---------------------------------------------------------------------------------------


class FakeEngine:
    """collective_rpc / reset_prefix_cache / pause / resume, recording the calls."""

    def __init__(
        self, fail_reloads: int = 0, fail_text: str = "Worker failed with error 'boom'"
    ) -> None:
        self.calls: list[tuple] = []
        self.fail_reloads = fail_reloads
        self.fail_text = fail_text

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: Any = None
    ) -> list[dict]:
        self.calls.append((method, *args))
        if method == RELOAD_METHOD and self.fail_reloads:
            self.fail_reloads -= 1
            raise RuntimeError(self.fail_text)
        return [{"rank": 0, "tensors": len(args[2]) if len(args) > 2 else 0}]

    async def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        self.calls.append(("pause", mode))

    async def resume_generation(self) -> None:
        self.calls.append(("resume",))

    def reloads(self) -> list[list[str]]:
        return [list(call[2]) for call in self.calls if call[0] == RELOAD_METHOD]


def make_app(files: dict, token: str | None, engine: Any = None) -> Any:
    from fastapi import FastAPI

    from vllm_safety_patch.server.plugin import SafetyEndpointPlugin
    from vllm_safety_patch.server.state import ActiveEntry, SafetyState

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> dict:
        return {"ok": True}

    SafetyEndpointPlugin().attach_router(app)
    first = files["delta_dir"] / "first.safetensors"
    app.state.vsp_safety = SafetyState(
        delta_dir=files["delta_dir"],
        model_dir=files["model"],
        served_model="tiny",
        admin_token=token,
        engine=engine,
        active=[ActiveEntry.of(read_delta(first), first, files["delta_dir"])],
        hot_patch_problem=None if engine is not None else "this server has no engine",
    )
    return app


def test_e_no_token_configured_is_403_never_2xx(files: dict) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app(files, token=None)) as client:
        for headers in ({}, admin(), admin("anything-at-all-anything")):
            reply = client.post("/v1/safety/deltas/activate", json={"deltas": []}, headers=headers)
            assert reply.status_code == 403
            error = reply.json()["error"]
            assert "no admin token" in error["problem"] and "--admin-token-file" in error["fix"]
            assert reply.headers["x-safety-deltas"] == delta_label(files["first"])


def test_e_token_checks_without_vllm(files: dict) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app(files, token=TOKEN)) as client:
        url = "/v1/safety/deltas/activate"
        assert client.post(url, json={"deltas": []}).status_code == 401
        assert client.post(url, json={"deltas": []}, headers=admin("x" * 32)).status_code == 401
        # Auth is checked before the body: a bad body without a token is still a 401.
        assert client.post(url, json={"deltas": "x"}).status_code == 401
        # The right token reaches the handler (which refuses: this app has no engine).
        reply = client.post(url, json={"deltas": []}, headers=admin())
        assert reply.status_code == 409 and "no engine" in reply.json()["error"]["problem"]
        reply = client.post(url, json={"deltas": []}, headers={"X-VSP-Admin-Token": TOKEN})
        assert reply.status_code == 409
        assert client.post("/v1/completions").headers["x-safety-deltas"] == delta_label(
            files["first"]
        )


def test_failed_switch_restores_the_previous_set(files: dict) -> None:
    from fastapi.testclient import TestClient

    engine = FakeEngine(fail_reloads=1)
    app = make_app(files, token=TOKEN, engine=engine)
    with TestClient(app) as client:
        reply = client.post(
            "/v1/safety/deltas/activate", json={"deltas": ["second"]}, headers=admin()
        )
        assert reply.status_code == 500
        error = reply.json()["error"]
        assert error["type"] == "switch_failed" and "was restored" in error["problem"]
        assert reply.headers["x-safety-deltas"] == delta_label(files["first"])
    first, second = files["first"], files["second"]
    touched = sorted(set(first.edits) | set(second.edits))
    # Tried the new set, then reloaded the old one over the same tensors; resumed after.
    assert engine.reloads() == [[second.sha256], [first.sha256]]
    assert all(call[3] == touched for call in engine.calls if call[0] == RELOAD_METHOD)
    assert ("pause", "wait") in engine.calls and engine.calls[-1] == ("resume",)
    state = app.state.vsp_safety
    assert [entry.sha256 for entry in state.active] == [first.sha256] and state.degraded is None


def test_failed_restore_refuses_inference(files: dict) -> None:
    from fastapi.testclient import TestClient

    app = make_app(files, token=TOKEN, engine=FakeEngine(fail_reloads=2))
    with TestClient(app) as client:
        reply = client.post(
            "/v1/safety/deltas/activate", json={"deltas": ["second"]}, headers=admin()
        )
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "degraded"
        inference = client.post("/v1/completions")
        assert inference.status_code == 503 and inference.headers["x-safety-deltas"] == "unknown"


def test_users_get_no_server_path_or_worker_error(files: dict) -> None:
    """Degraded: users get a generic 503 with an incident id; the admin answer and the
    state the log prints keep the worker's words and paths (issue 20, finding 5)."""
    from fastapi.testclient import TestClient

    where = f"{files['delta_dir']}/second.safetensors"
    text = f"Worker failed with error 'cannot map {where}: Input/output error'"
    app = make_app(files, token=TOKEN, engine=FakeEngine(fail_reloads=2, fail_text=text))
    with TestClient(app) as client:
        reply = client.post(
            "/v1/safety/deltas/activate", json={"deltas": ["second"]}, headers=admin()
        )
        assert reply.status_code == 500 and where in reply.json()["error"]["problem"]
        inference = client.post("/v1/completions")
        listed = client.get("/v1/safety/deltas")
    state = app.state.vsp_safety
    assert inference.status_code == 503, inference.text
    error = inference.json()["error"]
    assert error["type"] == "degraded" and f"(incident {state.incident})" in error["problem"]
    for shown in (inference.text, listed.text):
        assert str(files["root"]) not in shown and "Input/output" not in shown
        assert "Worker failed" not in shown
    assert where in state.degraded and state.incident  # logged with the incident id


def test_the_open_listing_says_why_hot_patching_is_off_without_paths(files: dict) -> None:
    """The listing's hot_patch_problem is in fixed words; the admin routes get the detail
    (issue 20, finding 5)."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from vllm_safety_patch.server.plugin import _load_time_set, _unsupported
    from vllm_safety_patch.vllm_plugin.loader import LOAD_FORMAT

    nowhere = files["root"] / "not-a-checkpoint"
    public, detail = _unsupported(object(), SimpleNamespace(), nowhere)
    assert str(nowhere) not in public and str(nowhere) in detail
    gone = files["root"] / "gone.safetensors"
    config = SimpleNamespace(
        load_format=LOAD_FORMAT, model_loader_extra_config={"deltas": [str(gone)]}
    )
    app = make_app(files, token=TOKEN, engine=FakeEngine())
    state = app.state.vsp_safety
    _, problem = _load_time_set(config, state)
    assert problem is not None and str(gone) not in problem[0] and str(gone) in problem[1]
    state.hot_patch_problem, state.hot_patch_detail = problem
    with TestClient(app) as client:
        listed = client.get("/v1/safety/deltas").json()
        refused = client.post(
            "/v1/safety/deltas/activate", json={"deltas": ["second"]}, headers=admin()
        )
    assert listed["hot_patch"] is False and listed["hot_patch_problem"] == problem[0]
    assert refused.status_code == 409 and str(gone) in refused.json()["error"]["problem"]


def test_gate_drains_and_times_out() -> None:
    from vllm_safety_patch.server.gate import DrainTimeoutError, SwitchGate

    async def scenario() -> tuple[list[str], float]:
        gate, events = SwitchGate(), []

        async def slow_request() -> None:
            async with gate.request():
                events.append("request start")
                await asyncio.sleep(0.2)
                events.append("request end")

        async def late_request() -> None:
            async with gate.request():
                events.append("late request")

        running = asyncio.create_task(slow_request())
        await asyncio.sleep(0.05)
        async with gate.switch(5) as drained:
            late = asyncio.create_task(late_request())  # arrives mid-switch: must wait
            await asyncio.sleep(0.05)
            events.append("switched")
        await asyncio.gather(running, late)
        async with gate.request():  # a request that outlives the drain timeout
            with pytest.raises(DrainTimeoutError):
                async with gate.switch(0.05):
                    pass
        async with gate.request():  # and the gate is open again afterwards
            events.append("open")
        return events, drained

    events, drained = asyncio.run(scenario())
    assert events == ["request start", "request end", "switched", "late request", "open"]
    assert drained >= 0.1


def test_reload_names_bring_fused_siblings() -> None:
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    names = [
        f"model.layers.0.{part}.{kind}"
        for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")
        for kind in ("weight", "bias")
    ]
    assert reload_names(["model.layers.0.mlp.up_proj.weight"], names, packed) == [
        "model.layers.0.mlp.gate_proj.bias",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.bias",
        "model.layers.0.mlp.up_proj.weight",
    ]
    assert reload_names(["model.layers.0.mlp.down_proj.weight"], names, {}) == [
        "model.layers.0.mlp.down_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
    ]


def test_launcher_builds_the_server_command(files: dict, tmp_path: Path) -> None:
    from vllm_safety_patch.serve import build_launch

    environ = {"PATH": "/usr/bin", "VLLM_CPU_KVCACHE_SPACE": "1"}
    launch = build_launch(
        model=files["model"],
        delta_dir=files["delta_dir"],
        deltas=["first"],
        admin_token_file=files["token_file"],
        extra=["--max-model-len", "512", "--dtype", "bfloat16"],
        environ=environ,
        gpu=False,
    )
    argv = launch.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--load-format") + 1] == "vsp"
    config = json.loads(argv[argv.index("--model-loader-extra-config") + 1])
    assert config == {"deltas": [str((files["delta_dir"] / "first.safetensors").resolve())]}
    assert "--enforce-eager" in argv and argv.count("--dtype") == 1  # the user's bfloat16 wins
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert launch.env["VLLM_PLUGINS"] == "vllm_safety_patch,vllm_safety_patch_server"
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # the caller's value wins
    assert launch.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert launch.env["VSP_ADMIN_TOKEN_FILE"] == str(files["token_file"].resolve())
    assert TOKEN not in json.dumps([argv, launch.env])  # the token itself travels nowhere
    assert "VLLM_SERVER_DEV_MODE" not in launch.env

    def build(**kwargs: Any) -> Any:
        options = dict(model=files["model"], delta_dir=files["delta_dir"], gpu=False)
        options.update(kwargs)
        return build_launch(**options)

    # VSP_DELTAS chooses when --deltas is absent; the flag wins; "none" is base weights.
    env_choice = build(environ={"VSP_DELTAS": "second"})
    assert [path.name for path in env_choice.deltas] == ["second.safetensors"]
    assert "VSP_DELTAS" not in env_choice.env
    assert build(deltas=["first"], environ={"VSP_DELTAS": "second"}).deltas[0].stem == "first"
    assert build(deltas=["none"], environ={}).deltas == []
    assert build(deltas=["first,second"], environ={}).deltas[1].stem == "second"
    # GPU: no CPU defaults.
    assert "--enforce-eager" not in build(deltas=["none"], environ={}, gpu=True).argv
    # vLLM's LoRA resolver plugins only when configured; the user's own plugins kept.
    plugins = build(
        deltas=["none"], environ={"VLLM_PLUGINS": "mine", "VLLM_LORA_RESOLVER_CACHE_DIR": "/x"}
    )
    assert plugins.env["VLLM_PLUGINS"] == (
        "mine,vllm_safety_patch,vllm_safety_patch_server,lora_filesystem_resolver"
    )

    for kwargs, words in (
        ({"deltas": None, "environ": {}}, "vsp solve"),  # the default 'all' is not solved yet
        ({"deltas": ["llama"], "environ": {}}, "another architecture"),
        ({"deltas": ["bad name!"], "environ": {}}, "not a delta name"),
        ({"deltas": ["../first"], "environ": {}}, "no delta file"),
        ({"deltas": ["none", "first"], "environ": {}}, "on its own"),
        ({"deltas": ["first"], "environ": {"VLLM_SERVER_DEV_MODE": "1"}}, "VLLM_SERVER_DEV_MODE"),
        ({"deltas": ["first"], "environ": {}, "extra": ["--load-format", "auto"]}, "--load-format"),
        ({"deltas": ["first"], "environ": {}, "model": tmp_path}, "not a model checkpoint"),
    ):
        with pytest.raises(VSPError, match=words.replace("(", r"\(")):
            build(**kwargs)
    weak = tmp_path / "weak-token"
    weak.write_text("short")
    weak.chmod(0o600)  # readable by its owner only: the length is what is wrong
    with pytest.raises(VSPError, match="at least 16"):
        build(deltas=["first"], environ={}, admin_token_file=weak)


def test_cli_serve_dry_run_and_client_errors(files: dict) -> None:
    from typer.testing import CliRunner

    from vllm_safety_patch.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "serve",
            "--model",
            str(files["model"]),
            "--delta-dir",
            str(files["delta_dir"]),
            "--deltas",
            "second",
            "--dry-run",
            "--",
            "--max-model-len",
            "512",
        ],
        env={"VSP_ADMIN_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert printed["argv"][-2:] == ["--max-model-len", "512"]
    assert TOKEN not in result.output  # a token from the environment is never printed
    port = free_port()  # nothing listens there
    result = runner.invoke(app, ["deltas", "list", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2 and "cannot reach" in result.output


# ---------------------------------------------------------------------------------------
# The reference runner: `python test_server_hotpatch.py SPEC.json OUT.json`
# ---------------------------------------------------------------------------------------


def _run_references(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    results = {}
    for name, model in json.loads(Path(spec_path).read_text()).items():
        llm = LLM(
            model=model,
            enforce_eager=True,
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            seed=0,
        )
        # One prompt per call: a batch of one, as the server sees them in greedy().
        results[name] = [
            list(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
            for prompt in PROMPTS
        ]
        del llm
        gc.collect()
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM spawns processes: keep the engine work behind this guard
    _run_references(sys.argv[1], sys.argv[2])
