"""A folder of per-layer solve statistics, so that options differing only in how the update is
solved (rank, benign and decision weights, ridge, constraint) skip the forward passes.

A solve spends nearly all its time collecting statistics (36 minutes of forward passes
against 7 s of solving for one layer at 1,024 neurons), and most options a developer tries
change only the solve. Each entry is one layer's per-language tables (``PairTables``) and
its safety neurons, keyed by everything that decides them: the checkpoint's bytes, the data
and its digests, the pass's languages, and every solver setting except the solve-only ones,
which count too for a layer that earlier updates moved (sequential, not the first edited
layer). Only the output and attention edits use it (the input edit collects differently).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_safety_patch.solver.statistics import Gram, PairTables, Regression

# Settings that only the closed-form solve reads: changing them leaves the statistics alone.
SOLVE_ONLY = (
    "rank",
    "constraint",
    "benign_weight",
    "ridge",
    "null_space_energy",
    "decision_weight",
    "decision_weights",
    "decision_balance",
    "benign_alignment",
    "unpaired_languages",
    "language_shift_removed",
    "language_shifts",
    "target_scale",
    "refusal_push",  # its scale: the verdict sums it scales have their own entry
)
_TABLES = ("pair", "aligned", "decision", "decision_twinned")


def checkpoint_digest(model_dir: Path) -> str:
    """sha256 over every file of the checkpoint, names and bytes (a second or two)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()


def decisions_key(*, checkpoint: str, record: dict[str, Any]) -> str:
    """The key of a pass's refusal-push verdict sums (``record``: what decides them)."""
    text = json.dumps(
        {"kind": "decisions", "version": 1, "checkpoint": checkpoint, **record},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def layer_key(
    *,
    checkpoint: str,
    solver: dict[str, Any],
    data: dict[str, Any],
    digests: dict[str, str],
    languages: list[str],
    layer: int,
) -> str:
    """The key of one layer's statistics in one pass (``solver``, ``data``: model_dump)."""
    edited = sorted(solver["layers"])
    moved = solver.get("sequential") and layer != edited[0]
    collection = {
        k: v for k, v in solver.items() if k != "layers" and (moved or k not in SOLVE_ONLY)
    }
    record = {
        "version": 2,  # 2: regressions carry per-position sums
        "checkpoint": checkpoint,
        "solver": collection,
        "earlier_layers": [number for number in edited if number < layer],
        "layer": layer,
        "data": data,
        "digests": digests,
        "languages": sorted(languages),
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CachedTables(PairTables):
    """One layer's tables read back from the cache."""

    pair: dict[str, Regression]
    aligned: dict[str, Regression]
    decision: dict[str, Gram]
    decision_twinned: dict[str, Gram]
    benign_gram: torch.Tensor | None
    benign_tokens: int


class StatsCache:
    """``folder/<key>.pt``: written once per layer, read by a later solve with the same key."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, tables: PairTables, neurons: torch.Tensor) -> None:
        entry: dict[str, Any] = {
            "neurons": neurons.clone(),
            "benign_gram": tables.benign_gram,
            "benign_tokens": int(tables.benign_tokens),
        }
        for name in _TABLES:
            entry[name] = {lang: _dump(value) for lang, value in getattr(tables, name).items()}
        self.save_entry(key, entry)  # a killed solve leaves no half entry under the key

    def save_entry(self, key: str, entry: dict[str, Any]) -> None:
        """Any other per-pass record (the refusal push's verdict sums), written atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.path(key).with_suffix(".partial")
        torch.save(entry, partial)
        partial.replace(self.path(key))

    def load_entry(self, key: str) -> dict[str, Any]:
        return torch.load(self.path(key), weights_only=True)

    def load(self, key: str) -> tuple[CachedTables, torch.Tensor]:
        entry = torch.load(self.path(key), weights_only=True)
        tables = {name: {lang: _read(v) for lang, v in entry[name].items()} for name in _TABLES}
        cached = CachedTables(
            benign_gram=entry["benign_gram"], benign_tokens=int(entry["benign_tokens"]), **tables
        )
        return cached, entry["neurons"]


def _dump(value: Gram | Regression) -> dict[str, Any]:
    if isinstance(value, Gram):
        return {"kind": "gram", "gram": value.gram, "count": value.count}
    return {
        "kind": "regression",
        "gram": value.gram,
        "cross": value.cross,
        "x_sum": value.x_sum,
        "t_sum": value.t_sum,
        "count": value.count,
    }


def _read(entry: dict[str, Any]) -> Gram | Regression:
    if entry["kind"] == "gram":
        gram = Gram(entry["gram"].shape[0])
        gram.gram, gram.count = entry["gram"], int(entry["count"])
        return gram
    regression = Regression()
    regression.gram, regression.cross = entry["gram"], entry["cross"]
    regression.x_sum, regression.t_sum = entry["x_sum"], entry["t_sum"]
    regression.count = int(entry["count"])
    return regression
