"""Greedy chat generation with vLLM's offline engine, one engine per weight set.

Used by ``vsp measure``: vLLM's continuous batching is several times faster than
transformers' padded ``generate`` on CPU, and ``--load-format vsp`` makes the engine serve
exactly the weights ``vsp serve`` would. Each weight set runs in its own subprocess
(``python -m vllm_safety_patch.eval.vllm_offline``) so engines never share a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vllm_safety_patch.settings import CPU_KV_CACHE_GIB


def _cpu_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def generate_with_vllm(
    model_dir: Path,
    delta_paths: Sequence[Path],
    requests: Sequence[tuple[str, int]],
    max_model_len: int | None = None,
) -> list[str]:
    """Greedy replies to ``(prompt, max_tokens)`` chats under base + ``delta_paths``."""
    with tempfile.TemporaryDirectory(prefix="vsp-gen-") as folder:
        job = Path(folder) / "job.json"
        out = Path(folder) / "replies.json"
        job.write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "deltas": [str(Path(p).resolve()) for p in delta_paths],
                    "requests": list(requests),
                    "max_model_len": max_model_len,
                }
            )
        )
        command = [sys.executable, "-m", "vllm_safety_patch.eval.vllm_offline", str(job), str(out)]
        result = subprocess.run(command, env=_cpu_environment(), capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"vLLM generation failed (exit {result.returncode}):\n{tail}")
        return json.loads(out.read_text())


def _main(job_file: str, out_file: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_file).read_text())
    engine = LLM(
        model=job["model"],
        load_format="vsp",
        model_loader_extra_config={"deltas": job["deltas"]},
        dtype="float32",
        enforce_eager=True,
        max_model_len=job["max_model_len"],  # None: the model's own limit
        seed=0,
    )
    conversations = [[{"role": "user", "content": text}] for text, _ in job["requests"]]
    params = [SamplingParams(temperature=0.0, max_tokens=tokens) for _, tokens in job["requests"]]
    outputs = engine.chat(conversations, params, use_tqdm=True)
    Path(out_file).write_text(json.dumps([output.outputs[0].text for output in outputs]))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
