"""Switching the served delta set on a live engine.

Order, so that a refusal never changes what is served:

1. names -> files in the delta folder (400 for a path-like name, 404 for an unknown one);
2. read + verify every new delta against the served checkpoint, refuse duplicates (422);
3. every worker reads and checks both the old and the new set (nothing touched yet);
4. close the gate and drain in-flight requests (409 if they do not finish in time);
5. pause the scheduler, reload on every worker every tensor the old or the new set touches
   (base from disk + new edits), reset the prefix cache, resume, open the gate.

If a worker fails in step 5, every worker reloads the old set (its deltas are cached in the
workers since step 3); only if that fails too is the server marked degraded and inference
refused (503), rather than serving weights nobody can name.

A switch that was attempted and did not happen (drain or pause timed out, a worker refused
or failed) counts in ``vsp_hotpatch_failures_total{reason}``; a refused request (bad name,
no token) does not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.delta.merge import check_distinct
from vllm_safety_patch.errors import DeltaFormatError, DeltaMismatchError, VSPError
from vllm_safety_patch.server import metrics
from vllm_safety_patch.server.errors import SafetyAPIError
from vllm_safety_patch.server.gate import DrainTimeoutError
from vllm_safety_patch.server.protocol import ActivateResponse, SwitchRecord
from vllm_safety_patch.server.state import (
    DRAIN_TIMEOUT_VAR,
    ActiveEntry,
    SafetyState,
    check_name,
    header_value,
)
from vllm_safety_patch.vllm_plugin.worker_extension import PREPARE_METHOD, RELOAD_METHOD

logger = logging.getLogger(f"vllm.{__name__}")

RPC_TIMEOUT_S = 600.0
_metric: Any = None


def _observe(seconds: float, outcome: str) -> None:
    """Prometheus histogram on the API server's /metrics (collectors made here show up)."""
    global _metric
    try:
        if _metric is None:
            from prometheus_client import Histogram

            _metric = Histogram(
                "vsp_hotpatch_seconds",
                "Duration of safety delta switches (POST /v1/safety/deltas/activate)",
                ["outcome"],
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            )
        _metric.labels(outcome).observe(seconds)
    except (ImportError, ValueError):  # no client, or registered twice: the log has it
        pass


def resolve(state: SafetyState, names: list[Any]) -> list[Path]:
    """Names -> files of the delta folder, refusing anything else (400/404)."""
    paths = []
    for name in names:
        try:
            check_name(name)
        except ValueError as error:
            raise SafetyAPIError(
                400,
                str(error),
                "pass names of files in the server's delta folder (see GET /v1/safety/deltas),"
                " never paths",
                "invalid_name",
            ) from None
        path = state.delta_path(name)
        if not state.inside_folder(path):  # checked first: nothing outside is even looked at
            raise SafetyAPIError(
                422,
                f"'{name}' is a link to a file outside the server's delta folder; refused",
                "copy the delta file into the delta folder (links may only point inside it)",
                "outside_folder",
            )
        if not path.is_file():
            known = ", ".join(state.available_names()) or "none"
            raise SafetyAPIError(
                404,
                f"no delta named '{name}' in the server's delta folder",
                f"use one of: {known}; or add {name}.safetensors to the delta folder "
                "(vsp solve --out)",
                "unknown_delta",
            )
        paths.append(path)
    return paths


def read_and_verify(state: SafetyState, paths: list[Path]) -> list[Delta]:
    """Blocking (reads files, hashes base tensors): run it in a thread."""
    try:
        deltas = [state.read_recorded(path) for path in paths]
        check_distinct(deltas)
        state.verify(deltas)
    except DeltaFormatError as error:
        raise SafetyAPIError.from_vsp(422, error, "invalid_delta") from None
    except DeltaMismatchError as error:
        raise SafetyAPIError.from_vsp(422, error, "delta_mismatch") from None
    except VSPError as error:  # check_distinct: the same file or group twice
        raise SafetyAPIError.from_vsp(422, error, "duplicate_delta") from None
    return sorted(deltas, key=lambda delta: (delta.group, delta.sha256))


async def _rpc(state: SafetyState, method: str, *args: Any) -> list[Any]:
    assert state.engine is not None
    return await state.engine.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args)


async def _reload(state: SafetyState, entries: list[ActiveEntry], tensors: list[str]) -> list:
    results = await _rpc(
        state, RELOAD_METHOD, str(state.model_dir), [entry.sha256 for entry in entries], tensors
    )
    # Cached prefixes hold KV computed with the old weights: a hit would mix the two sets.
    assert state.engine is not None
    if not await state.engine.reset_prefix_cache():
        raise RuntimeError("the engine refused to reset its prefix cache")
    return results


async def _pause(state: SafetyState) -> bool:
    """Pause the scheduler (the gate has drained HTTP requests already; this also holds
    anything that reached the engine another way). False if the engine cannot pause."""
    engine = state.engine
    pause = getattr(engine, "pause_generation", None)
    if engine is None or pause is None:
        return False
    try:
        await asyncio.wait_for(pause(mode="wait", clear_cache=False), state.drain_timeout_s)
    except TimeoutError:
        # The scheduler may be paused already (only the wait was cut short): undo it.
        await engine.resume_generation()
        raise SafetyAPIError(
            409,
            f"the engine still had requests running after {state.drain_timeout_s:g} s "
            "(requests that did not come through this API server); nothing was switched",
            f"retry when the engine is idle, or raise {DRAIN_TIMEOUT_VAR}",
            "busy",
            failure="engine_busy",
        ) from None
    return True


async def activate(state: SafetyState, names: list[Any]) -> ActivateResponse:
    """Switch to ``names``; see the module docstring for the order of the steps."""
    # Shielded: a client that hangs up mid-switch must not cancel it half-way (weights
    # reloaded but not recorded, scheduler left paused); the switch finishes either way.
    return await asyncio.shield(asyncio.ensure_future(_counted(state, names)))


async def _counted(state: SafetyState, names: list[Any]) -> ActivateResponse:
    """:func:`_activate`, counting a switch that failed (here, so a client that hung up
    does not hide it) in ``vsp_hotpatch_failures_total`` with its reason."""
    try:
        return await _activate(state, names)
    except SafetyAPIError as error:
        if error.failure is not None:
            metrics.hotpatch_failed(error.failure)
        raise
    except Exception:
        metrics.hotpatch_failed("error")
        raise


async def _activate(state: SafetyState, names: list[Any]) -> ActivateResponse:
    if state.engine is None or state.hot_patch_problem is not None:
        raise SafetyAPIError(
            409,
            f"hot patching is unavailable on this server: {state.hot_patch_problem or 'no engine'}",
            "restart with 'vsp serve --deltas ...' to change the deltas",
            "unavailable",
        )
    if state.degraded is not None:
        raise SafetyAPIError(
            503, f"the server is degraded: {state.degraded}", "restart the server", "degraded"
        )
    paths = resolve(state, names)
    async with state.switch_lock:
        started = time.monotonic()
        deltas = await asyncio.to_thread(read_and_verify, state, paths)
        # read_delta records the path it read as the source: the file the workers will read.
        new = [ActiveEntry.of(delta, Path(delta.source), state.delta_dir) for delta in deltas]
        old = list(state.active)
        if sorted(entry.sha256 for entry in new) == sorted(entry.sha256 for entry in old):
            state.active = new  # same bytes; the names may be new
            return ActivateResponse(
                changed=False, active=[e.public() for e in new], header=state.header()
            )
        tensors = sorted(set().union(*(entry.tensors for entry in old + new)))
        try:
            await _rpc(
                state,
                PREPARE_METHOD,
                str(state.model_dir),
                [[entry.path, entry.sha256] for entry in old + new],
            )
        except Exception as error:  # nothing touched yet: refuse, serve on unchanged
            raise SafetyAPIError(
                422,
                f"a worker could not read or check the deltas: {_short(error)}",
                "make the delta files readable on every node and do not rewrite them while "
                "switching; then activate again",
                "worker_refused",
                failure="worker_refused",
            ) from None
        verify_seconds = time.monotonic() - started
        try:
            async with state.gate.switch(state.drain_timeout_s) as drain_seconds:
                reload_started = time.monotonic()
                paused = await _pause(state)
                try:
                    try:
                        results = await _reload(state, new, tensors)
                    except Exception as error:
                        await _restore(state, old, tensors, error)
                        raise  # _restore always raises; kept for type checkers
                    state.active = new
                finally:
                    if paused:
                        assert state.engine is not None
                        await state.engine.resume_generation()
                reload_seconds = time.monotonic() - reload_started
        except DrainTimeoutError as error:
            _observe(time.monotonic() - started, "drain_timeout")
            raise SafetyAPIError(
                409,
                f"{error.in_flight} requests were still running after {error.timeout:g} s; "
                "nothing was switched",
                f"retry when fewer long requests run, or raise {DRAIN_TIMEOUT_VAR}",
                "busy",
                failure="drain_timeout",
            ) from None
        record = SwitchRecord(
            from_deltas=[entry.label() for entry in old],
            to_deltas=[entry.label() for entry in new],
            tensors=max((result.get("tensors", 0) for result in results), default=0),
            verify_seconds=round(verify_seconds, 4),
            drain_seconds=round(drain_seconds, 4),
            reload_seconds=round(reload_seconds, 4),
            total_seconds=round(time.monotonic() - started, 4),
            finished_at=time.time(),
        )
        state.last_switch = record
        _observe(record.total_seconds, "ok")
        logger.info(
            "vsp: switched deltas %s -> %s: %d tensors, verify %.3f s, drain %.3f s, "
            "reload %.3f s, total %.3f s",
            header_value(old),
            header_value(new),
            record.tensors,
            record.verify_seconds,
            record.drain_seconds,
            record.reload_seconds,
            record.total_seconds,
        )
        return ActivateResponse(
            changed=True, active=[e.public() for e in new], header=state.header(), switch=record
        )


async def _restore(
    state: SafetyState, old: list[ActiveEntry], tensors: list[str], cause: Exception
) -> None:
    """Put the old set back on every worker, then raise the error for the client."""
    logger.error("vsp: switch failed, restoring %s: %s", header_value(old), cause)
    _observe(0.0, "failed")
    try:
        await _reload(state, old, tensors)
    except Exception as second:
        state.degraded = f"switch failed ({_short(cause)}) and restoring failed ({_short(second)})"
        logger.critical("vsp: %s; refusing inference until restarted", state.degraded)
        raise SafetyAPIError(
            500,
            f"switching failed and the previous set could not be restored: {state.degraded}",
            "restart the server; inference is refused until then",
            "degraded",
            failure="restore_failed",
        ) from None
    raise SafetyAPIError(
        500,
        f"switching failed on a worker ({_short(cause)}); the previous set "
        f"{header_value(old)} was restored and is served unchanged",
        "see the server log for the worker's traceback; check the checkpoint and delta files",
        "switch_failed",
        failure="switch_failed",
    )


def _short(error: BaseException, limit: int = 400) -> str:
    """One line: vLLM appends tracebacks to worker errors."""
    text = " ".join(str(error).split()) or error.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
