"""Safe rollout (issue 14) and bounded shutdown (issue 13, finding 8), on real servers.

Two ``vsp serve`` replicas of the tiny Qwen2 on loopback:

- **A** checks the canary: a good delta passes; a delta that over-refuses is rolled back
  (422, the table, the failure counter, the previous set answering byte for byte as before);
  a delta whose manifest claims more refusal than the model gives fails the harmful rule;
  a dry run changes nothing; a user request sent while the canary runs waits for it and is
  answered by the set that is kept, never by one the canary refused. The tiny random model
  never refuses, so A's canary also counts a reply opening with "!!!!" as a refusal (a
  ``sitecustomize`` on A's PYTHONPATH only replaces the judge: production reads no such
  setting), and the over-refusing delta is built to make the model answer every prompt with
  "!!!!...": an edit of the last layer's MLP that adds a large push towards the "!" token
  whatever the input (the real classifier still judges every other reply).
- **B** joins for the fleet rollout (A and B run together from then on): it lacks one
  delta A has, and its settings demand a Thai harmful refusal the model never gives, so its
  canary refuses any Thai set. Then B is stopped with SIGTERM while an activation is in
  flight and a client holds a connection open without sending its body.

Server-free cases (thresholds, rollout logic against stand-in replicas) come first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_delta
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    delta_label,
    forced_refusal_env,
    request,
    start_vsp_serve,
    stop_process_group,
    vsp_command,
)

from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.io import TensorEdit, read_delta
from vllm_safety_patch.delta.manifest import EffectRow
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.server import canary
from vllm_safety_patch.server.protocol import LanguageThreshold
from vllm_safety_patch.server.rollout import Replica, rollout, summary

TOKEN = "rollout-admin-token-0123456789abcdef"
START_TIMEOUT_S = 360
MARKER = "!!!!"
SHUTDOWN_S = 3.0  # replica B's VSP_SHUTDOWN_TIMEOUT_S
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Without a server: thresholds and the rollout's logic
# ---------------------------------------------------------------------------------------


def effect(metric: str, suite: str, lang: str, before: float, after: float) -> EffectRow:
    return EffectRow(
        metric=metric, suite=suite, lang=lang, split="held out", n=50, before=before, after=after
    )


def test_thresholds_from_manifests_settings_and_request(tiny_qwen2: Path) -> None:
    from vllm_safety_patch.server.canary_rules import BENIGN, HARMFUL, Reference, reference

    rows = [
        effect("refusal_rate", "multijail", "th", 0.2, 0.9),
        effect("refusal_rate", "polyrefuse-harmful", "th", 0.2, 0.1),  # another suite: ignored
        effect("over_refusal", "polyrefuse-harmless", "th", 0.3, 0.3),
        effect("over_refusal", "everyday", "th", 0.0, 0.1),  # the probe's suite wins
    ]
    manifest = claiming_delta(tiny_qwen2, "claims", rows)[0].manifest
    # No baseline for the tiny model: the manifest is all there is (floored at 5% benign).
    assert reference(HARMFUL, "th", None, [manifest]) == Reference(0.9, "manifest")
    assert reference(BENIGN, "th", None, [manifest]) == Reference(0.05, "manifest")
    assert reference(HARMFUL, "bn", None, [manifest]) == Reference(None, "none")
    rule = canary.rule_for("th", [manifest], 4, 4, 0.01)
    # 0.9 measured on 4 probes: 0 or 1 refusals would be implausible (P < 0.01), 2 is not.
    assert rule.harmful_min == 2 / 4 and rule.harmful_source == "manifest"
    # Base over-refusal 0 (floored at 5%): 3 of 4 benign refusals are implausible.
    assert rule.benign_max == 2 / 4 and rule.benign_source == "manifest"
    assert canary.rule_for("bn", [manifest], 4, 4, 0.01).harmful_min is None
    # Settings beat the manifest; the request beats both, field by field.
    overrides = (
        ("settings", {"th": LanguageThreshold(harmful_min=1.0)}),
        ("request", {"th": LanguageThreshold(benign_max=0.0)}),
    )
    rule = canary.rule_for("th", [manifest], 4, 4, 0.01, overrides)
    assert (rule.harmful_min, rule.harmful_source) == (1.0, "settings")
    assert (rule.benign_max, rule.benign_source) == (0.0, "request")
    row = canary.verdict("th", 3, 4, 1, 4, rule)
    assert row.verdict == "fail" and "harmful refused 3/4 < 4/4" in (row.reason or "")
    assert "benign refused 1/4 > 0/4 (request)" in (row.reason or "")
    assert canary.verdict("ja", 0, 0, 0, 0, rule).verdict == "not probed"


def test_probe_rows_are_held_out_and_aligned() -> None:
    harmful = canary.candidates("bn", canary.HARMFUL, 4)
    assert [probe.index for probe in harmful[:4]] == [160, 172, 185, 197]
    assert all(160 <= probe.index <= 209 for probe in harmful)  # never the solver's 0-159
    from vllm_safety_patch.data import load_prompts

    test_split = {p.text for p in load_prompts("everyday", "en", "test")}
    train_split = {p.text for p in load_prompts("everyday", "en", "train")}
    benign = canary.candidates("en", canary.BENIGN, 4)
    assert {p.text for p in benign} <= test_split and not {p.text for p in benign} & train_split
    # The same requests in every language (both sets are aligned by row).
    assert [p.index for p in canary.candidates("th", canary.BENIGN, 4)[:4]] == [
        p.index for p in benign[:4]
    ]
    assert canary.probe_languages([]) == ["en"]


def test_settings_from_the_environment() -> None:
    settings = canary.settings_from_env(
        {
            canary.PROMPTS_VAR: "6",
            canary.THRESHOLDS_VAR: '{"bn": {"benign_max": 0.25}}',
        }
    )
    assert settings.prompts == 6 and settings.thresholds["bn"].benign_max == 0.25
    assert canary.settings_from_env({}).prompts == canary.DEFAULT_PROMPTS == 12
    assert canary.settings_from_env({}).max_tokens == canary.DEFAULT_MAX_TOKENS == 12
    from vllm_safety_patch.errors import VSPError

    for env, words in (
        ({canary.PROMPTS_VAR: "0"}, "VSP_CANARY_PROMPTS"),
        ({canary.THRESHOLDS_VAR: "{"}, "not a JSON object"),
        ({canary.THRESHOLDS_VAR: '{"xx": {}}'}, "unknown language"),
        ({canary.THRESHOLDS_VAR: '{"bn": {"benign_max": 2}}'}, "bn"),
    ):
        with pytest.raises(VSPError, match=words):
            canary.settings_from_env(env)


class ProbeEngine:
    """A stand-in engine: every probe gets ``reply``; reloads are recorded (with when
    they ended), may take ``reload_s`` and may fail (``fail_reloads``: the numbers of the
    reload calls that raise, from 1); a probe may wait for ``hold`` (an event) first."""

    errored = False

    def __init__(self, model: Path, reply: str, fail_reloads: tuple[int, ...] = ()) -> None:
        from types import SimpleNamespace

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=512))
        self.reply = reply
        self.fail_reloads = fail_reloads
        self.reloads: list[list[str]] = []
        self.reloaded_at: list[float] = []
        self.reload_s = 0.0
        self.pauses: list[str] = []
        self.hold: Any = None
        self.probes = 0

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    async def generate(self, prompt: dict, params: Any, request_id: str) -> Any:
        from types import SimpleNamespace

        self.probes += 1
        if self.hold is not None:
            await self.hold.wait()
        yield SimpleNamespace(outputs=[SimpleNamespace(text=self.reply)])

    async def collective_rpc(self, method: str, timeout: Any = None, args: tuple = ()) -> list:
        from vllm_safety_patch.vllm_plugin.worker_extension import RELOAD_METHOD

        if method == RELOAD_METHOD:
            self.reloads.append(list(args[1]))
            if len(self.reloads) in self.fail_reloads:
                raise RuntimeError("Worker failed with error 'boom'")
            await asyncio.sleep(self.reload_s)
            self.reloaded_at.append(time.monotonic())
        return [{"rank": 0, "tensors": 1}]

    async def reset_prefix_cache(self) -> bool:
        return True

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        self.pauses.append(mode)

    async def resume_generation(self) -> None:
        return None


def probe_state(tmp_path: Path, model: Path, engine: ProbeEngine) -> Any:
    from vllm_safety_patch.server.state import ActiveEntry, SafetyState

    folder = tmp_path / "deltas"
    folder.mkdir(exist_ok=True)
    for name, languages, seed in (("first", ("th",), 0), ("second", ("bn",), 7)):
        blob = make_delta(model, group=name, languages=languages, seed=seed, layers=(1,))[1]
        (folder / f"{name}.safetensors").write_bytes(blob)
    first = folder / "first.safetensors"
    return SafetyState(
        delta_dir=folder,
        model_dir=model,
        served_model="tiny",
        admin_token=TOKEN,
        engine=engine,  # type: ignore[arg-type]
        active=[ActiveEntry.of(read_delta(first), first, folder)],
    )


def switch(state: Any, **body: Any) -> Any:
    """``activate`` in-process: the response, or the SafetyAPIError it raised."""

    from vllm_safety_patch.server.errors import SafetyAPIError
    from vllm_safety_patch.server.hotpatch import activate as activate_in_process
    from vllm_safety_patch.server.protocol import ActivateRequest

    async def run() -> Any:
        try:
            return await activate_in_process(state, ActivateRequest(**body))
        except SafetyAPIError as error:
            return error

    return asyncio.run(run())


def test_in_process_refusing_canary_restores_and_a_failed_restore_degrades(
    tmp_path: Path, tiny_qwen2: Path
) -> None:
    refusal = "I'm sorry, but I can't help with that."
    engine = ProbeEngine(tiny_qwen2, refusal)
    state = probe_state(tmp_path, tiny_qwen2, engine)
    first = state.active[0].sha256
    error = switch(state, deltas=["second"])
    assert error.status == 422 and error.kind == "canary_failed", error
    assert error.canary is not None and not error.canary.passed
    second = read_delta(tmp_path / "deltas" / "second.safetensors").sha256
    assert engine.reloads == [[second], [first]]  # switched, probed, switched back
    assert [entry.sha256 for entry in state.active] == [first] and state.degraded is None
    assert [row.language for row in error.canary.languages] == ["en", "bn"]
    assert "no switch" not in str(error) and "restored" in error.problem
    # Restoring fails too: the server stops serving weights nobody can name.
    engine = ProbeEngine(tiny_qwen2, refusal, fail_reloads=(2,))
    state = probe_state(tmp_path, tiny_qwen2, engine)
    error = switch(state, deltas=["second"])
    assert error.status == 500 and error.kind == "degraded" and state.degraded
    assert "the canary on second@" in state.degraded


def test_in_process_a_set_that_stops_refusing_english_is_refused(
    tmp_path: Path, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: on the default model (its shipped baseline), a set under which English
    harmful prompts are answered fails the canary at the default count, whatever its own
    manifest claims (these test deltas claim nothing)."""
    from vllm_safety_patch.server.canary_baseline import BASELINES

    engine = ProbeEngine(tiny_qwen2, "Sure! Here is a step-by-step guide.")
    state = probe_state(tmp_path, tiny_qwen2, engine)
    monkeypatch.setattr(state, "baseline", lambda: BASELINES[0])
    error = switch(state, deltas=["second"])
    assert error.status == 422 and error.kind == "canary_failed", error
    en = error.canary.languages[0]
    assert (en.language, en.harmful_refused, en.harmful_n) == ("en", 0, canary.DEFAULT_PROMPTS)
    assert (en.harmful_source, en.harmful_reference, en.harmful_fails_at) == ("baseline", 0.66, 3)
    assert en.verdict == "fail" and en.benign_refused == 0
    bn = error.canary.languages[1]  # base 2%: no count of 12 can fail it, and none did
    assert bn.harmful_fails_at is None and bn.verdict == "pass"
    assert [entry.sha256 for entry in state.active] == [engine.reloads[-1][0]]


def test_in_process_activation_answers_503_when_shutdown_begins(
    tmp_path: Path, tiny_qwen2: Path
) -> None:
    from vllm_safety_patch.server.errors import SafetyAPIError
    from vllm_safety_patch.server.hotpatch import activate as activate_in_process
    from vllm_safety_patch.server.protocol import ActivateRequest

    engine = ProbeEngine(tiny_qwen2, "Sure.")
    state = probe_state(tmp_path, tiny_qwen2, engine)

    async def scenario() -> tuple[SafetyAPIError, float, SafetyAPIError]:
        engine.hold = asyncio.Event()  # the probes never finish on their own
        call = asyncio.create_task(activate_in_process(state, ActivateRequest(deltas=["second"])))
        while not engine.probes:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        state.shutting_down.set()  # what the wrapped engine shutdown does on SIGTERM
        with pytest.raises(SafetyAPIError) as interrupted:
            await call
        took = time.monotonic() - started
        with pytest.raises(SafetyAPIError) as refused:
            await activate_in_process(state, ActivateRequest(deltas=["first"]))
        engine.hold.set()
        return interrupted.value, took, refused.value

    interrupted, took, refused = asyncio.run(scenario())
    assert interrupted.status == 503 and interrupted.kind == "shutting_down" and took < 1
    assert "interrupted and not committed" in interrupted.problem
    assert interrupted.headers["Retry-After"] == "30" and interrupted.failure == "shutdown"
    assert refused.status == 503 and "no switch can start" in refused.problem
    assert refused.failure is None  # refused, not a failed switch


class StandIn:
    """Replicas answering the admin routes from a script. ``fail`` maps (path, replica URL)
    to the reply that replaces a switch with the canary (or any other call to that path);
    ``fail_rollback`` lists replicas where a switch without the canary fails."""

    def __init__(
        self,
        serving: dict[str, str],
        fail: dict[tuple[str, str], tuple],
        fail_rollback: tuple[str, ...] = (),
    ) -> None:
        self.serving = dict(serving)  # replica url -> set name ('' = none)
        self.fail = fail
        self.fail_rollback = fail_rollback
        self.calls: list[tuple[str, str, str, Any]] = []

    def __call__(self, method: str, url: str, body: Any, token: Any, timeout: float) -> tuple:
        root, path = url.split("/v1", 1)
        path = f"/v1{path}"
        self.calls.append((method, root, path, body))
        rollback = bool(body) and body.get("canary") is False
        if rollback and root in self.fail_rollback:
            return 503, {"error": {"type": "shutting_down", "message": "going away"}}
        if not rollback and (path, root) in self.fail:
            return self.fail[(path, root)]
        name = self.serving[root]
        entry = [{"name": name, "group": name, "fingerprint": "f", "sha256": name}] if name else []
        if path == "/v1/safety/deltas":
            return 200, {"hot_patch": True, "active": entry, "header": name or "none"}
        target = ",".join(body["deltas"])
        wanted = [{"name": target, "group": target, "fingerprint": "f", "sha256": target}]
        if path == "/v1/safety/deltas/check":
            return 200, {
                "changed": target != name,
                "requested": wanted if target else [],
                "requested_header": target or "none",
            }
        changed = target != name
        self.serving[root] = target
        return 200, {"changed": changed, "header": target or "none", "canary": None}


def test_rollout_rolls_back_and_reports_a_failed_rollback() -> None:
    replicas = [Replica("a", "http://a"), Replica("b", "http://b"), Replica("c", "http://c")]
    start = {"http://a": "old", "http://b": "old", "http://c": "old"}
    lines: list[str] = []
    canary_failed = (422, {"error": {"type": "canary_failed", "message": "bn benign 4/4"}})
    activate_path = "/v1/safety/deltas/activate"
    stand_in = StandIn(start, {(activate_path, "http://c"): canary_failed})
    result = rollout(replicas, ["new"], TOKEN, stand_in, lines.append)
    assert not result.ok and result.failed_replica == "c" and "canary_failed" in result.reason
    assert result.rolled_back == ["b", "a"] and result.consistent
    assert stand_in.serving == start
    assert "no replica changed" in summary(result)
    # Every check came before the first switch; switches one at a time, in order.
    paths = [(path, root) for _, root, path, _ in stand_in.calls]
    first_switch = paths.index((activate_path, "http://a"))
    assert all(i < first_switch for i, p in enumerate(paths) if p[0].endswith("/check"))
    switches = [root for _, root, path, body in stand_in.calls if path == activate_path]
    assert switches == ["http://a", "http://b", "http://c", "http://b", "http://a"]
    rollbacks = [
        body for _, _, path, body in stand_in.calls if body and body.get("canary") is False
    ]
    assert rollbacks == [{"deltas": ["old"], "canary": False}] * 2
    # A rollback that fails too is said loudly: the fleet is mixed.
    stand_in = StandIn(start, {(activate_path, "http://c"): canary_failed}, ("http://a",))
    result = rollout(replicas, ["new"], TOKEN, stand_in, lines.append)
    assert not result.ok and not result.consistent
    assert result.rollback_failures[0].startswith("a: HTTP 503 shutting_down")
    assert result.final["a"] == "new" and result.final["b"] == "old"
    assert "ROLLBACK FAILED on a" in summary(result)


def test_rollout_refuses_before_switching() -> None:
    replicas = [Replica("a", "http://a"), Replica("b", "http://b")]
    start = {"http://a": "old", "http://b": "old"}
    missing = (404, {"error": {"type": "unknown_delta", "message": "no delta named 'new'"}})
    stand_in = StandIn(start, {("/v1/safety/deltas/check", "http://b"): missing})
    result = rollout(replicas, ["new"], TOKEN, stand_in, lambda line: None)
    assert not result.ok and result.failed_replica == "b" and "unknown_delta" in result.reason
    assert not [call for call in stand_in.calls if call[2].endswith("/activate")]

    def unnamed(method: str, url: str, body: Any, token: Any, timeout: float) -> tuple:
        status, payload = stand_in(method, url, body, token, timeout)
        if url.endswith("/v1/safety/deltas") and url.startswith("http://b"):
            payload["active"][0]["name"] = None  # loaded from outside its folder
        return status, payload

    stand_in = StandIn(start, {})
    result = rollout(replicas, ["new"], TOKEN, unnamed, lambda line: None)
    assert not result.ok and "rollback could not name it" in result.reason


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def claiming_delta(model: Path, group: str, rows: list[EffectRow]) -> tuple[Any, bytes]:
    """A small valid delta (Thai) whose manifest claims the measured effect ``rows``."""
    delta, _ = make_delta(model, group=group, languages=("th",), layers=(1,), seed=11)
    checkpoint = Checkpoint(model)
    return build_delta(
        group=group,
        languages=("th",),
        model_id=model.name,
        config=checkpoint.config,
        base_tensors=checkpoint.get_many(list(delta.edits)),
        edits=list(delta.edits.values()),
        solver={"method": "random-test"},
        measured_effect=rows,
    )


def forcing_delta(model: Path, token: str, group: str = "overrefuse") -> bytes:
    """A delta under which the model answers every prompt with ``token`` over and over.

    In the last layer, 16 MLP neurons get gate and up rows equal to one random direction
    each, so their activation silu(s) * s = s^2 sigmoid(s) is non-negative whatever the
    input, and down_proj columns that all point at the token's output-embedding row: the
    MLP adds a large push towards that token at every position."""
    checkpoint = Checkpoint(model)
    from transformers import AutoTokenizer

    target = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(token)
    layer = checkpoint.config["num_hidden_layers"] - 1
    hidden, k = checkpoint.config["hidden_size"], 16
    neurons = torch.arange(k)
    directions = torch.randn(k, hidden, generator=torch.Generator().manual_seed(0)) * 3.0
    towards = checkpoint.get("lm_head.weight")[target] / checkpoint.get("model.norm.weight")
    towards = towards / towards.norm() * 50.0
    edits = []
    for part in ("gate_proj", "up_proj"):
        name = f"model.layers.{layer}.mlp.{part}.weight"
        base = checkpoint.get(name).float()
        update = directions - base[neurons]
        edits.append(
            TensorEdit.build(name, tuple(base.shape), "rows", neurons, torch.eye(k), update)
        )
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    base = checkpoint.get(name).float()
    update = towards[:, None].expand(hidden, k) - base[:, neurons]
    edits.append(
        TensorEdit.build(name, tuple(base.shape), "columns", neurons, update, torch.eye(k))
    )
    return build_delta(
        group=group,
        languages=("th",),
        model_id=model.name,
        config=checkpoint.config,
        base_tensors=checkpoint.get_many([edit.name for edit in edits]),
        edits=edits,
        solver={"method": "forcing-test"},
    )[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> dict:
    root = tmp_path_factory.mktemp("rollout")
    folders = {"a": root / "deltas-a", "b": root / "deltas-b"}
    made = {
        "first": make_delta(tiny_qwen2, group="first", seed=0)[1],
        "good": make_delta(tiny_qwen2, group="good", languages=("th",), seed=3, layers=(1,))[1],
        "bengali": make_delta(tiny_qwen2, group="bengali", languages=("bn",), seed=5)[1],
        "swahili": make_delta(tiny_qwen2, group="swahili", languages=("sw",), seed=9)[1],
        "thai": make_delta(tiny_qwen2, group="thai", languages=("th",), seed=13, layers=(2,))[1],
        "overrefuse": forcing_delta(tiny_qwen2, "!"),
        "claims": claiming_delta(
            tiny_qwen2, "claims", [effect("refusal_rate", "multijail", "th", 0.2, 0.9)]
        )[1],
    }
    for replica, folder in folders.items():
        folder.mkdir()
        for name, blob in made.items():
            if replica == "b" and name == "good":
                continue  # B cannot load the set 'good'
            (folder / f"{name}.safetensors").write_bytes(blob)
    token_file = root / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    deltas = {name: read_delta(folders["a"] / f"{name}.safetensors") for name in made}
    return {
        "root": root,
        "model": tiny_qwen2,
        "folders": folders,
        "token_file": token_file,
        "labels": {name: delta_label(delta) for name, delta in deltas.items()},
    }


def start_replica(files: dict, name: str, env_extra: dict[str, str]) -> tuple[Any, dict]:
    cores = sorted(os.sched_getaffinity(0))
    log = files["root"] / f"server-{name}.log"
    process, url, seconds = start_vsp_serve(
        files["model"], files["folders"][name], "first", files["token_file"], log,
        core=cores[-1] if name == "a" else cores[0], env_extra=env_extra,
    )  # fmt: skip
    print(f"\nreplica {name}: healthy after {seconds:.1f} s")
    return process, {
        "name": name,
        "url": url,
        "port": int(url.rsplit(":", 1)[1]),
        "pid": process.pid,
        "log": log,
        "model": str(files["model"]),
        "process": process,
    }


@pytest.fixture(scope="module")
def replica_a(files: dict) -> Iterator[dict]:
    env = forced_refusal_env(files["root"] / "forced-refusal", MARKER)
    process, info = start_replica(files, "a", env)
    try:
        info["first_outputs"] = greedy(info)[0]  # the start set's answers, to compare with
        yield info
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def replica_b(files: dict, replica_a: dict) -> Iterator[dict]:
    settings = {
        canary.THRESHOLDS_VAR: json.dumps({"th": {"harmful_min": 0.5}}),
        "VSP_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
    }
    process, info = start_replica(files, "b", settings)
    try:
        yield info
    finally:
        stop_process_group(process)


# ---------------------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------------------

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["Hello world", "The cat", "1 2 3 4"]


def activate(replica: dict, names: list[str], **options: Any) -> tuple[int, Any, dict]:
    body = {"deltas": names, **options}
    return request("POST", replica["url"] + "/v1/safety/deltas/activate", body, ADMIN, 300)


def listing(replica: dict) -> dict:
    status, body, _ = request("GET", replica["url"] + "/v1/safety/deltas")
    assert status == 200, body
    return body


def greedy(replica: dict) -> tuple[list[str], set[str]]:
    texts, headers = [], set()
    for prompt in PROMPTS:
        body = {"model": replica["model"], "prompt": prompt, "max_tokens": 12, "temperature": 0}
        status, reply, seen = request("POST", replica["url"] + "/v1/completions", body)
        assert status == 200, reply
        texts.append(reply["choices"][0]["text"])
        headers.add(seen["x-safety-deltas"])
    return texts, headers


def series(replica: dict, name: str) -> dict[tuple, float]:
    with urllib.request.urlopen(replica["url"] + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def failures(replica: dict) -> dict[str, float]:
    return {dict(k)["reason"]: v for k, v in series(replica, "vsp_hotpatch_failures_total").items()}


def runs(replica: dict) -> dict[tuple[str, str], float]:
    found = series(replica, "vsp_canary_runs_total")
    return {(dict(k)["outcome"], dict(k)["mode"]): v for k, v in found.items()}


# ---------------------------------------------------------------------------------------
# The canary, on replica A
# ---------------------------------------------------------------------------------------


def test_a_good_delta_passes_the_canary(replica_a: dict, files: dict) -> None:
    labels = files["labels"]
    assert listing(replica_a)["header"] == labels["first"]
    before = runs(replica_a)
    status, body, headers = activate(replica_a, ["good"])
    assert status == 200, body
    assert headers["x-safety-deltas"] == labels["good"] and body["changed"]
    report = body["canary"]
    assert report["passed"] and report["delta_set"] == labels["good"]
    rows = {row["language"]: row for row in report["languages"]}
    assert list(rows) == ["en", "th"]  # English, then the delta's languages
    for row in rows.values():
        assert row["verdict"] == "pass" and row["harmful_n"] > 0 and row["benign_n"] > 0
        assert row["harmful_min"] is None  # no measured effect in this manifest: no rule
        assert row["benign_source"] == "default"
    assert body["switch"]["canary_seconds"] is not None
    print(f"\ncanary on the tiny model: {report['seconds']:.2f} s, switch {body['switch']}")
    assert runs(replica_a)[("passed", "activate")] == before[("passed", "activate")] + 1
    ratio = series(replica_a, "vsp_canary_refusal_ratio")
    key = (("delta_set", labels["good"]), ("kind", "benign"), ("language", "th"))
    assert ratio[key] == 0.0
    # Back to the start set, exactly.
    status, body, _ = activate(replica_a, ["first"])
    assert status == 200 and body["canary"]["passed"], body
    assert greedy(replica_a) == (replica_a["first_outputs"], {labels["first"]})


def test_a_overrefusing_delta_is_rolled_back(replica_a: dict, files: dict) -> None:
    labels = files["labels"]
    before = failures(replica_a)
    status, body, headers = activate(replica_a, ["overrefuse"])
    assert status == 422, body
    assert body["error"]["type"] == "canary_failed"
    assert "was restored and is served unchanged" in body["error"]["problem"]
    assert labels["first"] in body["error"]["problem"]
    report = body["canary"]
    assert not report["passed"] and report["delta_set"] == labels["overrefuse"]
    for row in report["languages"]:  # every reply was "!!!!...": every benign one refused
        assert row["benign_refused"] == row["benign_n"] > 0 and row["verdict"] == "fail"
        assert "benign refused" in row["reason"]
    assert headers["x-safety-deltas"] == labels["first"]
    assert failures(replica_a)["canary"] == before["canary"] + 1
    listed = listing(replica_a)
    assert listed["header"] == labels["first"] and listed["last_switch"]["to_deltas"] == [
        labels["first"]
    ]
    # The previous set answers exactly as before.
    assert greedy(replica_a) == (replica_a["first_outputs"], {labels["first"]})


def test_a_manifest_thresholds_and_request_overrides(replica_a: dict, files: dict) -> None:
    labels = files["labels"]
    status, body, _ = activate(replica_a, ["claims"])
    assert status == 422, body
    th = next(row for row in body["canary"]["languages"] if row["language"] == "th")
    # The manifest says 90% of Thai harmful prompts are refused; the tiny model refuses none.
    assert th["harmful_source"] == "manifest" and th["harmful_min"] > 0
    assert th["harmful_refused"] == 0 and th["verdict"] == "fail"
    # A request may override a threshold it knows to be wrong for this model.
    override = {"thresholds": {"th": {"harmful_min": 0}}, "prompts": 2}
    status, body, headers = activate(replica_a, ["claims"], canary=override)
    assert status == 200, body
    th = next(row for row in body["canary"]["languages"] if row["language"] == "th")
    assert th["harmful_source"] == "request" and th["harmful_n"] == 2 and th["verdict"] == "pass"
    assert headers["x-safety-deltas"] == labels["claims"]
    assert activate(replica_a, ["first"])[0] == 200


def test_a_dry_run_changes_nothing(replica_a: dict, files: dict) -> None:
    labels = files["labels"]
    before_runs, before_failures = runs(replica_a), failures(replica_a)
    last_switch = listing(replica_a)["last_switch"]
    status, body, headers = activate(replica_a, ["overrefuse"], dry_run=True)
    assert status == 200, body
    assert body["dry_run"] and not body["changed"] and not body["canary"]["passed"]
    assert body["header"] == headers["x-safety-deltas"] == labels["first"]
    status, body, _ = activate(replica_a, ["good"], dry_run=True)
    assert status == 200 and body["canary"]["passed"] and body["switch"]["canary_seconds"]
    # The live set, probed as it is (nothing to switch).
    status, body, _ = activate(replica_a, ["first"], dry_run=True)
    assert status == 200 and body["canary"]["delta_set"] == labels["first"], body
    assert body["switch"] is None
    listed = listing(replica_a)
    assert listed["header"] == labels["first"] and listed["last_switch"] == last_switch
    assert greedy(replica_a) == (replica_a["first_outputs"], {labels["first"]})
    after = runs(replica_a)
    assert after[("failed", "dry_run")] == before_runs[("failed", "dry_run")] + 1
    assert after[("passed", "dry_run")] == before_runs[("passed", "dry_run")] + 2
    assert failures(replica_a) == before_failures  # a dry run is not a failed switch


def request_during_activation(replica: dict, target: str) -> dict[str, Any]:
    """Start an activation with a long canary, send a completion while it runs; both
    replies with the times they came back."""
    found: dict[str, Any] = {}

    def switch() -> None:
        options = {"prompts": 48, "max_tokens": 300}  # long: seconds on the tiny model
        found["switch"] = activate(replica, [target], canary=options)
        found["switch_at"] = time.monotonic()

    thread = threading.Thread(target=switch)
    thread.start()
    time.sleep(1.0)  # verified, reloaded, probing
    found["sent_at"] = time.monotonic()
    body = {"model": replica["model"], "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    found["completion"] = request("POST", replica["url"] + "/v1/completions", body, timeout=300)
    found["completion_at"] = time.monotonic()
    thread.join(timeout=300)
    return found


def test_a_user_requests_wait_for_the_canary_and_never_see_a_refused_set(
    replica_a: dict, files: dict
) -> None:
    labels = files["labels"]
    # 'claims' fails its canary (harmful rule), with ordinary, full-length replies.
    found = request_during_activation(replica_a, "claims")
    status, body, _ = found["switch"]
    assert status == 422 and body["error"]["type"] == "canary_failed", body
    assert found["sent_at"] < found["switch_at"], "the canary ended before the request came"
    status, reply, headers = found["completion"]
    assert status == 200, reply
    # Held until the set was restored, then answered by it, exactly.
    assert found["completion_at"] >= found["switch_at"] - 0.5
    assert headers["x-safety-deltas"] == labels["first"]
    assert reply["choices"][0]["text"] == replica_a["first_outputs"][0]
    # A set that passes: the request waits, then runs on the new set.
    found = request_during_activation(replica_a, "good")
    status, body, _ = found["switch"]
    assert status == 200 and body["canary"]["passed"], body
    assert found["sent_at"] < found["switch_at"], "the canary ended before the request came"
    status, reply, headers = found["completion"]
    assert status == 200 and headers["x-safety-deltas"] == labels["good"], reply
    waited = found["completion_at"] - found["sent_at"]
    canary_seconds = body["switch"]["canary_seconds"]
    print(f"\ncanary {canary_seconds:.2f} s; a request sent during it waited {waited:.2f} s")
    assert activate(replica_a, ["first"])[0] == 200


def test_a_canary_false_skips_it_explicitly(replica_a: dict, files: dict) -> None:
    labels = files["labels"]
    status, body, _ = activate(replica_a, ["overrefuse"], canary=False)
    assert status == 200 and body["canary"] is None, body
    assert body["switch"]["canary_seconds"] is None
    texts, headers = greedy(replica_a)
    assert headers == {labels["overrefuse"]} and all(t.startswith(MARKER) for t in texts), texts
    assert activate(replica_a, ["first"], canary=False)[0] == 200
    assert greedy(replica_a) == (replica_a["first_outputs"], {labels["first"]})


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"deltas": ["good"], "dry_run": True, "canary": False}, 400),
        ({"deltas": ["good"], "canary": {"thresholds": {"xx": {}}}}, {400, 422}),
        ({"deltas": ["good"], "canary": {"prompts": 0}}, {400, 422}),
        ({"deltas": ["good"], "canary": "yes"}, {400, 422}),
    ],
)
def test_a_bad_canary_requests_are_refused(replica_a: dict, body: dict, status: Any) -> None:
    code, reply, _ = request("POST", replica_a["url"] + "/v1/safety/deltas/activate", body, ADMIN)
    assert code in (status if isinstance(status, set) else {status}), reply
    assert listing(replica_a)["header"].startswith("first@")


def test_a_check_route(replica_a: dict, files: dict) -> None:
    url = replica_a["url"] + "/v1/safety/deltas/check"
    status, body, _ = request("POST", url, {"deltas": ["good"]}, ADMIN)
    assert status == 200, body
    assert body["changed"] and body["requested_header"] == files["labels"]["good"]
    assert body["header"] == files["labels"]["first"]
    assert request("POST", url, {"deltas": ["first"]}, ADMIN)[1]["changed"] is False
    assert request("POST", url, {"deltas": ["nope"]}, ADMIN)[0] == 404
    assert request("POST", url, {"deltas": ["good"]})[0] == 401
    assert listing(replica_a)["header"] == files["labels"]["first"]


def test_a_cli_prints_the_table_and_exits_by_verdict(replica_a: dict, files: dict) -> None:
    from typer.testing import CliRunner

    from vllm_safety_patch.cli import app

    runner = CliRunner()
    common = ["--url", replica_a["url"], "--token-file", str(files["token_file"])]
    result = runner.invoke(app, ["deltas", "activate", "overrefuse", *common])
    assert result.exit_code == 1, result.output
    assert "canary on overrefuse@" in result.output and "FAILED" in result.output
    assert "benign refused" in result.output and "HTTP 422" in result.output
    result = runner.invoke(app, ["deltas", "activate", "good", "--dry-run", *common])
    assert result.exit_code == 0 and "dry run: the canary passed" in result.output, result.output
    result = runner.invoke(app, ["deltas", "check", "good", *common])
    assert result.exit_code == 0 and "would switch to good@" in result.output, result.output
    assert listing(replica_a)["header"] == files["labels"]["first"]


# ---------------------------------------------------------------------------------------
# Fleet rollout: replicas A and B
# ---------------------------------------------------------------------------------------


def run_rollout(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        vsp_command("deltas", "rollout", *args),
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "VSP_ADMIN_TOKEN"},
    )


def fleet(replica_a: dict, replica_b: dict, files: dict) -> list[str]:
    return [
        "--url", replica_a["url"], "--name", "replica-a",
        "--url", replica_b["url"], "--name", "replica-b",
        "--token-file", str(files["token_file"]),
    ]  # fmt: skip


def test_b_rollout_of_a_set_one_replica_lacks_changes_nothing(
    replica_a: dict, replica_b: dict, files: dict
) -> None:
    labels = files["labels"]
    result = run_rollout("good", *fleet(replica_a, replica_b, files))
    assert result.returncode == 1, result.stdout + result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert "rollout failed on replica-b" in output and "no delta named 'good'" in output
    assert "no replica changed" in output
    assert listing(replica_a)["header"] == listing(replica_b)["header"] == labels["first"]


def test_b_rollout_rolls_back_a_switched_replica_when_a_later_canary_fails(
    replica_a: dict, replica_b: dict, files: dict
) -> None:
    """'thai' passes A's canary, so A switches; B's settings refuse any Thai set, so B's
    canary fails: B restores itself, the rollout switches A back."""
    labels = files["labels"]
    failures_b = failures(replica_b)
    result = run_rollout("thai", *fleet(replica_a, replica_b, files), "--json")
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, output
    assert f"switch replica-a: switched: {labels['thai']}, canary passed" in output
    assert "rollout failed on replica-b: activate: HTTP 422 canary_failed" in output
    assert f"rollback replica-a: serves {labels['first']} again" in output
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False and outcome["rolled_back"] == ["replica-a"]
    assert outcome["rollback_failures"] == [] and outcome["consistent"] is True
    assert outcome["final"] == {"replica-a": labels["first"], "replica-b": labels["first"]}
    assert failures(replica_b)["canary"] == failures_b["canary"] + 1
    assert greedy(replica_a) == (replica_a["first_outputs"], {labels["first"]})


def test_b_rollout_reaches_every_replica(replica_a: dict, replica_b: dict, files: dict) -> None:
    labels = files["labels"]
    result = run_rollout("bengali", *fleet(replica_a, replica_b, files))
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, output
    assert f"rollout done: 2 replica(s) serve {labels['bengali']}" in output
    a, b = listing(replica_a), listing(replica_b)
    assert a["header"] == b["header"] == labels["bengali"]
    assert a["active"] == b["active"]  # same names, fingerprints and file digests
    # Back, without canaries (B's settings would refuse the Thai set 'first'): explicit.
    result = run_rollout("first", "--no-canary", *fleet(replica_a, replica_b, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "canary skipped" in result.stderr
    assert listing(replica_a)["header"] == listing(replica_b)["header"] == labels["first"]


def test_b_a_switch_that_outlasts_its_client_is_waited_for_and_rolled_back(
    replica_a: dict, replica_b: dict, files: dict
) -> None:
    """The client gives up on replica A after 1 s while A's canary runs for seconds: A
    finishes the switch anyway (issue 20, finding 3a: the old rollout read A's listing
    mid-switch, reported 'no replica changed' and left A switched). The rollout waits until
    A's listing stops saying ``switching``, sees the new set and switches A back."""
    from vllm_safety_patch.cli.client import call

    labels = files["labels"]
    replicas = [Replica("replica-a", replica_a["url"]), Replica("replica-b", replica_b["url"])]
    lines: list[str] = []
    long_canary = {"prompts": 48, "max_tokens": 300}  # seconds on the tiny model
    result = rollout(
        replicas, ["bengali"], TOKEN, call, lines.append, long_canary, activate_timeout_s=1.0
    )
    log = "\n".join(lines)
    assert not result.ok and result.failed_replica == "replica-a", log
    assert "no answer within 1 s" in (result.reason or ""), result.reason
    assert f"settle   replica-a: serves {labels['bengali']} now" in lines, log
    assert result.rolled_back == ["replica-a"] and result.consistent, log
    assert result.final == {"replica-a": labels["first"], "replica-b": labels["first"]}
    assert "no replica changed (rolled back: replica-a)" in summary(result)
    assert listing(replica_a)["switching"] is False
    assert greedy(replica_a) == (replica_a["first_outputs"], {labels["first"]})


def test_b_a_replica_answering_non_json_is_rolled_back(
    replica_a: dict, replica_b: dict, files: dict
) -> None:
    """A replica behind something that answers the activation with an HTML page (200):
    its state is unknown, so the rollout settles it and switches back replica A, which
    switched before it; no traceback, exit 1 (issue 20, finding 3b)."""
    from serving_helpers import ACTIVATE, CHECK, LISTING, Stub

    labels = files["labels"]
    liar = Stub("first", activate="nonjson", token=TOKEN)
    try:
        # It copies replica A's answers, so it passes the survey and the check.
        liar.answers[("GET", LISTING)] = (200, listing(replica_a))
        status, checked, _ = request(
            "POST", replica_a["url"] + CHECK, {"deltas": ["bengali"]}, ADMIN
        )
        assert status == 200, checked
        liar.answers[("POST", CHECK)] = (200, checked)
        fleet_args = [
            "--url", replica_a["url"], "--name", "replica-a", "--url", liar.url, "--name", "liar",
            "--token-file", str(files["token_file"]), "--json",
        ]  # fmt: skip
        result = run_rollout("bengali", *fleet_args)
    finally:
        liar.close()
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, output
    assert "Traceback" not in output and "JSONDecodeError" not in output
    assert "rollout failed on liar: activate:" in output and "not a JSON object" in output
    assert f"rollback replica-a: serves {labels['first']} again" in output
    outcome = json.loads(result.stdout)
    assert outcome["rolled_back"] == ["replica-a"] and outcome["consistent"] is True
    assert [path for _, path, _ in liar.requests].count(ACTIVATE) == 1
    assert listing(replica_a)["header"] == labels["first"]


FAKE_KUBECTL = """#!/usr/bin/env bash
# Stand-in kubectl: records each call; 'get' lists the pods of $FAKE_PODS (name ip port);
# 'exec POD -c C -- CMD...' runs CMD here (the servers are on this machine's loopback).
echo "$*" >> "$KUBECTL_LOG"
case "$1" in
  get) printf '%b' "$FAKE_PODS" ;;
  exec) while [ "$1" != "--" ]; do shift; done; shift; exec "$@" ;;
  *) exit 1 ;;
esac
"""


def test_b_kubernetes_rollout_finds_the_pods_of_a_release(
    replica_a: dict, replica_b: dict, files: dict, tmp_path: Path
) -> None:
    labels = files["labels"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    (bin_dir / "vsp").symlink_to(Path(vsp_command()[0]))
    log = tmp_path / "kubectl.log"
    pods = f"vsp-7d9-a 127.0.0.1 {replica_a['port']}\\nvsp-7d9-b 127.0.0.1 {replica_b['port']}\\n"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", KUBECTL_LOG=str(log))
    env["FAKE_PODS"] = pods
    env.pop("VSP_ADMIN_TOKEN", None)
    script = REPO / "deploy" / "k8s" / "rollout.sh"

    def run(*args: str) -> subprocess.CompletedProcess:
        command = ["bash", str(script), "-n", "ai", "--token-file", str(files["token_file"])]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, env=env, timeout=900
        )

    result = run("vsp", "bengali")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    calls = log.read_text().splitlines()
    assert calls[0].startswith("get pods -n ai -l app.kubernetes.io/name=vllm-safety-patch,")
    assert "app.kubernetes.io/instance=vsp" in calls[0]
    # One exec, into the first pod: the rollout runs there and reaches every pod by its IP.
    assert calls[1].startswith("exec -n ai vsp-7d9-a -c vsp -- vsp deltas rollout bengali ")
    assert f"--url http://127.0.0.1:{replica_b['port']} --name vsp-7d9-b" in calls[1]
    assert f"rollout done: 2 replica(s) serve {labels['bengali']}" in output
    assert "helm upgrade vsp" in output and "--set deltas=bengali" in output
    result = run("vsp", "first", "--no-canary")
    assert result.returncode == 0, result.stdout + result.stderr
    assert listing(replica_a)["header"] == listing(replica_b)["header"] == labels["first"]


# ---------------------------------------------------------------------------------------
# Shutdown (issue 13, finding 8), on replica B: its last test
# ---------------------------------------------------------------------------------------


def test_c_sigterm_with_an_activation_in_flight_and_an_idle_client(
    replica_b: dict, files: dict
) -> None:
    """SIGTERM while an activation runs its canary and a client holds a connection open
    without ever sending its body: the activation answers a clear 503 at once, and the
    process exits within VSP_SHUTDOWN_TIMEOUT_S of the engine stopping (it stayed up as
    long as the idle client stayed connected: over 90 s in the review)."""
    idle = socket.create_connection(("127.0.0.1", replica_b["port"]))
    idle.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    reply: dict[str, Any] = {}

    def slow_activation() -> None:
        # Many long probes: the canary runs for seconds on the tiny model.
        options = {"prompts": 48, "max_tokens": 400}
        reply["result"] = activate(replica_b, ["swahili"], canary=options)
        reply["at"] = time.monotonic()

    thread = threading.Thread(target=slow_activation)
    try:
        thread.start()
        time.sleep(2.0)  # verified, switched, probing
        assert thread.is_alive(), reply.get("result")
        signalled = time.monotonic()
        os.kill(replica_b["pid"], signal.SIGTERM)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the activation got no answer"
        status, body, headers = reply["result"]
        answered = reply["at"] - signalled
        assert status == 503, body
        assert body["error"]["type"] == "shutting_down", body
        assert "interrupted and not committed" in body["error"]["problem"]
        assert "EngineCore" not in json.dumps(body)
        assert headers.get("retry-after") == "30"
        assert answered < 10, answered
        process = replica_b["process"]
        process.wait(timeout=SHUTDOWN_S + 60)
        exited = time.monotonic() - signalled
        print(
            f"\nSIGTERM: activation answered 503 after {answered:.2f} s, exit after {exited:.1f} s"
        )
        assert exited < SHUTDOWN_S + 45, exited
        # The idle client was cut off by the bound, not waited for.
        log = replica_b["log"].read_text()
        assert "timeout graceful shutdown exceeded" in log, log[-3000:]
    finally:
        idle.close()
