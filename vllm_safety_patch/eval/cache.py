"""Replies on disk, keyed by the request that produced them, so an interrupted run resumes.

One JSON line per reply, appended and flushed as each arrives: a run killed at any point
loses at most the line being written, and a torn last line is skipped on reading. The key
hashes everything that decides a greedy reply (endpoint, model, messages, sampling), so a
changed setting never reuses a stale reply.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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
