"""The canary without holding user traffic (issue 21): on a server with LoRA support the
candidate set is probed as a LoRA adapter (the new set minus the merged one) while the merged
set keeps answering everyone; only a set that passed is switched, and only the reload holds
traffic.

The adapter's arithmetic is checked exactly in-process; the behaviour on a real vLLM server
(tiny model, loopback, ``--enable-lora``) with user traffic running through the activation.
The server starts on a set under which every reply is "!!!!..." (the test's refusal marker):
every English harmful probe is refused there. A candidate whose replies are ordinary text
removes those refusals and must be refused, the traffic answered meanwhile by the old set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_delta
from safetensors.torch import load_file
from serving_helpers import (
    SERVE_START_TIMEOUT_S,
    delta_label,
    engine_env,
    forced_refusal_env,
    free_port,
    request,
    start_logged,
    stop_process_group,
    vsp_command,
    wait_healthy,
)
from test_safe_rollout import MARKER, forcing_delta

from vllm_safety_patch.delta.export_peft import lora_factors
from vllm_safety_patch.delta.io import read_delta
from vllm_safety_patch.server.hotpatch import adapter_problem
from vllm_safety_patch.server.lora import candidate_rank, write_candidate_adapter

TOKEN = "canary-lora-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "Hello world"
# Long probes on the tiny model (seconds), so that user requests arrive while they run.
LONG_CANARY = {"prompts": 48, "max_tokens": 300}
# The tiny model has no shipped baseline: the operator's floor for English harmful refusal.
ENGLISH_FLOOR = {"en": {"harmful_min": 0.5}}


def test_the_candidate_adapter_is_new_minus_old_exactly(tmp_path: Path, tiny_qwen2: Path) -> None:
    new, _ = make_delta(tiny_qwen2, group="new", layers=(0, 2), seed=3)
    old, _ = make_delta(tiny_qwen2, group="old", layers=(1, 2), seed=7)
    folder = write_candidate_adapter([new], [old], tiny_qwen2, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    expected: dict[str, torch.Tensor] = {}
    for sign, delta in ((1.0, new), (-1.0, old)):
        for module, (lora_a, lora_b) in lora_factors(delta).items():
            expected[module] = expected.get(module, 0) + sign * (lora_b @ lora_a)
    assert {key.split(".lora_")[0].removeprefix("base_model.model.") for key in tensors} == set(
        expected
    )
    for module, update in expected.items():
        lora_a = tensors[f"base_model.model.{module}.lora_A.weight"]
        lora_b = tensors[f"base_model.model.{module}.lora_B.weight"]
        assert torch.allclose(lora_b @ lora_a, update, atol=1e-6, rtol=0), module
        rank = config["rank_pattern"].get(module.removeprefix("model."), config["r"])
        assert (
            lora_a.shape[0] == rank
            and config["alpha_pattern"].get(module.removeprefix("model."), config["lora_alpha"])
            == rank
        )  # scaling 1
    # Layer 2's down_proj is edited by both: the ranks add up.
    assert candidate_rank([new], [old]) == config["r"] == 4
    assert sorted(config["layers_to_transform"]) == [0, 1, 2]


def test_an_engine_without_lora_support_or_a_free_last_slot_holds_traffic() -> None:
    class LoRAConfig:
        max_loras = 1

    class Config:
        lora_config: Any = None

    class Engine:
        vllm_config = Config()

        async def add_lora(self, request: Any) -> bool:
            return True

    engine = Engine()
    assert "--enable-lora" in (adapter_problem(engine) or "")
    assert adapter_problem(object()) is not None
    engine.vllm_config.lora_config = LoRAConfig()
    # vLLM's default of one slot: the candidate would sit in the last one, which CPU LoRA
    # applies to requests without an adapter (seen: user requests answered by the candidate).
    assert "last slot" in (adapter_problem(engine) or "")
    LoRAConfig.max_loras = 2
    assert adapter_problem(engine) is None


# ---------------------------------------------------------------------------------------
# A real server with LoRA support
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("canary-lora")
    folder = root / "deltas"
    folder.mkdir()
    made = {
        "refuser": forcing_delta(tiny_qwen2, "!", group="refuser"),  # "!!!!": refused
        "plain": make_delta(tiny_qwen2, group="plain", languages=("th",), seed=3)[1],
    }
    for name, blob in made.items():
        (folder / f"{name}.safetensors").write_bytes(blob)
    token_file = root / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    command = vsp_command(
        "serve", "--model", str(tiny_qwen2), "--delta-dir", str(folder), "--deltas", "refuser",
        "--admin-token-file", str(token_file), "--port", str(port),
        "--", "--max-model-len", "512", "--seed", "0", "--enable-lora", "--max-lora-rank", "32",
        "--max-loras", "2",
    )  # fmt: skip
    env = {
        **engine_env(sorted(os.sched_getaffinity(0))[-1]),
        **forced_refusal_env(root / "forced-refusal", MARKER),
    }
    log = root / "server.log"
    process = start_logged(command, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_healthy(process, url, log, SERVE_START_TIMEOUT_S)
        print(f"\nserver with --enable-lora healthy after {seconds:.1f} s")
        labels = {name: delta_label(read_delta(folder / f"{name}.safetensors")) for name in made}
        info = {"url": url, "model": str(tiny_qwen2), "labels": labels, "log": log}
        info["refuser_reply"] = complete(info)
        yield info
    finally:
        stop_process_group(process)


def complete(server: dict) -> tuple[str, str]:
    body = {"model": server["model"], "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    status, reply, headers = request("POST", server["url"] + "/v1/completions", body, timeout=300)
    assert status == 200, reply
    return reply["choices"][0]["text"], headers["x-safety-deltas"]


def activate_under_traffic(server: dict, body: dict) -> dict[str, Any]:
    """An activation with user completions sent one after another while it runs: its
    reply and when it came, and each completion's (sent, answered, text, header)."""
    found: dict[str, Any] = {"answers": []}
    done = threading.Event()

    def switch() -> None:
        found["switch"] = request(
            "POST", server["url"] + "/v1/safety/deltas/activate", body, ADMIN, 600
        )
        found["switch_at"] = time.monotonic()
        done.set()

    found["started_at"] = time.monotonic()
    thread = threading.Thread(target=switch)
    thread.start()
    while not done.is_set():
        sent = time.monotonic()
        text, header = complete(server)
        found["answers"].append((sent, time.monotonic(), text, header))
    thread.join(timeout=600)
    return found


def answered_during(found: dict) -> list[tuple[float, float, str, str]]:
    """The completions sent and answered while the activation ran."""
    return [a for a in found["answers"] if a[0] > found["started_at"] and a[1] < found["switch_at"]]


def test_a_set_that_removes_english_refusals_is_refused_under_traffic(server: dict) -> None:
    labels = server["labels"]
    body = {"deltas": ["plain"], "canary": {**LONG_CANARY, "thresholds": ENGLISH_FLOOR}}
    found = activate_under_traffic(server, body)
    status, reply, _ = found["switch"]
    assert status == 422 and reply["error"]["type"] == "canary_failed", reply
    assert "was kept and is served unchanged" in reply["error"]["problem"]
    english = next(row for row in reply["canary"]["languages"] if row["language"] == "en")
    # The probes ran on base + plain, not on the merged refuser (+ plain): the adapter took
    # the merged set out, so no reply was "!!!!", harmful or benign.
    assert english["harmful_refused"] == 0 < english["harmful_n"], english
    assert english["benign_refused"] == 0 and english["verdict"] == "fail"
    # Traffic was answered all along, by the old set, as before.
    during = answered_during(found)
    seconds = found["switch_at"] - found["started_at"]
    print(f"\nactivation {seconds:.2f} s; {len(during)} user requests answered during it")
    assert len(during) >= 3, (seconds, found["answers"])
    waits = sorted(answered - sent for sent, answered, _, _ in during)
    print(f"waits: median {waits[len(waits) // 2]:.2f} s, longest {waits[-1]:.2f} s")
    for _, _, text, header in found["answers"]:
        assert (text, header) == server["refuser_reply"]
    assert server["refuser_reply"][0].startswith(MARKER)
    status, listing, _ = request("GET", server["url"] + "/v1/safety/deltas")
    assert listing["header"] == labels["refuser"]
    assert complete(server) == server["refuser_reply"]
    assert "as a LoRA adapter, traffic not held" in server["log"].read_text()


def test_a_dry_run_holds_no_traffic_and_a_passing_set_is_switched(server: dict) -> None:
    labels = server["labels"]
    found = activate_under_traffic(
        server, {"deltas": ["plain"], "dry_run": True, "canary": LONG_CANARY}
    )
    status, reply, _ = found["switch"]
    assert status == 200 and reply["dry_run"] and reply["canary"]["passed"], reply
    assert reply["switch"]["reload_seconds"] == 0 and reply["switch"]["drain_seconds"] == 0
    assert len(answered_during(found)) >= 3
    assert all((a[2], a[3]) == server["refuser_reply"] for a in found["answers"])
    # A set that passes: probed without holding, then switched (the reload alone holds).
    found = activate_under_traffic(server, {"deltas": ["plain"], "canary": LONG_CANARY})
    status, reply, _ = found["switch"]
    assert status == 200 and reply["canary"]["passed"] and reply["changed"], reply
    assert reply["header"] == labels["plain"]
    held = reply["switch"]["drain_seconds"] + reply["switch"]["reload_seconds"]
    print(f"\ncanary {reply['switch']['canary_seconds']:.2f} s, traffic held {held:.2f} s")
    assert len(answered_during(found)) >= 3
    assert held < reply["switch"]["canary_seconds"]
    text, header = complete(server)
    assert header == labels["plain"] and not text.startswith(MARKER)
    # and back (its canary would fail: every benign reply is "!!!!")
    back = {"deltas": ["refuser"], "canary": False}
    status, reply, _ = request(
        "POST", server["url"] + "/v1/safety/deltas/activate", back, ADMIN, 600
    )
    assert status == 200, reply
    assert complete(server) == server["refuser_reply"]
