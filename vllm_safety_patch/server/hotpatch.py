"""Switching the served delta set on a live engine.

Order, so that a refusal never changes what is served:

1. names -> files in the delta folder (400 for a path-like name, 404 for an unknown one);
2. read + verify every new delta against the served checkpoint, refuse duplicates (422);
3. every worker reads and checks both the old and the new set (nothing touched yet);
4. close the gate and drain in-flight requests (409 if they do not finish in time);
5. pause the scheduler, reload on every worker every tensor the old or the new set touches
   (base from disk + new edits), reset the prefix cache, resume;
6. the canary (``canary.py``) probes the new weights through the engine, the gate still
   closed; if it fails, or the request is a dry run, every worker reloads the old set
   (probes still running are aborted). ``VSP_CANARY_TIMEOUT_S`` bounds this whole step,
   restore included: the probes must end early enough to leave room for it;
7. record the set (unless it was a dry run or failed), open the gate.

On a server started with LoRA support (``--enable-lora``, a ``--max-lora-rank`` that fits,
``--max-loras`` at least the served adapters + 2: ``lora.slot_problem``; slow on CPU, see
the README),
the canary runs between steps 3 and 4 instead, without closing the gate: the candidate is
loaded into the engine as a LoRA adapter equal to the new set minus the merged one
(``lora.write_candidate_adapter``), the probes ask for it, and user requests keep running on
the merged set meanwhile. Only a set that passed goes on to steps 4-7 (the gate then holds
traffic for the drain and the reload alone); a dry run or a failed canary never closes the
gate and has nothing to restore. The adapter is unloaded after the probes, whatever they said.

If a worker fails in step 5, every worker reloads the old set (its deltas are cached in the
workers since step 3); only if that fails too is the server marked degraded and inference
refused (503), rather than serving weights nobody can name. ``check`` runs steps 1-3 only.

A switch that was attempted and did not happen (drain or pause timed out, a worker refused
or failed, the canary refused the set, the server shut down under it) counts in
``vsp_hotpatch_failures_total{reason}``; a refused request (bad name, no token) does not.
A switch in flight when the server begins shutting down (SIGTERM) is answered 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_safety_patch import settings
from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.delta.merge import check_distinct
from vllm_safety_patch.errors import DeltaFormatError, DeltaMismatchError, VSPError
from vllm_safety_patch.server import canary, metrics
from vllm_safety_patch.server.canary_baseline import Baseline
from vllm_safety_patch.server.errors import SafetyAPIError
from vllm_safety_patch.server.gate import DrainTimeoutError
from vllm_safety_patch.server.lora import (
    candidate_rank,
    labels_from_env,
    slot_problem,
    write_candidate_adapter,
)
from vllm_safety_patch.server.protocol import (
    ActivateRequest,
    ActivateResponse,
    CanaryOptions,
    CanaryReport,
    CheckResponse,
    SwitchRecord,
)
from vllm_safety_patch.server.state import ActiveEntry, SafetyState, check_name, header_value
from vllm_safety_patch.vllm_plugin.worker_extension import PREPARE_METHOD, RELOAD_METHOD

logger = logging.getLogger(f"vllm.{__name__}")

RPC_TIMEOUT_S = 600.0
# Kept out of the canary's timeout for the restore after it: the abort of its probes (the
# engine finishes its current step first) and a reload as long as the one just done, twice.
RESTORE_MARGIN_S = 1.0
# The canary's candidate adapters: ids far above those of `vsp serve --lora` (1, 2, ...).
_CANARY_LORA_IDS = itertools.count(1 << 30)


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


async def _pause(state: SafetyState, mode: str = "wait") -> bool:
    """Pause the scheduler (the gate has drained HTTP requests already; this also holds
    anything that reached the engine another way; ``abort`` ends it instead: after the
    canary, what runs is its own probes). False if the engine cannot pause."""
    engine = state.engine
    pause = getattr(engine, "pause_generation", None)
    if engine is None or pause is None:
        return False
    try:
        await asyncio.wait_for(pause(mode=mode, clear_cache=False), state.drain_timeout_s)
    except TimeoutError:
        # The scheduler may be paused already (only the wait was cut short): undo it.
        await engine.resume_generation()
        raise SafetyAPIError(
            409,
            f"the engine still had requests running after {state.drain_timeout_s:g} s "
            "(requests that did not come through this API server); nothing was switched",
            f"retry when the engine is idle, or raise {settings.SWITCH_DRAIN_TIMEOUT_S.name}",
            "busy",
            failure="engine_busy",
        ) from None
    return True


async def activate(state: SafetyState, request: ActivateRequest | list[Any]) -> ActivateResponse:
    """Switch to the requested set; see the module docstring for the order of the steps."""
    if not isinstance(request, ActivateRequest):
        request = ActivateRequest(deltas=list(request))
    if state.shutting_down.is_set():
        raise _shutdown_error(state, None)
    # Not cancelled with the route: a client that hangs up mid-switch must not cancel it
    # half-way (weights reloaded but not recorded, scheduler left paused); it finishes.
    once = _CountOnce(request.dry_run)
    task = asyncio.ensure_future(_counted(state, request, once))
    task.add_done_callback(_retrieve)
    stop = asyncio.ensure_future(state.shutting_down.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task in done:
        return task.result()
    # SIGTERM: vLLM is stopping the engine under the switch. Answer now, and clearly.
    error = _shutdown_error(state, request.deltas)
    once.count(error.failure)
    raise error


class _CountOnce:
    """One failed switch is counted once, by whichever answers first: the route (shutdown)
    or the switch itself (which may still fail after its client was answered). A dry run
    is a preview, never a failed switch: it counts only if it left the server degraded."""

    def __init__(self, dry_run: bool = False) -> None:
        self.done = False
        self.dry_run = dry_run

    def count(self, reason: str | None) -> None:
        if self.dry_run and reason != "restore_failed":
            return
        if reason is not None and not self.done:
            self.done = True
            metrics.hotpatch_failed(reason)


def _retrieve(task: asyncio.Future) -> None:
    """Read a finished switch's exception (it may end after its client was answered)."""
    if not task.cancelled():
        task.exception()


def _shutdown_error(state: SafetyState, names: list[str] | None) -> SafetyAPIError:
    what = (
        f"the switch to {names or 'base weights'} was interrupted and not committed"
        if names is not None
        else "no switch can start"
    )
    return SafetyAPIError(
        503,
        f"the server is shutting down (SIGTERM): {what}; this process serves nothing more",
        "activate on the replicas that are running; a restarted replica serves its configured "
        f"set ({settings.DELTAS.name}, the Helm value 'deltas'), so update that to keep a switch",
        "shutting_down",
        headers={"Retry-After": "30", "Connection": "close"},
        failure="shutdown" if names is not None else None,  # interrupted, not refused
    )


def _engine_stopped(state: SafetyState) -> bool:
    return state.shutting_down.is_set() or bool(getattr(state.engine, "errored", False))


def _stopped_error(state: SafetyState, names: list[str], cause: BaseException) -> SafetyAPIError:
    if state.shutting_down.is_set():
        return _shutdown_error(state, names)
    return SafetyAPIError(
        503,
        f"the engine stopped while switching to {names or 'base weights'} ({_short(cause)}); "
        "nothing was committed and this server cannot serve any more",
        "restart the server (vsp serve); the log names the cause",
        "engine_stopped",
        failure="engine_stopped",
    )


async def _counted(
    state: SafetyState, request: ActivateRequest, once: _CountOnce
) -> ActivateResponse:
    """:func:`_activate`, counting a switch that failed (here, so a client that hung up
    does not hide it) in ``vsp_hotpatch_failures_total`` with its reason."""
    try:
        return await _activate(state, request)
    except SafetyAPIError as error:
        once.count(error.failure)
        raise
    except Exception as error:
        if _engine_stopped(state):
            stopped = _stopped_error(state, request.deltas, error)
            once.count(stopped.failure)
            raise stopped from None
        once.count("error")
        raise


def _check_available(state: SafetyState) -> None:
    if state.engine is None or state.hot_patch_problem is not None:
        raise SafetyAPIError(
            409,
            "hot patching is unavailable on this server: "
            + (state.hot_patch_detail or state.hot_patch_problem or "no engine"),
            "restart with 'vsp serve --deltas ...' to change the deltas",
            "unavailable",
        )
    if state.degraded is not None:
        raise SafetyAPIError(
            503, f"the server is degraded: {state.degraded}", "restart the server", "degraded"
        )
    if state.shutting_down.is_set():
        raise _shutdown_error(state, None)


async def _prepare(state: SafetyState, entries: list[ActiveEntry], failure: str | None) -> None:
    """Step 3: every worker reads and checks these files (and keeps them for a restore)."""
    try:
        await _rpc(
            state,
            PREPARE_METHOD,
            str(state.model_dir),
            [[entry.path, entry.sha256] for entry in entries],
        )
    except Exception as error:  # nothing touched yet: refuse, serve on unchanged
        if _engine_stopped(state):
            raise
        raise SafetyAPIError(
            422,
            f"a worker could not read or check the deltas: {_short(error)}",
            "make the delta files readable on every node and do not rewrite them while "
            "switching; then activate again",
            "worker_refused",
            failure=failure,
        ) from None


async def check(state: SafetyState, names: list[Any]) -> CheckResponse:
    """Steps 1-3 of a switch and nothing more: what activating ``names`` would serve, with
    every file read and checked here and on every worker. Changes nothing."""
    _check_available(state)
    paths = resolve(state, names)
    async with state.switch_lock:
        deltas = await asyncio.to_thread(read_and_verify, state, paths)
        new = [ActiveEntry.of(delta, Path(delta.source), state.delta_dir) for delta in deltas]
        old = list(state.active)
        changed = sorted(e.sha256 for e in new) != sorted(e.sha256 for e in old)
        if changed:
            try:
                await _prepare(state, old + new, failure=None)
            except SafetyAPIError:
                raise
            except Exception as error:  # the engine stopped under the check
                raise _stopped_error(state, names, error) from None
        return CheckResponse(
            changed=changed,
            active=[entry.public() for entry in old],
            header=state.header(),
            requested=[entry.public() for entry in new],
            requested_header=header_value(new),
        )


def _canary_options(request: ActivateRequest) -> CanaryOptions | None:
    if request.canary is False:
        return None
    if request.canary is True:
        return CanaryOptions()
    return request.canary


async def _probe(
    state: SafetyState,
    deltas: list[Delta],
    label: str,
    options: CanaryOptions,
    dry_run: bool,
    baseline: Baseline | None,
    deadline: float,
    lora_request: Any = None,
) -> CanaryReport:
    assert state.engine is not None
    try:
        report = await canary.run(
            state.engine,
            [delta.manifest for delta in deltas],
            label,
            state.canary,
            options,
            baseline,
            deadline,
            lora_request,
        )
    except canary.CanaryTimeoutError:
        metrics.canary_errored("timeout", dry_run)
        raise
    except Exception:
        metrics.canary_errored("error", dry_run)
        raise
    metrics.canary_observed(report, dry_run)
    logger.log(
        logging.INFO if report.passed else logging.WARNING,
        "vsp: canary on %s %s in %.2f s%s%s:\n%s",
        label,
        "passed" if report.passed else "FAILED",
        report.seconds,
        " (dry run)" if dry_run else "",
        " (as a LoRA adapter, traffic not held)" if lora_request is not None else "",
        canary.table(report),
    )
    return report


def adapter_problem(engine: Any) -> str | None:
    """Why this engine cannot probe a candidate as a LoRA adapter (None: it can)."""
    config = getattr(getattr(engine, "vllm_config", None), "lora_config", None)
    if config is None:
        return "the server was started without LoRA support (vLLM's --enable-lora)"
    if not callable(getattr(engine, "add_lora", None)):
        return "the engine cannot load LoRA adapters at run time"
    return slot_problem(int(config.max_loras), len(labels_from_env()))


async def _probe_candidate(
    state: SafetyState,
    deltas: list[Delta],
    old: list[ActiveEntry],
    label: str,
    options: CanaryOptions,
    dry_run: bool,
    baseline: Baseline | None,
) -> tuple[CanaryReport, float] | None:
    """The canary on the candidate as a LoRA adapter over the served set, the gate open:
    (report, seconds), or None where it cannot run that way (the caller then holds
    traffic for it, as without LoRA support; the log says why)."""
    engine = state.engine
    assert engine is not None
    problem = adapter_problem(engine)
    folder: Path | None = None
    if problem is None:
        try:
            merged = await asyncio.to_thread(
                lambda: [state.read_recorded(Path(entry.path)) for entry in old]
            )
            rank = candidate_rank(deltas, merged)
            limit = int(engine.vllm_config.lora_config.max_lora_rank)
            if rank > limit:
                problem = (
                    f"the candidate adapter (new set minus the merged one) has rank {rank}, "
                    f"above --max-lora-rank {limit}"
                )
            else:
                folder = Path(tempfile.mkdtemp(prefix="vsp-canary-")) / "adapter"
                await asyncio.to_thread(
                    write_candidate_adapter, deltas, merged, state.model_dir, folder
                )
        except (VSPError, OSError) as error:
            problem = f"no adapter could be written ({_short(error)})"
    if problem is not None or folder is None:
        logger.info("vsp: the canary on %s holds user traffic: %s", label, problem)
        if folder is not None:
            shutil.rmtree(folder.parent, ignore_errors=True)
        return None
    from vllm.lora.request import LoRARequest

    lora_id = next(_CANARY_LORA_IDS)
    lora_request = LoRARequest(f"vsp-canary-{lora_id}", lora_id, str(folder))
    try:
        try:
            await engine.add_lora(lora_request)
        except Exception as error:
            if _engine_stopped(state):
                raise
            logger.warning(
                "vsp: the canary on %s holds user traffic: the engine did not load the "
                "candidate adapter (%s)",
                label,
                _short(error),
            )
            return None
        started = time.monotonic()
        try:
            report = await _probe(
                state,
                deltas,
                label,
                options,
                dry_run,
                baseline,
                started + state.canary.timeout_s,  # nothing to restore: all of it
                lora_request,
            )
        except Exception as error:
            if _engine_stopped(state):
                raise
            raise SafetyAPIError(
                500,
                f"the canary could not run ({_short(error)}); nothing was switched: "
                f"{header_value(old)} is served unchanged",
                f"see the server log; raise {settings.CANARY_TIMEOUT_S.name} if it timed out, "
                'or activate with "canary": false to skip it',
                "canary_error",
                failure="canary",
            ) from None
        return report, time.monotonic() - started
    finally:
        if not _engine_stopped(state):
            with contextlib.suppress(Exception):
                await engine.remove_lora(lora_id)
        shutil.rmtree(folder.parent, ignore_errors=True)


def _probe_deadline(started: float, timeout_s: float, reload_seconds: float) -> float:
    """When the probes must end for the restore after them to end within the timeout."""
    margin = min(RESTORE_MARGIN_S + 2 * reload_seconds, timeout_s / 2)
    return started + timeout_s - margin


async def _load(
    state: SafetyState, entries: list[ActiveEntry], tensors: list[str], mode: str = "wait"
) -> list:
    """Pause (``mode``), reload ``entries`` over ``tensors`` (prefix cache reset), resume."""
    paused = await _pause(state, mode)
    try:
        return await _reload(state, entries, tensors)
    finally:
        if paused:
            assert state.engine is not None
            await state.engine.resume_generation()


async def _switch(
    state: SafetyState, new: list[ActiveEntry], old: list[ActiveEntry], tensors: list[str]
) -> list:
    """Load ``new``; if a worker fails, load ``old`` again (:func:`_restore` raises)."""
    paused = await _pause(state)
    try:
        try:
            return await _reload(state, new, tensors)
        except Exception as error:
            if _engine_stopped(state):
                raise
            await _restore(state, old, tensors, error)
            raise  # _restore always raises; kept for type checkers
    finally:
        if paused:
            assert state.engine is not None
            await state.engine.resume_generation()


async def _switch_back(
    state: SafetyState, old: list[ActiveEntry], tensors: list[str], why: str
) -> None:
    """After the canary (failed, or a dry run): serve ``old`` again, exactly as before;
    probes still in the engine (a timeout) are aborted, not waited for."""
    try:
        await _load(state, old, tensors, mode="abort")
    except Exception as error:  # a pause that timed out too: the new weights are still in
        if _engine_stopped(state):
            raise
        state.degrade(f"{why}, and restoring {header_value(old)} failed ({_short(error)})")
        raise SafetyAPIError(
            500,
            f"the previous set could not be restored: {state.degraded}",
            "restart the server; inference is refused until then",
            "degraded",
            failure="restore_failed",
        ) from None


async def _activate(state: SafetyState, request: ActivateRequest) -> ActivateResponse:
    names = list(request.deltas)
    options = _canary_options(request)
    if request.dry_run and options is None:
        raise SafetyAPIError(
            400,
            "a dry run without the canary would switch and restore and show nothing",
            'drop "canary": false from a dry run (a dry run is a canary run that never commits)',
            "invalid_request",
        )
    _check_available(state)
    paths = resolve(state, names)
    async with state.switch_lock:
        started = time.monotonic()
        deltas = await asyncio.to_thread(read_and_verify, state, paths)
        # The canary's floors: hashed once per server, before the gate closes.
        baseline = None if options is None else await asyncio.to_thread(state.baseline)
        # read_delta records the path it read as the source: the file the workers will read.
        new = [ActiveEntry.of(delta, Path(delta.source), state.delta_dir) for delta in deltas]
        old = list(state.active)
        label = header_value(new)
        if sorted(entry.sha256 for entry in new) == sorted(entry.sha256 for entry in old):
            probed = None
            if request.dry_run:  # nothing to switch: probe the live set as it is
                assert options is not None
                deadline = time.monotonic() + state.canary.timeout_s  # nothing to restore
                probed = await _probe(state, deltas, label, options, True, baseline, deadline)
            else:
                state.active = new  # same bytes; the names may be new
            return ActivateResponse(
                changed=False,
                active=[e.public() for e in state.active],
                header=state.header(),
                dry_run=request.dry_run,
                canary=probed,
            )
        tensors = sorted(set().union(*(entry.tensors for entry in old + new)))
        await _prepare(state, old + new, failure="worker_refused")
        verify_seconds = time.monotonic() - started
        report: CanaryReport | None = None
        canary_seconds: float | None = None
        results: list = []
        drain_seconds = reload_seconds = 0.0
        # First, where the engine allows it: the candidate as an adapter, the gate open.
        as_adapter = None
        if options is not None:
            as_adapter = await _probe_candidate(
                state, deltas, old, label, options, request.dry_run, baseline
            )
        if as_adapter is not None:
            report, canary_seconds = as_adapter
        if as_adapter is None or (report is not None and report.passed and not request.dry_run):
            try:
                async with state.gate.switch(state.drain_timeout_s) as drain_seconds:
                    reload_started = time.monotonic()
                    results = await _switch(state, new, old, tensors)
                    reload_seconds = time.monotonic() - reload_started
                    if options is not None and as_adapter is None:
                        # The gate stays closed: user requests wait; none sees an unproven set.
                        report, canary_seconds = await _probe_held(
                            state, deltas, old, tensors, label, options, request, baseline,
                            reload_seconds,
                        )  # fmt: skip
                    if not request.dry_run and (report is None or report.passed):
                        state.active = new
            except DrainTimeoutError as error:
                metrics.hotpatch_timed(time.monotonic() - started, "drain_timeout")
                raise SafetyAPIError(
                    409,
                    f"{error.in_flight} requests were still running after {error.timeout:g} s; "
                    "nothing was switched",
                    "retry when fewer long requests run, or raise "
                    f"{settings.SWITCH_DRAIN_TIMEOUT_S.name}",
                    "busy",
                    failure="drain_timeout",
                ) from None
        record = SwitchRecord(
            from_deltas=[entry.label() for entry in old],
            to_deltas=[entry.label() for entry in (old if request.dry_run else new)],
            tensors=max((result.get("tensors", 0) for result in results), default=0),
            verify_seconds=round(verify_seconds, 4),
            drain_seconds=round(drain_seconds, 4),
            reload_seconds=round(reload_seconds, 4),
            canary_seconds=None if canary_seconds is None else round(canary_seconds, 4),
            total_seconds=round(time.monotonic() - started, 4),
            finished_at=time.time(),
        )
        if report is not None and not report.passed and not request.dry_run:
            metrics.hotpatch_timed(record.total_seconds, "canary_failed")
            raise SafetyAPIError(
                422,
                f"the canary refused {label}: {canary.failures(report)}; the previous set "
                f"{header_value(old)} "
                + (
                    "was kept and is served unchanged (the candidate was probed as a LoRA "
                    "adapter; user traffic was not held)"
                    if as_adapter is not None
                    else "was restored and is served unchanged"
                ),
                "read the table (canary.languages): re-solve or fix the delta; if a threshold "
                'is wrong for this model, override it ("canary": {"thresholds": {LANG: '
                '{"harmful_min": .., "benign_max": ..}}} or '
                f"{settings.CANARY_THRESHOLDS.name}); "
                '"canary": false skips the check',
                "canary_failed",
                failure="canary",
                canary=report,
            )
        if request.dry_run:
            metrics.hotpatch_timed(record.total_seconds, "dry_run")
            return ActivateResponse(
                changed=False,
                active=[e.public() for e in state.active],
                header=state.header(),
                switch=record,
                dry_run=True,
                canary=report,
            )
        state.last_switch = record
        metrics.hotpatch_timed(record.total_seconds, "ok")
        logger.info(
            "vsp: switched deltas %s -> %s: %d tensors, verify %.3f s, drain %.3f s, "
            "reload %.3f s, canary %s, total %.3f s",
            header_value(old),
            header_value(new),
            record.tensors,
            record.verify_seconds,
            record.drain_seconds,
            record.reload_seconds,
            "skipped" if canary_seconds is None else f"{canary_seconds:.3f} s",
            record.total_seconds,
        )
        return ActivateResponse(
            changed=True,
            active=[e.public() for e in new],
            header=state.header(),
            switch=record,
            canary=report,
        )


async def _probe_held(
    state: SafetyState,
    deltas: list[Delta],
    old: list[ActiveEntry],
    tensors: list[str],
    label: str,
    options: CanaryOptions,
    request: ActivateRequest,
    baseline: Baseline | None,
    reload_seconds: float,
) -> tuple[CanaryReport, float]:
    """The canary on the switched weights, the gate closed (no LoRA support): restores
    ``old`` after a failure or a dry run. (report, seconds)."""
    canary_started = time.monotonic()
    deadline = _probe_deadline(canary_started, state.canary.timeout_s, reload_seconds)
    try:
        report = await _probe(state, deltas, label, options, request.dry_run, baseline, deadline)
    except Exception as error:
        if _engine_stopped(state):
            raise
        why = f"the canary could not run ({_short(error)})"
        await _switch_back(state, old, tensors, why)
        raise SafetyAPIError(
            500,
            f"{why}; the previous set {header_value(old)} was restored and is served unchanged",
            f"see the server log; raise {settings.CANARY_TIMEOUT_S.name} if it timed out, "
            'or activate with "canary": false to skip it',
            "canary_error",
            failure="canary",
        ) from None
    if request.dry_run or not report.passed:
        why = "a dry run" if request.dry_run else "the canary"
        await _switch_back(state, old, tensors, f"{why} on {label}")
    return report, time.monotonic() - canary_started


async def _restore(
    state: SafetyState, old: list[ActiveEntry], tensors: list[str], cause: Exception
) -> None:
    """Put the old set back on every worker, then raise the error for the client."""
    logger.error("vsp: switch failed, restoring %s: %s", header_value(old), cause)
    metrics.hotpatch_timed(0.0, "failed")
    try:
        await _reload(state, old, tensors)
    except Exception as second:
        state.degrade(f"switch failed ({_short(cause)}) and restoring failed ({_short(second)})")
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
