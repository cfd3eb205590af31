"""The base-model reply cache of ``vsp measure``: base replies are reused, delta replies never."""

from __future__ import annotations

from pathlib import Path

from vllm_safety_patch.eval.cache import cached_baseline, checkpoint_identity


def test_base_replies_are_cached_and_delta_replies_are_not(tmp_path: Path) -> None:
    calls: list[tuple[list[Path], list[tuple[str, int]]]] = []

    def generate(delta_paths, requests):
        calls.append((list(delta_paths), list(requests)))
        return [f"{len(delta_paths)}:{prompt}:{tokens}" for prompt, tokens in requests]

    cache = tmp_path / "cache.jsonl"
    first = cached_baseline(generate, cache, "model-a", "vllm")
    assert first([], [("a", 8), ("b", 8)]) == ["0:a:8", "0:b:8"]
    # A second run (new process, same file) generates only what is new.
    second = cached_baseline(generate, cache, "model-a", "vllm")
    assert second([], [("b", 8), ("c", 8), ("a", 8)]) == ["0:b:8", "0:c:8", "0:a:8"]
    assert calls[-1] == ([], [("c", 8)])
    # Another budget, another model or deltas: generated again.
    assert second([], [("a", 16)]) == ["0:a:16"]
    assert cached_baseline(generate, cache, "model-b", "vllm")([], [("a", 8)]) == ["0:a:8"]
    assert calls[-1] == ([], [("a", 8)])
    assert second([Path("d.safetensors")], [("a", 8)]) == ["1:a:8"]
    assert len(calls) == 5


def test_torn_lines_are_skipped(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    cache.write_text("{not json")  # a line torn by a killed run
    generate = cached_baseline(lambda d, r: ["x"] * len(r), cache, "m", "vllm")
    assert generate([], [("a", 8)]) == ["x"]
    again = cached_baseline(lambda d, r: ["new"] * len(r), cache, "m", "vllm")
    assert again([], [("a", 8)]) == ["x"]


def test_identity_changes_when_a_file_changes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = checkpoint_identity(tmp_path)
    assert checkpoint_identity(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert checkpoint_identity(tmp_path) != before


def test_chunks_are_saved_as_they_finish(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"

    def dies_on_the_second_chunk(delta_paths, requests):
        if requests[0][0] == "c":
            raise RuntimeError("engine died")
        return [prompt for prompt, _ in requests]

    generate = cached_baseline(dies_on_the_second_chunk, cache, "m", "vllm", chunk=2)
    try:
        generate([], [("a", 8), ("b", 8), ("c", 8)])
    except RuntimeError:
        pass
    again = cached_baseline(lambda d, r: ["new"] * len(r), cache, "m", "vllm", chunk=2)
    assert again([], [("a", 8), ("b", 8), ("c", 8)]) == ["a", "b", "new"]
