"""On-disk cache of the base model's greedy replies, so measuring deltas one after another
does not regenerate the same baseline (about half of a ``vsp measure`` run on the CPU).

Only replies of the *base* weights are cached, keyed by the checkpoint's identity (every
file's name, size and modification time: cheap, and any rewrite of the weights changes it),
the engine, the prompt and the token budget. Replies under deltas are always generated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vllm_safety_patch.eval.effect import Generator


def checkpoint_identity(model_dir: Path) -> str:
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _key(identity: str, engine: str, prompt: str, max_tokens: int) -> str:
    raw = json.dumps([identity, engine, prompt, max_tokens], ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def cached_baseline(
    generate: Generator, cache_file: Path, identity: str, engine: str, chunk: int = 256
):
    """``generate`` with base-weight replies read from / added to ``cache_file`` (JSON)."""

    def load() -> dict[str, str]:
        try:
            return json.loads(cache_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}  # a damaged cache is only lost time: start again

    def cached(delta_paths: Sequence[Path], requests: Sequence[tuple[str, int]]) -> list[str]:
        if delta_paths:
            return generate(delta_paths, requests)
        store = load()
        keys = [_key(identity, engine, prompt, tokens) for prompt, tokens in requests]
        missing = [i for i, key in enumerate(keys) if key not in store]
        # In chunks, each saved when done: a run killed midway keeps what it generated.
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            fresh = generate([], [requests[i] for i in part])
            store.update({keys[i]: reply for i, reply in zip(part, fresh, strict=True)})
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            staging = cache_file.with_suffix(".tmp")
            staging.write_text(json.dumps(store, ensure_ascii=False))
            os.replace(staging, cache_file)  # atomic: an interrupted write leaves the old cache
        return [store[key] for key in keys]

    return cached
