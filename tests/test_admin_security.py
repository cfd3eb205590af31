"""The admin path without holes (issue 20), where no real server is needed.

The admin client and the fleet rollout against stand-in replicas on loopback (``http.server``
stubs: a replica that redirects, lies or answers late), the canary and hot-patch metrics of
dry runs and timed-out canaries, what users and the open listing are told when the server
is degraded or cannot hot-patch, and the Responses API store refused at start-up. The same
findings against real servers: ``test_cli_serving.py`` (every spelling of the API key) and
``test_safe_rollout.py`` (a switch that outlasts its client, a non-JSON replica).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY
from serving_helpers import ACTIVATE, CHECK, LISTING, Stub
from test_safe_rollout import ProbeEngine, probe_state, switch
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.cli.client import call, plain_http_warning
from vllm_safety_patch.server.rollout import Replica, rollout, summary

TOKEN = "admin-security-token-0123456789"
runner = CliRunner()


# ---------------------------------------------------------------------------------------
# Stand-in replicas on loopback (serving_helpers.Stub)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    made: list[Stub] = []
    yield made
    for stub in made:
        stub.close()


def stub(stubs: list[Stub], serving: str = "old", **options: Any) -> Stub:
    made = Stub(serving, token=TOKEN, **options)
    stubs.append(made)
    return made


def cli(*args: str) -> Any:
    env = {"VSP_ADMIN_TOKEN": TOKEN, "VLLM_API_KEY": None, "VSP_ADMIN_TOKEN_FILE": None}
    return runner.invoke(app, list(args), env=env)


# ---------------------------------------------------------------------------------------
# Finding 2: redirects are errors, and the token goes to the admin routes only
# ---------------------------------------------------------------------------------------


def test_a_redirect_is_an_error_and_carries_no_token(stubs: list[Stub]) -> None:
    thief = stub(stubs)
    redirecting = stub(stubs, activate="redirect_all")
    redirecting.location = f"{thief.url}/steal"
    listed = cli("deltas", "list", "--url", redirecting.url)
    assert listed.exit_code == 2, listed.output
    assert f"HTTP 302, a redirect to {thief.url}/steal" in listed.stderr
    activated = cli("deltas", "activate", "all", "--url", redirecting.url)
    assert activated.exit_code == 2, activated.output
    assert "a redirect to" in activated.stderr and "already active" not in activated.output
    result = cli("deltas", "rollout", "all", "--url", redirecting.url, "--url", thief.url)
    assert result.exit_code == 1, result.output
    assert "a redirect to" in result.stderr and "no replica changed" in result.stderr
    # Nothing reached the other host; the POST was not re-sent as a GET; the open listing
    # never saw the token.
    assert all(path != "/steal" for _, path, _ in thief.requests)
    methods = [(method, path) for method, path, _ in redirecting.requests]
    assert methods[:3] == [("GET", LISTING), ("POST", ACTIVATE), ("GET", LISTING)]
    assert ("GET", ACTIVATE) not in methods
    assert not redirecting.saw_token(LISTING)


def test_the_admin_token_goes_to_the_admin_routes_only(stubs: list[Stub]) -> None:
    replicas = [stub(stubs), stub(stubs)]
    lines: list[str] = []
    targets = [Replica(f"r{i}", replica.url) for i, replica in enumerate(replicas)]
    result = rollout(targets, ["new"], TOKEN, call, lines.append)
    assert result.ok, (result, lines)
    for replica in replicas:
        paths = {path for _, path, _ in replica.requests}
        assert paths == {LISTING, CHECK, ACTIVATE}
        assert not replica.saw_token(LISTING)
        assert replica.saw_token(CHECK) and replica.saw_token(ACTIVATE)
    assert cli("deltas", "list", "--url", replicas[0].url, "--json").exit_code == 0
    assert not replicas[0].saw_token(LISTING)


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://10.0.0.5:8000/v1/safety/deltas/activate", True),
        ("http://vsp.example:8000/v1/safety/deltas/check", True),
        ("https://10.0.0.5:8000/v1/safety/deltas/activate", False),
        ("http://127.0.0.1:8000/v1/safety/deltas/activate", False),
        ("http://localhost:8000/v1/safety/deltas/activate", False),
        ("http://[::1]:8000/v1/safety/deltas/activate", False),
    ],
)
def test_plain_http_off_this_machine_is_warned_about(url: str, warned: bool) -> None:
    """Checked on the URL alone: no request leaves loopback."""
    warning = plain_http_warning(url)
    assert (warning is not None) == warned
    if warning:
        assert "plain http" in warning and "https" in warning


# ---------------------------------------------------------------------------------------
# Finding 3: a replica whose state is unknown is waited for, then rolled back
# ---------------------------------------------------------------------------------------


def test_a_non_json_replica_is_rolled_back_without_a_traceback(stubs: list[Stub]) -> None:
    good, liar = stub(stubs), stub(stubs, activate="nonjson")
    result = cli("deltas", "rollout", "new", "--url", good.url, "--url", liar.url, "--json")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "not a JSON object" in result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["consistent"] and sorted(outcome["rolled_back"]) == sorted(
        [good.url.removeprefix("http://"), liar.url.removeprefix("http://")]
    )
    assert good.serving == liar.serving == "old"


def test_a_switch_that_outlasts_its_client_is_waited_for_and_undone(stubs: list[Stub]) -> None:
    """The client gives up after 0.5 s; the replica finishes its switch 2 s later. The
    rollout waits for it to settle (its listing's ``switching``), sees the new set and
    switches it back: it must not report 'no replica changed' with the replica switched."""
    slow = stub(stubs, activate="slow", delay=2.0)
    lines: list[str] = []
    result = rollout(
        [Replica("slow", slow.url)],
        ["new"],
        TOKEN,
        call,
        lines.append,
        activate_timeout_s=0.5,
        settle_poll_s=0.2,
    )
    assert not result.ok and result.failed_replica == "slow", lines
    assert "no answer within 0.5 s" in (result.reason or "")
    assert result.rolled_back == ["slow"] and result.consistent
    assert slow.serving == "old" and result.final == {"slow": "old"}
    assert "settle   slow: serves new now" in lines
    assert "no replica changed (rolled back: slow)" in summary(result)


def test_a_replica_that_never_settles_is_reported_as_unknown(stubs: list[Stub]) -> None:
    slow = stub(stubs, activate="slow", delay=5.0)
    result = rollout(
        [Replica("slow", slow.url)],
        ["new"],
        TOKEN,
        call,
        lambda line: None,
        activate_timeout_s=0.3,
        settle_timeout_s=1.0,
        settle_poll_s=0.2,
    )
    assert not result.ok and not result.consistent  # exit 3: the fleet may be mixed
    assert "its state is unknown" in result.rollback_failures[0]
    assert "ROLLBACK FAILED on slow" in summary(result)


# ---------------------------------------------------------------------------------------
# Finding 4: the canary and hot-patch metrics say what the README says
# ---------------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_dry_runs_add_no_failure_and_timed_out_canaries_are_counted(
    tmp_path: Path, tiny_qwen2: Path
) -> None:
    from vllm_safety_patch.server import metrics

    metrics.metrics()  # every series exported, at 0
    engine = ProbeEngine(tiny_qwen2, "Sure, here it is.")
    failed = sample("vsp_hotpatch_failures_total", reason="canary")
    timeouts = {
        mode: sample("vsp_canary_runs_total", outcome="timeout", mode=mode)
        for mode in ("dry_run", "activate")
    }
    for dry_run in (True, False):
        state = probe_state(tmp_path, tiny_qwen2, engine)  # its locks belong to one loop
        state.canary = dataclasses.replace(state.canary, timeout_s=0.5)
        engine.hold = asyncio.Event()  # never set: the probes outlast the canary timeout
        error = switch(state, deltas=["second"], dry_run=dry_run)
        assert error.status == 500 and error.kind == "canary_error", error
        assert "was restored" in error.problem
    # The dry run's canary error is no failed switch; the activation's is, once.
    assert sample("vsp_hotpatch_failures_total", reason="canary") == failed + 1
    for mode, before in timeouts.items():
        assert sample("vsp_canary_runs_total", outcome="timeout", mode=mode) == before + 1
    assert state.active[0].name == "first" and state.degraded is None


def report(delta_set: str, refused: int, n: int) -> Any:
    row = SimpleNamespace(
        language="bn", harmful_refused=refused, harmful_n=n, benign_refused=0, benign_n=n
    )
    return SimpleNamespace(delta_set=delta_set, languages=[row], passed=True, seconds=1.0)


def test_the_canary_ratio_has_its_sample_size_and_only_the_last_sets_series() -> None:
    from vllm_safety_patch.server import metrics

    metrics.canary_observed(report("first@abc", 3, 4), dry_run=True)
    labels = {"language": "bn", "kind": "harmful", "delta_set": "first@abc"}
    assert sample("vsp_canary_refusal_ratio", **labels) == 0.75
    assert sample("vsp_canary_probes", **labels) == 4
    metrics.canary_observed(report("second@def", 1, 8), dry_run=False)
    assert REGISTRY.get_sample_value("vsp_canary_refusal_ratio", labels) is None
    assert REGISTRY.get_sample_value("vsp_canary_probes", labels) is None
    labels["delta_set"] = "second@def"
    assert sample("vsp_canary_refusal_ratio", **labels) == 0.125
    assert sample("vsp_canary_probes", **labels) == 8


# ---------------------------------------------------------------------------------------
# Finding 6: the Responses API store is refused at start-up
# ---------------------------------------------------------------------------------------


def test_the_responses_api_store_is_refused_at_start_up(
    tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_safety_patch.errors import VSPError
    from vllm_safety_patch.server.plugin import build_state

    env = {"VSP_ADMIN_TOKEN": None, "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    result = runner.invoke(
        app, ["serve", "--model", str(tiny_qwen2), "--deltas", "none", "--dry-run"], env=env
    )
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "VLLM_ENABLE_RESPONSES_API_STORE is set" in line
    assert "outside the switch gate" in line and "Fix: unset" in line
    # The API-server plugin refuses it too, however the server was started.
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    monkeypatch.delenv("VSP_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("VSP_ADMIN_TOKEN_FILE", raising=False)
    with pytest.raises(VSPError, match="VLLM_ENABLE_RESPONSES_API_STORE"):
        asyncio.run(build_state(None, Namespace(model=str(tiny_qwen2), api_key=None)))
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "0")
    assert asyncio.run(build_state(None, Namespace(model=str(tiny_qwen2), api_key=None)))
