"""Replies on disk, keyed by the request that produced them, so an interrupted run resumes.

One JSON line per reply, appended and flushed as each arrives: a run killed at any point
loses at most the line being written, and a torn last line is skipped on reading. The key
hashes everything that decides a greedy reply (endpoint or checkpoint, model, messages,
sampling), so a changed setting never reuses a stale reply.

Two users: ``vsp eval`` (every reply of a run, in its output folder) and ``vsp measure``
(only the *base* model's replies, shared by successive measurements of different deltas:
about half of a measurement's generation on the CPU).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # effect.py imports torch; the HTTP harness must not need it
    from vllm_safety_patch.eval.effect import Generator


def request_key(**request: Any) -> str:
    """Stable hash of a request's fields (order-independent, JSON-serialisable values)."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class ReplyCache:
    """``key -> reply text`` backed by an append-only JSONL file (``None``: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.replies: dict[str, str] = {}
        self.loaded = 0
        if path is not None and path.is_file():
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                        self.replies[record["key"]] = record["reply"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by an interrupted write
            self.loaded = len(self.replies)
        self._handle = None

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        if self.path is None:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
            if self._handle.tell() > 0:
                self._handle.write("\n")  # end a torn line so the next record parses
        self._handle.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ReplyCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_identity(model_dir: Path) -> str:
    """Cheap identity of a checkpoint: its path and every file's name, size and mtime (any
    rewrite of the weights changes it)."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def cached_baseline(
    generate: Generator, cache_file: Path, identity: str, engine: str, chunk: int = 256
) -> Generator:
    """``generate`` with base-weight replies read from / appended to ``cache_file``.

    Replies under deltas are always generated. Base replies are generated in chunks, each
    stored as it finishes, so a run killed midway keeps what it produced.
    """

    def cached(delta_paths: Sequence[Path], requests: Sequence[tuple[str, int]]) -> list[str]:
        if delta_paths:
            return generate(delta_paths, requests)
        keys = [
            request_key(checkpoint=identity, engine=engine, prompt=prompt, max_tokens=tokens)
            for prompt, tokens in requests
        ]
        with ReplyCache(cache_file) as store:
            missing = [i for i, key in enumerate(keys) if store.get(key) is None]
            for start in range(0, len(missing), chunk):
                part = missing[start : start + chunk]
                fresh = generate([], [requests[i] for i in part])
                for i, reply in zip(part, fresh, strict=True):
                    store.put(keys[i], reply)
            return [store.replies[key] for key in keys]

    return cached
