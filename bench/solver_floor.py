"""Solver time vs its floor: the plain forward passes over the same prompts and layers.

    .venv/bin/python bench/solver_floor.py                 # tiny random Qwen2 (seconds)
    .venv/bin/python bench/solver_floor.py --model default # the prepared default model
    .venv/bin/python bench/solver_floor.py --model default --pairs 40  # a quarter of the data

Prints both times and their ratio (target: solve <= 1.2x floor). The floor runs the same
batches through the same layers (0..last edited) with no hooks and no solve, once before and
once after the solve (their mean is the floor).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vllm_safety_patch.config import default_model_dir
from vllm_safety_patch.models.tiny import build_tiny_model
from vllm_safety_patch.solver.layerwise import LayerwiseForward, tokenize_chats
from vllm_safety_patch.solver.pipeline import solve
from vllm_safety_patch.solver.prompts import gather_solve_data
from vllm_safety_patch.solver.settings import (
    DataSettings,
    SolveConfig,
    SolverSettings,
    load_solve_config,
)


def floor_seconds(model_dir: Path, config: SolveConfig, languages: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = config.solver
    data = gather_solve_data(languages, config.data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, settings.dtype)
    ).eval()
    started = time.perf_counter()
    for prompts in (data.english, data.others):
        batches = tokenize_chats(
            tokenizer, [p.text for p in prompts], settings.batch_size, settings.max_prompt_tokens
        )
        run = LayerwiseForward(model, batches)
        run.start()
        for _ in range(max(settings.layers) + 1):
            run.run_layer()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'default' or a checkpoint path")
    parser.add_argument("--config", default="deltas/solve.toml")
    parser.add_argument("--group", default="all")
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="use only the first N MultiJail pairs (and N English harmless prompts) of the "
        "config: a shorter run of the same ratio (0 = the whole config)",
    )
    args = parser.parse_args()
    if args.model == "tiny":
        model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen2")
        config = SolveConfig(
            solver=SolverSettings(layers=[0, 1, 2], neurons_per_layer=32, rank=8),
            data=DataSettings(
                multijail_ids=(0, 40),
                english_harmless=40,
                benign_per_language=10,
                mgsm_rows=(0, 10),
            ),
            groups={"all": ["zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]},
        )
    else:
        model_dir = default_model_dir() if args.model == "default" else Path(args.model)
        config = load_solve_config(args.config)
        if args.pairs:
            data = config.data.model_copy(
                update={"multijail_ids": (0, args.pairs), "english_harmless": args.pairs}
            )
            config = config.model_copy(update={"data": data})
    languages = config.groups[args.group]
    # Floor, solve, floor again: background load and warm caches hit both sides alike.
    floors = [floor_seconds(model_dir, config, languages)]
    result = solve(model_dir, config, [args.group], model_dir.name)
    floors.append(floor_seconds(model_dir, config, languages))
    floor = sum(floors) / len(floors)
    timings = result.timings
    print(f"model: {model_dir}; data: {config.data.model_dump()}")
    print(
        f"floor (plain layer-wise forward, same prompts and layers): {floor:.1f} s "
        f"(before {floors[0]:.1f} s, after {floors[1]:.1f} s)"
    )
    print(
        f"solve total: {timings.total_seconds:.1f} s (forward+statistics "
        f"{timings.forward_seconds:.1f} s, linear algebra {timings.solve_seconds:.2f} s)"
    )
    # Like with like: the floor times only the layer forward passes, so the solver's side is
    # its forward passes (with the statistics hooks) plus the linear algebra; loading the
    # data and the model and writing the delta are outside both.
    solver = timings.forward_seconds + timings.solve_seconds
    print(f"ratio solve/floor: {solver / floor:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
