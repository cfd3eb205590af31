"""Bounded holding (issue 21): the canary's timeout bounds everything user traffic waits
for after the reload: choosing the probes, the probes, their abort and the restore.

In-process, with the stand-in engine of ``test_safe_rollout.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_safe_rollout import ProbeEngine, probe_state, switch

from vllm_safety_patch.server import canary

TIMEOUT_S = 1.5
# Scheduling slack on a loaded 2-core machine (the probes never finish: without the bound
# traffic would be held forever, so a fraction of a second over the timeout still proves it).
SLACK_S = 0.5


def timed_state(tmp_path: Path, model: Path, engine: ProbeEngine) -> Any:
    import vllm  # noqa: F401  (a server has it loaded: its first import blocks the loop)

    state = probe_state(tmp_path, model, engine)
    state.canary = dataclasses.replace(state.canary, timeout_s=TIMEOUT_S)
    return state


def test_probes_that_never_finish_leave_room_for_the_restore(
    tmp_path: Path, tiny_qwen2: Path
) -> None:
    engine = ProbeEngine(tiny_qwen2, "Sure.")
    engine.reload_s = 0.2
    state = timed_state(tmp_path, tiny_qwen2, engine)
    engine.hold = asyncio.Event()  # never set
    error = switch(state, deltas=["second"])
    assert error.status == 500 and error.kind == "canary_error", error
    assert "did not finish" in str(error) or "restored" in error.problem
    # From the end of the switch's reload to the end of the restore: the canary timeout.
    switched, restored = engine.reloaded_at
    held = restored - switched
    assert held <= TIMEOUT_S + SLACK_S, held
    assert engine.pauses == ["wait", "abort"]  # the restore aborts the probes left running
    assert state.active[0].name == "first" and state.degraded is None


def test_a_slow_probe_selection_is_inside_the_timeout(
    tmp_path: Path, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = canary.choose
    stopped = threading.Event()

    def slow(lang, kind, count, encode, fits, stop=None):  # type: ignore[no-untyped-def]
        # 5 s per language and kind, unless stopped.
        interrupted = stop.wait(5.0) if stop is not None else time.sleep(5.0) or False
        if interrupted:
            stopped.set()
            return []
        return original(lang, kind, count, encode, fits, stop)

    monkeypatch.setattr(canary, "choose", slow)
    engine = ProbeEngine(tiny_qwen2, "Sure.")
    state = timed_state(tmp_path, tiny_qwen2, engine)
    started = time.monotonic()
    error = switch(state, deltas=["second"])
    took = time.monotonic() - started
    assert error.status == 500 and error.kind == "canary_error", error
    switched, restored = engine.reloaded_at
    assert restored - switched <= TIMEOUT_S + SLACK_S, restored - switched
    assert took < 5.0 and engine.probes == 0
    assert stopped.wait(1.0)  # the selection thread stopped too


def test_the_deadline_reserves_the_restore_out_of_the_timeout() -> None:
    from vllm_safety_patch.server.hotpatch import RESTORE_MARGIN_S, _probe_deadline

    assert _probe_deadline(100.0, 300.0, 0.2) == 100.0 + 300.0 - (RESTORE_MARGIN_S + 0.4)
    assert _probe_deadline(100.0, 1.0, 5.0) == 100.5  # never more than half the timeout
