"""Worker side of the hot patch: methods the API server calls by name through collective_rpc.

:func:`register_worker_extension` (called from the general plugin's ``register()``) adds the
methods of :class:`DeltaWorkerExtension` to vLLM's ``WorkerBase``, so every worker class (GPU,
CPU, ...) has them. Tensors cannot travel through ``collective_rpc`` (msgpack turns them into
lists), so the calls carry strings only: delta file paths, their sha256, the model folder and
tensor names. Each worker reads the files itself, checks each file's sha256 against the one
the API server verified (a file swapped in between is refused), and rebuilds every touched
weight as *base tensor from the checkpoint on disk + the new set's edits* through the one
merge (:func:`~vllm_safety_patch.delta.merge.edit_weight`), so the bytes equal a fresh load.

Nothing here imports vLLM at module import time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from vllm_safety_patch.delta.io import Delta, read_delta
from vllm_safety_patch.delta.merge import check_distinct, edit_weight, edits_by_tensor
from vllm_safety_patch.delta.verify import verify_against_checkpoint
from vllm_safety_patch.errors import DeltaFormatError, DeltaMismatchError, VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import short
from vllm_safety_patch.settings import same_path

ACTIVE_METHOD = "vsp_active_deltas"
PREPARE_METHOD = "vsp_prepare_deltas"
RELOAD_METHOD = "vsp_reload_deltas"
METHODS = (ACTIVE_METHOD, PREPARE_METHOD, RELOAD_METHOD)

logger = logging.getLogger(f"vllm.{__name__}")

# vLLM's in-place reload logs a warning for every layer it was not given and lists every
# parameter not reloaded: hundreds of lines per switch for a partial reload, which is what we
# do on purpose. Silenced for the duration of our call only.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)

# Per worker process: deltas read and checked, by sha256, so that the set being replaced can
# always be restored even if its file has changed on disk since (it is read at start-up).
_deltas: dict[str, Delta] = {}
# (sha256, model dir) pairs whose fingerprint matched this worker's checkpoint.
_verified: set[tuple[str, str]] = set()
# sha256 of the set this worker serves after a switch; None until the first switch.
_active: list[str] | None = None


def _read_checked(path: str, sha256: str) -> Delta:
    cached = _deltas.get(sha256)
    if cached is not None:
        return cached
    delta = read_delta(path)
    if delta.sha256 != sha256:
        raise DeltaFormatError(
            f"{path}: the file changed after the API server checked it "
            f"(sha256 {short(delta.sha256)}, expected {short(sha256)})",
            "do not rewrite delta files in place while switching; activate again",
        )
    _deltas[sha256] = delta
    return delta


def reload_names(
    edited: Sequence[str], checkpoint_names: Sequence[str], packed: Mapping[str, Sequence[str]]
) -> list[str]:
    """Every checkpoint tensor of every vLLM module an edited tensor lands in.

    vLLM fuses some HF modules (``gate_proj`` + ``up_proj`` -> ``gate_up_proj``, q/k/v ->
    ``qkv_proj``) and its in-place reload rebuilds a fused module only from *all* its parts:
    given ``up_proj`` alone it would keep uninitialised memory for the ``gate_proj`` half.
    So the siblings named in the model's ``packed_modules_mapping`` come along (weights and
    biases), reloaded unchanged from the checkpoint.
    """
    modules: set[str] = set()
    for name in edited:
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        siblings = next((parts for parts in packed.values() if leaf in parts), [leaf])
        modules.update(f"{parent}.{sibling}" if parent else sibling for sibling in siblings)
    return sorted(name for name in checkpoint_names if name.rpartition(".")[0] in modules)


@contextmanager
def _quiet_reload_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


class DeltaWorkerExtension:
    """Methods added to vLLM's worker class; ``self`` is the worker.

    Also usable as ``--worker-extension-cls`` on an engine whose general plugins do not
    install it (vLLM refuses the class when the methods are already there: use one way).
    """

    vllm_config: Any
    model_runner: Any
    rank: int

    def vsp_active_deltas(self) -> dict[str, Any]:
        """What this worker serves: the load-time deltas (or the last switch's set)."""
        from vllm_safety_patch.vllm_plugin.loader import (
            LOAD_FORMAT,
            applied_deltas,
            delta_paths_from_config,
        )

        load_config = self.vllm_config.load_config
        model = str(self.vllm_config.model_config.model)
        entries: list[dict[str, str]] = []
        if _active is not None:
            for sha in _active:
                delta = _deltas[sha]
                entries.append(
                    {
                        "group": delta.group,
                        "sha256": sha,
                        "fingerprint": delta.manifest.base_model.fingerprint,
                        "path": delta.source,
                    }
                )
            return {"model": model, "load_format": LOAD_FORMAT, "deltas": entries}
        if load_config.load_format == LOAD_FORMAT:
            applied = {item.sha256: item for item in applied_deltas()}
            paths, _ = delta_paths_from_config(load_config.model_loader_extra_config or {})
            for path in paths:
                try:
                    delta = read_delta(path)
                except VSPError:
                    continue  # changed or gone since the load: the API server reports it
                if delta.sha256 in applied:
                    # Cached now, so the start-up set stays restorable whatever the disk does.
                    _deltas.setdefault(delta.sha256, delta)
                    entries.append(
                        {
                            "group": delta.group,
                            "sha256": delta.sha256,
                            "fingerprint": delta.manifest.base_model.fingerprint,
                            "path": str(path),
                        }
                    )
            found = {entry["sha256"] for entry in entries}
            missing = [item.group for sha, item in applied.items() if sha not in found]
            return {
                "model": model,
                "load_format": str(load_config.load_format),
                "deltas": entries,
                "unreadable": missing,
            }
        return {"model": model, "load_format": str(load_config.load_format), "deltas": []}

    def vsp_prepare_deltas(self, model_dir: str, entries: list[list[str]]) -> dict[str, Any]:
        """Read and check (sha256, architecture, fingerprint) every delta of both sets.

        Touches no weight. Called for the set being replaced too, so that restoring it after
        a failure cannot fail for want of its file.
        """
        started = time.perf_counter()
        self._vsp_check_model_dir(model_dir)
        deltas = [_read_checked(path, sha) for path, sha in entries]
        unverified = [delta for delta in deltas if (delta.sha256, model_dir) not in _verified]
        if unverified:
            verify_against_checkpoint(unverified, Checkpoint(model_dir))
            _verified.update((delta.sha256, model_dir) for delta in unverified)
        return {"rank": self.rank, "seconds": time.perf_counter() - started}

    def vsp_reload_deltas(
        self, model_dir: str, shas: list[str], tensor_names: list[str]
    ) -> dict[str, Any]:
        """Reload ``tensor_names`` (and their fused siblings) as base + the edits of ``shas``.

        Every delta must have gone through :meth:`vsp_prepare_deltas` first. Tensors the new
        set does not edit come back as the checkpoint's bytes, so switching from A to B
        undoes A exactly and applies B exactly.
        """
        global _active
        started = time.perf_counter()
        self._vsp_check_model_dir(model_dir)
        missing = [short(sha) for sha in shas if sha not in _deltas]
        if missing:
            raise DeltaMismatchError(
                f"worker {self.rank}: deltas {missing} were not prepared",
                "call vsp_prepare_deltas before vsp_reload_deltas (a vsp server bug)",
            )
        deltas = [_deltas[sha] for sha in shas]
        check_distinct(deltas)
        grouped = edits_by_tensor(deltas)
        unknown = sorted(set(grouped) - set(tensor_names))
        if unknown:
            raise DeltaMismatchError(
                f"worker {self.rank}: the new set edits {unknown[0]}, not in the reload list",
                "pass every tensor of the old and new sets (a vsp server bug)",
            )
        checkpoint = Checkpoint(model_dir)
        packed = getattr(self.model_runner.get_model(), "packed_modules_mapping", None) or {}
        names = reload_names(tensor_names, checkpoint.tensor_names(), packed)
        absent = sorted(set(tensor_names) - set(names))
        if absent:
            raise DeltaMismatchError(
                f"worker {self.rank}: the checkpoint {model_dir} has no tensor '{absent[0]}'",
                "serve the checkpoint the deltas were verified against",
            )

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            # Lazily, one tensor at a time: never the whole set in memory at once.
            for name in names:
                base = checkpoint.get(name)
                edits = grouped.get(name)
                yield name, edit_weight(base, edits) if edits else base

        with _quiet_reload_logs():
            # The worker's own in-place reload (vllm/v1/worker/gpu_worker.py): it fuses and
            # shards the HF-named tensors exactly as at load time.
            self.reload_weights(  # type: ignore[attr-defined]
                weights_iterator=weights(), is_checkpoint_format=True
            )
        _active = list(shas)
        seconds = time.perf_counter() - started
        logger.info(
            "vsp: worker %d reloaded %d tensors (%d edited) for deltas [%s] in %.3f s",
            self.rank,
            len(names),
            len(grouped),
            ", ".join(delta.group for delta in deltas) or "none: base weights",
            seconds,
        )
        return {"rank": self.rank, "tensors": len(names), "seconds": seconds}

    def _vsp_check_model_dir(self, model_dir: str) -> None:
        served = str(self.vllm_config.model_config.model)
        if not same_path(served, model_dir):
            raise DeltaMismatchError(
                f"worker {self.rank} serves '{served}', the switch names '{model_dir}'",
                "hot-patch the checkpoint the server was started with",
            )


def register_worker_extension() -> None:
    """Add the ``vsp_*`` methods to vLLM's WorkerBase. Idempotent; cheap in every process."""
    from vllm.v1.worker.worker_base import WorkerBase

    for name in (*METHODS, "_vsp_check_model_dir"):
        if getattr(WorkerBase, name, None) is not getattr(DeltaWorkerExtension, name):
            setattr(WorkerBase, name, getattr(DeltaWorkerExtension, name))
