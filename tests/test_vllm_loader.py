"""The ``vsp`` load format in real vLLM (CPU): deltas merged while the weights stream in.

Engine starts are what cost time here, so they are shared:

* every offline ``vllm.LLM`` runs in ONE helper subprocess (this file run as a script), one
  engine after another, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): about 3 s per
  engine instead of ~40 s, and vLLM's CPU set-up (thread binding, NUMA policy, torch thread
  count) never touches the pytest process;
* the real multi-process OpenAI server starts twice: once serving a delta, once refusing one.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import make_delta

from vllm_safety_patch.delta.export import write_merged_checkpoint
from vllm_safety_patch.delta.io import Delta, encode_delta, read_delta
from vllm_safety_patch.delta.merge import edit_weight, edits_by_tensor
from vllm_safety_patch.delta.verify import check_architecture, verify_against_checkpoint
from vllm_safety_patch.errors import DeltaMismatchError, VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.tiny import build_tiny_model
from vllm_safety_patch.vllm_plugin import loader as vsp_loader
from vllm_safety_patch.vllm_plugin.loader import (
    AppliedDelta,
    LoaderConfigError,
    MergePlan,
    applied_deltas,
    delta_paths_from_config,
)

PROMPTS = ["Hello world", "สวัสดีครับ วันนี้", "How do I bake bread?"]
SERVER_PROMPT = "Hello world"
MAX_TOKENS = 8
TOP_LOGPROBS = 3
MAX_MODEL_LEN = 512
RUNNER_TIMEOUT_S = 480
SERVER_START_TIMEOUT_S = 360


def engine_env() -> dict[str, str]:
    """Environment for every vLLM process started here."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default (4) is wasted on a 512-token tiny model
        # One core: OpenMP threads spread over both shared cores spin-wait against the other
        # jobs on this machine (a measured 24 s instead of <1 s for 16 tokens).
        VLLM_CPU_OMP_THREADS_BIND=str(max(os.sched_getaffinity(0))),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("VSP_DELTAS", None)
    return env


def tampered_copy(delta: Delta, path: Path) -> Path:
    """A well-formed delta whose manifest claims other base weights."""
    base = delta.manifest.base_model.model_copy(update={"fingerprint": "0" * 64})
    manifest = delta.manifest.model_copy(update={"base_model": base})
    path.write_bytes(encode_delta(manifest, delta.edits))
    return path


# ---------------------------------------------------------------------------------------
# Files shared by the engine tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path, tiny_llama: Path) -> dict:
    root = tmp_path_factory.mktemp("vllm-loader")
    qwen_bf16 = build_tiny_model(root / "qwen2-bf16", "qwen2", seed=0, dtype=torch.bfloat16)

    def save(name: str, made: tuple[Delta, bytes]) -> tuple[Delta, Path]:
        path = root / f"{name}.safetensors"
        path.write_bytes(made[1])
        return read_delta(path), path

    first, first_path = save("first", make_delta(tiny_qwen2, group="first", layers=(0, 2)))
    # A second group that shares layer 2 with the first: the edits must stack in group order.
    second, second_path = save(
        "second", make_delta(tiny_qwen2, group="second", layers=(1, 2), seed=7)
    )
    bf16, bf16_path = save("bf16", make_delta(qwen_bf16, group="first"))
    llama, llama_path = save("llama", make_delta(tiny_llama, group="first"))
    tampered = tampered_copy(first, root / "tampered.safetensors")
    base = Checkpoint(tiny_qwen2)
    return {
        "root": root,
        "qwen": tiny_qwen2,
        "qwen_bf16": qwen_bf16,
        "first": first,
        "first_path": first_path,
        "second_path": second_path,
        "bf16": bf16,
        "bf16_path": bf16_path,
        "llama": llama,
        "llama_path": llama_path,
        "tampered": tampered,
        "merged": write_merged_checkpoint(base, [first], root / "merged-first"),
        "merged_both": write_merged_checkpoint(base, [first, second], root / "merged-both"),
        "merged_bf16": write_merged_checkpoint(Checkpoint(qwen_bf16), [bf16], root / "merged-bf16"),
    }


# ---------------------------------------------------------------------------------------
# Fast checks: no engine
# ---------------------------------------------------------------------------------------


def test_importing_the_plugin_does_not_import_vllm() -> None:
    code = (
        "import sys, vllm_safety_patch.vllm_plugin, vllm_safety_patch.vllm_plugin.loader\n"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_config_keys_and_environment() -> None:
    paths, rest = delta_paths_from_config(
        {"deltas": ["/x/a.safetensors", "rel.safetensors"], "num_threads": 2}, environ={}
    )
    assert paths == [Path("/x/a.safetensors"), Path(os.path.abspath("rel.safetensors"))]
    assert rest == {"num_threads": 2}
    assert delta_paths_from_config({"deltas": []}, environ={}) == ([], {})
    # The extra config wins over the environment.
    assert delta_paths_from_config({"deltas": []}, environ={"VSP_DELTAS": "/y"})[0] == []
    environ = {"VSP_DELTAS": os.pathsep.join(["/a.safetensors", "", "/b.safetensors"])}
    assert delta_paths_from_config({}, environ=environ)[0] == [
        Path("/a.safetensors"),
        Path("/b.safetensors"),
    ]
    with pytest.raises(LoaderConfigError, match="was given no deltas"):
        delta_paths_from_config({}, environ={})
    with pytest.raises(LoaderConfigError, match="must be a JSON list"):
        delta_paths_from_config({"deltas": "/a.safetensors"}, environ={})
    with pytest.raises(LoaderConfigError, match="not a path"):
        delta_paths_from_config({"deltas": [3]}, environ={})


def test_register_is_idempotent_and_config_is_not_mutated(files: dict) -> None:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader, get_model_loader

    cls = vsp_loader.register_loader()
    assert vsp_loader.register_loader() is cls
    assert vsp_loader.DeltaMergingModelLoader is cls
    assert cls.__name__ == "DeltaMergingModelLoader" and issubclass(cls, DefaultModelLoader)
    extra = {"deltas": [str(files["first_path"])], "enable_multithread_load": False}
    load_config = LoadConfig(load_format="vsp", model_loader_extra_config=extra)
    loader = get_model_loader(load_config)
    assert type(loader) is cls
    assert loader.load_config.load_format == "safetensors"
    assert loader.load_config.model_loader_extra_config == {"enable_multithread_load": False}
    # vLLM builds the loader again from the same LoadConfig to reload weights.
    assert load_config.model_loader_extra_config == extra
    with pytest.raises(ValueError, match="Unexpected extra config keys"):
        get_model_loader(
            LoadConfig(load_format="vsp", model_loader_extra_config={"deltas": [], "x": 1})
        )


def test_same_file_or_group_twice_is_refused(files: dict) -> None:
    config = Checkpoint(files["qwen"]).config
    with pytest.raises(VSPError, match="delta 'first' is given twice"):
        MergePlan.prepare([files["first_path"], files["first_path"]], config)
    with pytest.raises(VSPError, match="delta 'first' is given twice"):
        MergePlan.prepare([files["first_path"], files["tampered"]], config)
    with pytest.raises(DeltaMismatchError, match="another architecture"):
        MergePlan.prepare([files["llama_path"]], config)


def stream_all(plan: MergePlan, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(plan.stream(iter(weights.items())))


def test_stream_refuses_what_it_cannot_apply_in_full(files: dict) -> None:
    checkpoint = Checkpoint(files["qwen"])
    weights = checkpoint.get_many(checkpoint.tensor_names())
    plan = MergePlan.prepare([files["first_path"]], checkpoint.config)
    edited = sorted(plan.edits)

    missing = {name: tensor for name, tensor in weights.items() if name != edited[0]}
    with pytest.raises(DeltaMismatchError, match=f"streamed no tensor '{edited[0]}'"):
        stream_all(plan, missing)

    reshaped = dict(weights, **{edited[0]: weights[edited[0]][:, :-1]})
    with pytest.raises(DeltaMismatchError, match="in the model"):
        stream_all(plan, reshaped)

    other = dict(weights, **{edited[0]: weights[edited[0]] + 1e-3})
    with pytest.raises(DeltaMismatchError, match="fingerprint mismatch"):
        stream_all(plan, other)

    def twice() -> Iterator[tuple[str, torch.Tensor]]:
        yield from weights.items()
        yield edited[0], weights[edited[0]]

    with pytest.raises(DeltaMismatchError, match="twice"):
        list(plan.stream(twice()))


def fake_model_config(model: Path) -> SimpleNamespace:
    """The fields of vLLM's ModelConfig that the loader reads outside an engine."""
    return SimpleNamespace(
        model=str(model), revision=None, quantization=None, is_moe=False, multimodal_config=None
    )


def test_real_iterator_digests_bf16_as_stored(files: dict) -> None:
    """vLLM yields the checkpoint's dtype (bf16), whatever --dtype: the digest must use it."""
    cls = vsp_loader.register_loader()
    from vllm.config.load import LoadConfig

    extra = {"deltas": [str(files["bf16_path"])]}
    loader = cls(LoadConfig(load_format="vsp", model_loader_extra_config=extra))
    checkpoint = Checkpoint(files["qwen_bf16"])
    streamed = dict(
        loader.get_all_weights(fake_model_config(files["qwen_bf16"]), torch.nn.Module())
    )
    assert {tensor.dtype for tensor in streamed.values()} == {torch.bfloat16}
    assert sorted(streamed) == checkpoint.tensor_names()
    delta = files["bf16"]
    for name, edits in edits_by_tensor([delta]).items():
        assert torch.equal(streamed[name], edit_weight(checkpoint.get(name), edits))
    verify_against_checkpoint([delta], checkpoint)  # what `vsp verify` checks: same bytes
    assert applied_deltas() == [
        AppliedDelta("first", delta.sha256, delta.manifest.base_model.fingerprint)
    ]


def test_model_that_stops_reading_early_is_refused(files: dict) -> None:
    cls = vsp_loader.register_loader()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.load import LoadConfig

    class StopsEarly(torch.nn.Module):
        def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
            next(iter(weights))

    extra = {"deltas": [str(files["first_path"])]}
    loader = cls(LoadConfig(load_format="vsp", model_loader_extra_config=extra))
    with (
        set_current_vllm_config(VllmConfig()),
        pytest.raises(DeltaMismatchError, match="stopped reading weights"),
    ):
        loader.load_weights(StopsEarly(), fake_model_config(files["qwen"]))
    assert applied_deltas() == []


# ---------------------------------------------------------------------------------------
# Offline engines, all in one helper subprocess
# ---------------------------------------------------------------------------------------


def scenario(model: Path, deltas: list[Path] | None = None) -> dict[str, Any]:
    """``deltas=None``: vLLM's own loader; a list (maybe empty): ``--load-format vsp``."""
    return {"model": str(model), "deltas": None if deltas is None else [str(d) for d in deltas]}


@pytest.fixture(scope="module")
def offline(files: dict) -> dict[str, dict]:
    """Greedy outputs (or the start-up error) of every offline engine, by scenario name."""
    scenarios = {
        "base": scenario(files["qwen"]),
        "vsp": scenario(files["qwen"], [files["first_path"]]),
        "merged": scenario(files["merged"]),
        "empty": scenario(files["qwen"], []),
        # Given in the "wrong" order on purpose: the loader applies groups sorted.
        "vsp_both": scenario(files["qwen"], [files["second_path"], files["first_path"]]),
        "merged_both": scenario(files["merged_both"]),
        "vsp_bf16": scenario(files["qwen_bf16"], [files["bf16_path"]]),
        "merged_bf16": scenario(files["merged_bf16"]),
        "other_architecture": scenario(files["qwen"], [files["llama_path"]]),
        "tampered": scenario(files["qwen"], [files["tampered"]]),
    }
    spec = files["root"] / "scenarios.json"
    result = files["root"] / "results.json"
    spec.write_text(json.dumps(scenarios))
    env = engine_env()
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in the helper process itself
    log = files["root"] / "offline.log"
    with log.open("w") as handle:
        run = subprocess.run(
            [sys.executable, __file__, str(spec), str(result)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=RUNNER_TIMEOUT_S,
        )
    if run.returncode != 0:
        pytest.fail(f"offline runner failed ({run.returncode}):\n{log.read_text()[-6000:]}")
    results = json.loads(result.read_text())
    for name, item in results.items():
        print(f"{name}: engine start {item['start_s']:.1f} s")
    return results


def outputs(results: dict, name: str) -> list[dict]:
    item = results[name]
    assert item["ok"], f"{name} did not start: {item.get('error')}"
    return item["outputs"]


def test_vsp_load_equals_merged_checkpoint(offline: dict, files: dict) -> None:
    # Token ids and every returned logprob, exactly: the same bytes reached the model.
    assert outputs(offline, "vsp") == outputs(offline, "merged")
    assert outputs(offline, "vsp") != outputs(offline, "base")
    delta = files["first"]
    assert offline["vsp"]["applied"] == [
        ["first", delta.sha256, delta.manifest.base_model.fingerprint]
    ]


def test_two_deltas_stack_like_the_merged_checkpoint(offline: dict) -> None:
    assert outputs(offline, "vsp_both") == outputs(offline, "merged_both")
    assert outputs(offline, "vsp_both") != outputs(offline, "vsp")
    assert [group for group, _, _ in offline["vsp_both"]["applied"]] == ["first", "second"]


def test_bf16_checkpoint_served_in_float32(offline: dict) -> None:
    # The bf16 delta's fingerprint matched, so the digest saw the stored bf16 bytes.
    assert outputs(offline, "vsp_bf16") == outputs(offline, "merged_bf16")
    assert [group for group, _, _ in offline["vsp_bf16"]["applied"]] == ["first"]


def test_empty_delta_list_serves_base_weights(offline: dict) -> None:
    assert outputs(offline, "empty") == outputs(offline, "base")
    assert offline["empty"]["applied"] == []


def expected_error(call: Any, *args: Any) -> str:
    with pytest.raises(VSPError) as caught:
        call(*args)
    return str(caught.value)


def test_delta_for_other_architecture_stops_start_up(offline: dict, files: dict) -> None:
    item = offline["other_architecture"]
    assert not item["ok"] and item["error_type"] == "DeltaMismatchError"
    config = Checkpoint(files["qwen"]).config
    assert item["error"] == expected_error(check_architecture, files["llama"], config)
    assert "solved for another architecture" in item["error"] and "Fix:" in item["error"]


def test_tampered_fingerprint_stops_start_up(offline: dict, files: dict) -> None:
    item = offline["tampered"]
    assert not item["ok"] and item["error_type"] == "DeltaMismatchError"
    expected = expected_error(
        verify_against_checkpoint, [read_delta(files["tampered"])], Checkpoint(files["qwen"])
    )
    assert item["error"] == expected
    assert "fingerprint mismatch" in item["error"] and "\n" not in item["error"]


# ---------------------------------------------------------------------------------------
# The real OpenAI API server (multi-process: API server, EngineCore, worker)
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, deltas: list[Path], port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--load-format",
        "vsp",
        "--model-loader-extra-config",
        json.dumps({"deltas": [str(delta) for delta in deltas]}),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    with log.open("w") as handle:
        # Its own session, so teardown can reach the EngineCore and worker it spawns.
        return subprocess.Popen(
            command,
            env=engine_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server and every process of its session (EngineCore, worker)."""
    if process.poll() is None:
        process.terminate()  # vLLM shuts its children down on SIGTERM
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # stragglers of our own session only
        except ProcessLookupError:
            break
        time.sleep(2)
    if process.poll() is None:
        process.wait(timeout=30)


def wait_for_health(process: subprocess.Popen, port: int, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < SERVER_START_TIMEOUT_S:
        if process.poll() is not None:
            pytest.fail(f"server exited ({process.returncode}):\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def server(files: dict, offline: dict) -> Iterator[dict]:
    port = free_port()
    log = files["root"] / "server.log"
    process = start_server(files["qwen"], [files["first_path"]], port, log)
    try:
        seconds = wait_for_health(process, port, log)
        print(f"API server healthy after {seconds:.1f} s")
        yield {"port": port, "log": log, "model": str(files["qwen"])}
    finally:
        stop_server(process)


def test_api_server_serves_the_delta(server: dict, offline: dict, files: dict) -> None:
    body = {
        "model": server["model"],
        "prompt": SERVER_PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": 1,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{server['port']}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        choice = json.loads(reply.read())["choices"][0]
    solo = offline["vsp"]["solo"]
    assert choice["token_ids"] == solo["token_ids"]
    assert choice["text"] == solo["text"]
    assert choice["logprobs"]["token_logprobs"] == solo["token_logprobs"]
    assert choice["token_ids"] != offline["base"]["solo"]["token_ids"] or (
        choice["logprobs"]["token_logprobs"] != offline["base"]["solo"]["token_logprobs"]
    )
    log = server["log"].read_text()
    delta = files["first"]
    assert f"vsp: applied delta group=first tensors={len(delta.edits)}" in log
    assert f"sha256={delta.sha256[:12]}" in log


def test_api_server_refusal_is_the_last_line(files: dict, offline: dict) -> None:
    port = free_port()
    log = files["root"] / "server-refused.log"
    process = start_server(files["qwen"], [files["tampered"]], port, log)
    try:
        returncode = process.wait(timeout=SERVER_START_TIMEOUT_S)
    finally:
        stop_server(process)
    assert returncode != 0
    expected = offline["tampered"]["error"]
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines[-1] == f"vsp: start-up refused: {expected}", "\n".join(lines[-20:])


# ---------------------------------------------------------------------------------------
# The helper subprocess: `python test_vllm_loader.py SCENARIOS.json RESULTS.json`
# ---------------------------------------------------------------------------------------


def _greedy(llm: Any, prompts: list[str]) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP_LOGPROBS)
    results = []
    for request in llm.generate(prompts, params, use_tqdm=False):
        completion = request.outputs[0]
        results.append(
            {
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "token_logprobs": [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
                "top_logprobs": [
                    {str(token): entry.logprob for token, entry in step.items()}
                    for step in completion.logprobs
                ],
            }
        )
    return results


def _run_scenarios(spec_path: str, result_path: str) -> None:
    from vllm import LLM

    scenarios = json.loads(Path(spec_path).read_text())
    results: dict[str, dict] = {}
    for name, item in scenarios.items():
        kwargs: dict[str, Any] = {}
        if item["deltas"] is not None:
            kwargs = {
                "load_format": "vsp",
                "model_loader_extra_config": {"deltas": item["deltas"]},
            }
        started = time.monotonic()
        try:
            llm = LLM(
                model=item["model"],
                enforce_eager=True,
                dtype="float32",
                max_model_len=MAX_MODEL_LEN,
                seed=0,
                **kwargs,
            )
        except Exception as error:  # the refusal under test, reported to pytest
            results[name] = {
                "ok": False,
                "start_s": time.monotonic() - started,
                "error_type": type(error).__name__,
                "error": str(error),
            }
            continue
        start_s = time.monotonic() - started
        results[name] = {
            "ok": True,
            "start_s": start_s,
            # Only a vsp load sets it: other loaders leave the previous engine's record.
            "applied": [list(e) for e in applied_deltas()] if item["deltas"] is not None else None,
            "outputs": _greedy(llm, PROMPTS),
            "solo": _greedy(llm, [SERVER_PROMPT])[0],  # a batch of one, like the server test
        }
        del llm
        gc.collect()
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM spawns processes: keep the engine work behind this guard
    _run_scenarios(sys.argv[1], sys.argv[2])
