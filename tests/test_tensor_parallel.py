"""Tensor parallelism: deltas merged at load time and hot-patched are correct under TP=2.

vLLM fuses ``gate_proj`` + ``up_proj`` into ``gate_up_proj`` and shards it (and
``down_proj``'s columns) across tensor-parallel ranks. The ``vsp`` loader edits the HF-named
tensors before that happens, and the hot patch reloads HF-named tensors through vLLM's own
reload, so both should be correct under TP by construction. Checked here on the tiny random
Qwen2 (intermediate size 192: 96 neurons per rank) with a delta whose neurons S fall in both
ranks' halves, editing rows S of gate_proj and up_proj (and columns S of down_proj), and
columns of the attention output ``o_proj`` in both ranks' heads:

* each rank's ``gate_up_proj`` / ``down_proj`` / ``o_proj`` computes with exactly its slice
  of the merged checkpoint's tensors (digests of the weights read back from the live
  layers), after the load and after every switch: the bytes a TP=2 engine on the merged
  checkpoint would hold;
* ``--load-format vsp`` at TP=2 gives the greedy tokens of the merged checkpoint served at
  TP=1, with logprobs within rounding (the all-reduce sums in another order), and not the
  base model's tokens;
* hot-patching that engine to base weights gives the base outputs, and back to the delta the
  load-time outputs exactly (``llm.collective_rpc`` of the worker extension's methods: the
  calls ``vsp serve`` makes).

vLLM CPU runs TP=2 with gloo and the multiprocessing executor, one core per rank
(``VLLM_CPU_OMP_THREADS_BIND='A|B'``; measured on a 2-core machine: the TP=2 engine starts
in 30-80 s, most of it the two workers importing vLLM). All engines run in one helper
subprocess (this file run as a script), one after another: the TP=1 references in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~3 s each, vLLM ignores the thread binding there),
then the TP=2 engine, whose workers are spawned.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from serving_helpers import engine_env, start_logged, stop_process_group

from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.export import write_merged_checkpoint
from vllm_safety_patch.delta.io import Delta, TensorEdit, read_delta
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.vllm_plugin.worker_extension import (
    ACTIVE_METHOD,
    PREPARE_METHOD,
    RELOAD_METHOD,
)

TP = 2
PROMPTS = ["Hello world", "The cat", "1 2 3 4"]
MAX_TOKENS = 8
TOP_LOGPROBS = 3
MAX_MODEL_LEN = 512
# Passed to vLLM directly: VLLM_CPU_KVCACHE_SPACE (whole GiB, per rank) would set 1 GiB per
# rank where a 512-token tiny model needs well under 1 MiB; the variable also overrides this.
KV_CACHE_BYTES = 32 << 20
RUNNER_TIMEOUT_S = 540
# TP=2 against TP=1: the same weights, only the order of the sums differs (per-rank partial
# products all-reduced). Measured: up to 5e-7 here; the bound leaves room for other CPUs.
LOGPROB_TOLERANCE = 1e-4
# Edited neurons: K_PER_RANK in each rank's half of the intermediate dimension.
K_PER_RANK = 24
RANK = 4
LAYERS = range(3)  # the tiny model's layers: every MLP shard is digested


# ---------------------------------------------------------------------------------------
# The delta, the merged checkpoint and the shards each rank must hold
# ---------------------------------------------------------------------------------------


def neurons_in_both_halves(size: int, seed: int) -> torch.Tensor:
    """K_PER_RANK neurons from each rank's half of ``size``: every rank's shard is edited."""
    generator = torch.Generator().manual_seed(seed)
    half = size // TP
    return torch.cat(
        [rank * half + torch.randperm(half, generator=generator)[:K_PER_RANK] for rank in range(TP)]
    )


def strong_edit(
    checkpoint: Checkpoint, name: str, axis: str, neurons: torch.Tensor, seed: int
) -> TensorEdit:
    """A low-rank edit on ``neurons``, large enough to change greedy tokens."""
    generator = torch.Generator().manual_seed(seed)
    out_dim, in_dim = checkpoint.shape(name)
    k = neurons.numel()
    left_rows, right_columns = (out_dim, k) if axis == "columns" else (k, in_dim)
    left = torch.randn(left_rows, RANK, generator=generator)
    right = torch.randn(RANK, right_columns, generator=generator)
    return TensorEdit.build(name, (out_dim, in_dim), axis, neurons, left * 0.5, right * 0.1)


def tp_delta(model: Path) -> bytes:
    """Layer 0: rows S of gate_proj and up_proj and columns S of down_proj (the same S).
    Layer 1: rows of up_proj only (the unchanged gate_proj half shares its fused shard), and
    columns of self_attn.o_proj in both ranks' heads (the attention-output edit).
    Layer 2: rows S of gate_proj and up_proj only (the paper's input-side edit)."""
    checkpoint = Checkpoint(model)
    intermediate = checkpoint.config["intermediate_size"]
    hidden = checkpoint.config["hidden_size"]
    plan = {
        0: (("mlp.gate_proj", "rows"), ("mlp.up_proj", "rows"), ("mlp.down_proj", "columns")),
        1: (("mlp.up_proj", "rows"), ("self_attn.o_proj", "columns")),
        2: (("mlp.gate_proj", "rows"), ("mlp.up_proj", "rows")),
    }
    edits = []
    for layer, parts in plan.items():
        for index, (module, axis) in enumerate(parts):
            size = hidden if module == "self_attn.o_proj" else intermediate
            neurons = neurons_in_both_halves(size, seed=10 + layer)
            name = f"model.layers.{layer}.{module}.weight"
            edits.append(strong_edit(checkpoint, name, axis, neurons, seed=100 * layer + index))
    return build_delta(
        group="tp",
        languages=("th",),
        model_id=model.name,
        config=checkpoint.config,
        base_tensors=checkpoint.get_many([edit.name for edit in edits]),
        edits=edits,
        solver={"method": "random-test"},
    )[1]


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (used in the workers and here alike)."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def vllm_linear_modules() -> list[str]:
    return [
        f"model.layers.{layer}.{module}"
        for layer in LAYERS
        for module in ("mlp.gate_up_proj", "mlp.down_proj", "self_attn.o_proj")
    ]


def expected_shards(model: Path, tp: int) -> list[dict[str, str]]:
    """Per rank, the digests of its ``gate_up_proj``, ``down_proj`` and ``o_proj`` weights if
    it holds its slice of ``model``'s tensors: [gate rows of the rank; up rows of the rank]
    and the rank's columns of down_proj and o_proj (vLLM's MergedColumnParallelLinear /
    RowParallelLinear)."""
    checkpoint = Checkpoint(model)
    shards: list[dict[str, str]] = [{} for _ in range(tp)]
    for layer in LAYERS:
        prefix = f"model.layers.{layer}.mlp"
        gate = checkpoint.get(f"{prefix}.gate_proj.weight")
        up = checkpoint.get(f"{prefix}.up_proj.weight")
        down = checkpoint.get(f"{prefix}.down_proj.weight")
        size = gate.shape[0] // tp
        for rank in range(tp):
            part = slice(rank * size, (rank + 1) * size)
            fused = torch.cat([gate[part], up[part]])
            shards[rank][f"{prefix}.gate_up_proj"] = digest(fused)
            shards[rank][f"{prefix}.down_proj"] = digest(down[:, part])
        o_proj = checkpoint.get(f"model.layers.{layer}.self_attn.o_proj.weight")
        width = o_proj.shape[1] // tp
        for rank in range(tp):
            columns = o_proj[:, rank * width : (rank + 1) * width]
            shards[rank][f"model.layers.{layer}.self_attn.o_proj"] = digest(columns)
    return shards


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> dict:
    root = tmp_path_factory.mktemp("tensor-parallel")
    path = root / "tp.safetensors"
    path.write_bytes(tp_delta(tiny_qwen2))
    delta = read_delta(path)
    merged = write_merged_checkpoint(Checkpoint(tiny_qwen2), [delta], root / "merged-tp")
    return {"root": root, "model": tiny_qwen2, "delta": delta, "path": path, "merged": merged}


def test_the_delta_edits_both_ranks_halves_of_gate_and_up(files: dict) -> None:
    """What the engine tests rely on: rows S of gate_proj AND up_proj, on both ranks."""
    delta: Delta = files["delta"]
    intermediate = Checkpoint(files["model"]).config["intermediate_size"]
    layer0 = "model.layers.0.mlp"
    gate = delta.edits[f"{layer0}.gate_proj.weight"]
    up = delta.edits[f"{layer0}.up_proj.weight"]
    down = delta.edits[f"{layer0}.down_proj.weight"]
    assert (gate.spec.axis, up.spec.axis, down.spec.axis) == ("rows", "rows", "columns")
    assert torch.equal(gate.neurons, up.neurons) and torch.equal(gate.neurons, down.neurons)
    hidden = Checkpoint(files["model"]).config["hidden_size"]
    for edit in delta.edits.values():
        size = hidden if "self_attn" in edit.name else intermediate
        per_rank = torch.bincount(edit.neurons // (size // TP), minlength=TP)
        assert per_rank.tolist() == [K_PER_RANK] * TP, edit.name
    # Every rank's shard differs between base and merged: the edit is visible on each rank.
    base, merged = expected_shards(files["model"], TP), expected_shards(files["merged"], TP)
    o_proj = "model.layers.1.self_attn.o_proj"
    assert delta.edits[f"{o_proj}.weight"].spec.axis == "columns"
    for rank in range(TP):
        for name in [f"model.layers.{layer}.mlp.gate_up_proj" for layer in LAYERS] + [o_proj]:
            assert base[rank][name] != merged[rank][name], (rank, name)


# ---------------------------------------------------------------------------------------
# All engines, in one helper subprocess
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(files: dict) -> dict[str, dict]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < TP:
        pytest.skip(
            f"tensor_parallel_size={TP} on vLLM CPU binds one core per rank "
            f"(VLLM_CPU_OMP_THREADS_BIND); this process may use {len(cores)} core(s)"
        )
    root = files["root"]
    spec = {
        "model": str(files["model"]),
        "merged": str(files["merged"]),
        "delta": str(files["path"]),
        "sha256": files["delta"].sha256,
        "tensors": sorted(files["delta"].edits),
    }
    spec_path, result_path, log = root / "spec.json", root / "results.json", root / "engines.log"
    spec_path.write_text(json.dumps(spec))
    env = engine_env(cores[0])
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # KV_CACHE_BYTES instead (see there)
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in cores[:TP])
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # EngineCore in the helper; TP workers spawned
    # The TP workers outlive the engine's shutdown request: SIGTERM after 1 s, not 5.
    env["VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"] = "1"
    started = time.monotonic()
    # Its own session, so that the TP workers it spawns are stopped with it in any case.
    runner = start_logged([sys.executable, __file__, str(spec_path), str(result_path)], env, log)
    try:
        returncode = runner.wait(timeout=RUNNER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        stop_process_group(runner)
    if returncode != 0:
        what = "timed out" if returncode is None else f"failed ({returncode})"
        pytest.fail(f"engine runner {what}:\n{log.read_text()[-8000:]}")
    results = json.loads(result_path.read_text())
    print(f"\nengines: {time.monotonic() - started:.1f} s in all")
    for name, item in results.items():
        print(f"  {name}: start {item['start_s']:.1f} s, total {item['total_s']:.1f} s")
    return results


def tokens(outputs: list[dict]) -> list[list[int]]:
    return [item["token_ids"] for item in outputs]


def assert_close(tp_outputs: list[dict], reference: list[dict]) -> None:
    """Same greedy tokens; every logprob (chosen and top-k) within LOGPROB_TOLERANCE."""
    assert tokens(tp_outputs) == tokens(reference)
    worst = 0.0
    for ours, theirs in zip(tp_outputs, reference, strict=True):
        for step_ours, step_theirs in zip(
            ours["top_logprobs"], theirs["top_logprobs"], strict=True
        ):
            assert step_ours.keys() == step_theirs.keys()
            for token, logprob in step_ours.items():
                worst = max(worst, abs(logprob - step_theirs[token]))
    print(f"TP={TP} vs TP=1: logprobs differ by up to {worst:.2e}")
    assert worst <= LOGPROB_TOLERANCE, f"logprobs differ by up to {worst:.2e}"


def assert_shards(replies: list[dict], expected: list[dict[str, str]]) -> None:
    """Every rank's read-back digests equal ``expected``; names the rank and layers if not."""
    got = [reply["digests"] for reply in replies]
    wrong = [
        f"rank {rank}: {name}"
        for rank, (ours, theirs) in enumerate(zip(got, expected, strict=True))
        for name in theirs
        if ours.get(name) != theirs[name]
    ]
    assert not wrong, "weights differ from the expected shards: " + ", ".join(wrong)


def test_tp2_engine_really_has_two_ranks(engines: dict) -> None:
    ranks = [(item["rank"], item["tp_rank"], item["tp_size"]) for item in engines["vsp"]["weights"]]
    assert ranks == [(0, 0, TP), (1, 1, TP)]
    assert [item["tp_size"] for item in engines["merged_tp1"]["weights"]] == [1]


def test_each_rank_holds_its_slice_of_the_merged_tensors(engines: dict, files: dict) -> None:
    assert_shards(engines["vsp"]["weights"], expected_shards(files["merged"], TP))
    # The fused layout expected_shards assumes, and the read-back, checked at TP=1 where
    # the fused tensor is whole.
    assert_shards(engines["merged_tp1"]["weights"], expected_shards(files["merged"], 1))
    assert_shards(engines["base_tp1"]["weights"], expected_shards(files["model"], 1))


def test_vsp_load_at_tp2_equals_merged_checkpoint(engines: dict, files: dict) -> None:
    vsp = engines["vsp"]
    # Same tokens, logprobs within rounding of the all-reduce.
    assert_close(vsp["outputs"], engines["merged_tp1"]["outputs"])
    # The edit is visible: the base model answers otherwise.
    assert tokens(vsp["outputs"]) != tokens(engines["base_tp1"]["outputs"])
    delta = files["delta"]
    for rank, reply in enumerate(vsp["active_before"]):
        assert reply["load_format"] == "vsp", rank
        assert [(d["group"], d["sha256"]) for d in reply["deltas"]] == [("tp", delta.sha256)]
        assert reply["unreadable"] == []


def test_hot_patch_to_base_at_tp2_restores_base(engines: dict, files: dict) -> None:
    vsp = engines["vsp"]
    assert [reply["rank"] for reply in vsp["reload_base"]] == list(range(TP))
    assert_shards(vsp["weights_base"], expected_shards(files["model"], TP))
    assert_close(vsp["outputs_base"], engines["base_tp1"]["outputs"])


def test_hot_patch_back_to_delta_at_tp2_equals_load_time_merge(engines: dict, files: dict) -> None:
    vsp = engines["vsp"]
    assert [reply["rank"] for reply in vsp["reload_delta"]] == list(range(TP))
    assert_shards(vsp["weights_delta"], expected_shards(files["merged"], TP))
    assert vsp["outputs_delta"] == vsp["outputs"]  # exactly, as after the load
    for reply in vsp["active_after"]:
        assert [d["sha256"] for d in reply["deltas"]] == [files["delta"].sha256]


# ---------------------------------------------------------------------------------------
# The helper subprocess: `python test_tensor_parallel.py SPEC.json RESULTS.json`
# ---------------------------------------------------------------------------------------


def _shard_digests(worker: Any, modules: list[str]) -> dict[str, Any]:
    """Runs inside each vLLM worker (sent by ``collective_rpc``): digests of the weights its
    MLP and attention-output linear layers compute with. vLLM's CPU backend repacks each
    weight for oneDNN and leaves an empty ``weight`` parameter, so the weight is read back
    through the layer's own GEMM: ``apply(I) = I @ W.T`` gives W's values exactly (each a
    sum of one product by 1)."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    layers = dict(worker.model_runner.get_model().named_modules())
    digests = {}
    for name in modules:
        layer = layers[name]
        eye = torch.eye(layer.input_size_per_partition, dtype=torch.float32)
        with torch.no_grad():  # the local GEMM only: no all-reduce of RowParallelLinear
            digests[name] = digest(layer.quant_method.apply(layer, eye).t())
    return {
        "rank": worker.rank,
        "tp_rank": get_tensor_model_parallel_rank(),
        "tp_size": get_tensor_model_parallel_world_size(),
        "digests": digests,
    }


def _greedy(llm: Any) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP_LOGPROBS)
    results = []
    for request in llm.generate(PROMPTS, params, use_tqdm=False):
        completion = request.outputs[0]
        results.append(
            {
                "token_ids": list(completion.token_ids),
                "top_logprobs": [
                    {str(token): entry.logprob for token, entry in step.items()}
                    for step in completion.logprobs
                ],
            }
        )
    return results


def _run_engines(spec_path: str, result_path: str) -> None:
    from vllm import LLM

    spec = json.loads(Path(spec_path).read_text())
    names = vllm_linear_modules()
    vsp = {"load_format": "vsp", "model_loader_extra_config": {"deltas": [spec["delta"]]}}
    engines = {
        # name: (model, tensor_parallel_size, extra engine arguments)
        "base_tp1": (spec["model"], 1, {}),
        "merged_tp1": (spec["merged"], 1, {}),
        "vsp": (spec["model"], TP, vsp),
    }
    results: dict[str, dict] = {}
    for name, (model, tp, extra) in engines.items():
        started = time.monotonic()
        llm = LLM(
            model=model,
            tensor_parallel_size=tp,
            enforce_eager=True,
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            seed=0,
            **extra,
        )
        item: dict[str, Any] = {"start_s": time.monotonic() - started}
        item["outputs"] = _greedy(llm)
        item["weights"] = llm.collective_rpc(_shard_digests, args=(names,))
        if name == "vsp":
            model_dir, tensors = spec["model"], spec["tensors"]
            item["active_before"] = llm.collective_rpc(ACTIVE_METHOD)
            # What `vsp serve` does for a switch: prepare both sets, reload, reset the cache.
            llm.collective_rpc(PREPARE_METHOD, args=(model_dir, [[spec["delta"], spec["sha256"]]]))
            item["reload_base"] = llm.collective_rpc(RELOAD_METHOD, args=(model_dir, [], tensors))
            assert llm.reset_prefix_cache()
            item["outputs_base"] = _greedy(llm)
            item["weights_base"] = llm.collective_rpc(_shard_digests, args=(names,))
            item["reload_delta"] = llm.collective_rpc(
                RELOAD_METHOD, args=(model_dir, [spec["sha256"]], tensors)
            )
            assert llm.reset_prefix_cache()
            item["outputs_delta"] = _greedy(llm)
            item["weights_delta"] = llm.collective_rpc(_shard_digests, args=(names,))
            item["active_after"] = llm.collective_rpc(ACTIVE_METHOD)
        item["total_s"] = time.monotonic() - started
        results[name] = item
        del llm
        gc.collect()
        print(f"vsp-test: {name} done in {item['total_s']:.1f} s", flush=True)
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM spawns the TP workers: keep the engine work behind this guard
    _run_engines(sys.argv[1], sys.argv[2])
