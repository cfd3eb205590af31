"""Per-request LoRA deltas (``vsp serve --lora``): adapters exported once, vLLM's flags, the
``X-Safety-Deltas`` header of LoRA answers. The real-server side (vLLM multi-LoRA serving
the default model's ``all`` delta) is in test_real_model_serving.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_delta
from starlette.datastructures import State

from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.serve import build_launch
from vllm_safety_patch.server.lora import (
    Adapter,
    labels_from_env,
    lora_flags,
    prepare_adapters,
    requested_model,
)
from vllm_safety_patch.server.middleware import SafetyMiddleware
from vllm_safety_patch.server.state import ActiveEntry, SafetyState


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> dict:
    root = tmp_path_factory.mktemp("lora")
    delta_dir = root / "deltas"
    delta_dir.mkdir()
    for seed, group in enumerate(("east", "west")):
        _, data = make_delta(tiny_qwen2, group=group, layers=(seed,), rank=4, seed=seed)
        (delta_dir / f"{group}.safetensors").write_bytes(data)
    return {"model": tiny_qwen2, "delta_dir": delta_dir, "cache": root / "cache"}


def test_adapters_are_exported_once_and_named_by_group(files: dict) -> None:
    paths = [files["delta_dir"] / "east.safetensors", files["delta_dir"] / "west.safetensors"]
    adapters = prepare_adapters(paths, files["model"], [], files["cache"])
    assert [a.name for a in adapters] == ["east", "west"]
    for adapter in adapters:
        config = json.loads((adapter.path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and adapter.rank == config["r"] == 4
        assert adapter.label.startswith(f"lora:{adapter.name}@")
    stamp = (adapters[0].path / "adapter_model.safetensors").stat().st_mtime_ns
    again = prepare_adapters(paths[:1], files["model"], [], files["cache"])
    assert (again[0].path / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_a_delta_merged_and_served_as_lora_is_refused(files: dict) -> None:
    east = files["delta_dir"] / "east.safetensors"
    with pytest.raises(VSPError, match="both merged .* and a LoRA adapter"):
        prepare_adapters([east], files["model"], [east], files["cache"])


def test_lora_flags_round_the_rank_up_and_leave_the_users_flags() -> None:
    adapters = [Adapter("a", Path("/x/a"), 20, "lora:a@1"), Adapter("b", Path("/x/b"), 4, "l")]
    flags = lora_flags(adapters, lambda flag: False)
    assert flags == [
        "--enable-lora", "--lora-modules", "a=/x/a", "b=/x/b", "--max-lora-rank", "32",
        "--max-loras", "3",
    ]  # fmt: skip
    mine = lora_flags(adapters, lambda flag: flag in ("--max-lora-rank", "--enable-lora"))
    # Two adapters and vLLM's last slot left empty (lora.py, max_loras_for).
    assert mine == ["--lora-modules", "a=/x/a", "b=/x/b", "--max-loras", "3"]
    assert lora_flags([], lambda flag: False) == []


def test_launch_with_lora(files: dict) -> None:
    launch = build_launch(
        model=files["model"],
        delta_dir=files["delta_dir"],
        deltas=["none"],
        lora=["east,west"],
        environ={"PATH": "/usr/bin", "VSP_HOME": str(files["cache"].parent)},
        gpu=False,
    )
    argv = launch.argv
    modules = argv[argv.index("--lora-modules") + 1 : argv.index("--max-lora-rank")]
    assert [m.split("=")[0] for m in modules] == ["east", "west"]
    labels = labels_from_env(launch.env)
    assert set(labels) == {"east", "west"} and labels["east"].startswith("lora:east@")
    with pytest.raises(VSPError, match="no delta 'north'"):
        build_launch(
            model=files["model"], delta_dir=files["delta_dir"], deltas=["none"], lora=["north"]
        )
    plain = build_launch(
        model=files["model"],
        delta_dir=files["delta_dir"],
        deltas=["east"],
        environ={"VSP_LORA_LABELS": '{"stale": "x"}'},
        gpu=False,
    )
    assert "--enable-lora" not in plain.argv and "VSP_LORA_LABELS" not in plain.env


def test_requested_model_and_labels_parsing() -> None:
    assert requested_model(b'{"model": "east", "prompt": "x"}') == "east"
    for body in (b"", b"not json", b"[1, 2]", b'{"model": 3}'):
        assert requested_model(body) is None
    assert labels_from_env({"VSP_LORA_LABELS": "{broken"}) == {}
    assert labels_from_env({}) == {}


def test_lora_answers_name_the_adapter(files: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_safety_patch.delta.io import read_delta

    monkeypatch.setenv("VSP_LORA_LABELS", json.dumps({"east": "lora:east@abc"}))

    async def app(scope: dict, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    state = State()
    west = files["delta_dir"] / "west.safetensors"
    state.vsp_safety = SafetyState(
        delta_dir=files["delta_dir"],
        model_dir=files["model"],
        served_model="tiny",
        admin_token=None,
        engine=None,
        active=[ActiveEntry.of(read_delta(west), west, files["delta_dir"])],
        hot_patch_problem="no engine",
    )
    middleware = SafetyMiddleware(app, state)

    def header(body: bytes) -> str:
        sent: list[dict] = []
        chunks = [body[:5], body[5:]]

        async def receive() -> dict:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        asyncio.run(middleware(scope, receive, send))
        headers = dict(sent[0]["headers"])
        return headers[b"x-safety-deltas"].decode()

    merged = state.vsp_safety.header()
    assert merged.startswith("west@")
    assert header(b'{"model": "east", "prompt": "hi"}') == f"{merged}+lora:east@abc"
    assert header(b'{"model": "tiny", "prompt": "hi"}') == merged
