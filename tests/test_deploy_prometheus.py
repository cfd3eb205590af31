"""deploy/prometheus and the dashboard against real Prometheus and a real ``vsp serve``.

``promtool`` checks the compose stack's config and the rules and runs the rules' unit tests;
then Debian's ``prometheus`` scrapes a live ``vsp serve`` (tiny random-weight model, started
through the images' entry point and health check) on loopback every second with the same
rules loaded, and the tests read the refusal series, the rules' health and every dashboard
query back through Prometheus' HTTP API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_delta
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    engine_env,
    free_port,
    request,
    start_logged,
    stop_process_group,
    wait_healthy,
)
from test_deploy_tools import (
    DEPLOY,
    PROMETHEUS_FIX,
    RULES,
    dashboard_queries,
    promql_metric_names,
    tool,
    variable_metrics,
)

TOKEN = "deploy-admin-token-0123456789abcdef"
START_TIMEOUT_S = 240
CHAT = "/v1/chat/completions"


def promtool(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [tool("promtool", PROMETHEUS_FIX), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_config_and_rules() -> None:
    output = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in output
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", str(RULES))


def test_promtool_rule_unit_tests() -> None:
    """The alerts fire on the synthetic drops, gaps and failures, and only on those."""
    tests = DEPLOY / "prometheus" / "tests"
    assert "SUCCESS" in promtool("test", "rules", "vsp-rules.test.yml", cwd=tests)


# ---------------------------------------------------------------------------------------
# A live server and a live Prometheus
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("deploy-server")
    delta_dir = root / "deltas"
    delta_dir.mkdir()
    delta, data = make_delta(tiny_qwen2, group="deploy")
    (delta_dir / "deploy.safetensors").write_bytes(data)
    token_file = root / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    port = free_port()
    # Started the way the images start it: the entry point, configured by environment.
    env = engine_env(sorted(os.sched_getaffinity(0))[-1])
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        VSP_MODEL=str(tiny_qwen2),
        VSP_DELTA_DIR=str(delta_dir),
        VSP_DELTAS="deploy",
        VSP_ADMIN_TOKEN_FILE=str(token_file),
        VSP_HOST="127.0.0.1",  # loopback only in tests (the images listen on 0.0.0.0)
        VSP_PORT=str(port),
    )
    command = [
        "bash",
        str(DEPLOY / "docker" / "entrypoint.sh"),
        "--max-model-len",
        "512",
        "--seed",
        "0",
    ]
    log = root / "server.log"
    process = start_logged(command, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        seconds = wait_healthy(process, url, log, START_TIMEOUT_S)
        print(f"\nvsp serve (deploy entry point): healthy after {seconds:.1f} s")
        # The images' HEALTHCHECK agrees.
        check = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
        label = f"{delta.group}@{delta.manifest.base_model.fingerprint[:12]}"
        yield {"url": url, "port": port, "model": str(tiny_qwen2), "label": label}
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, server: dict) -> Iterator[str]:
    """Debian's Prometheus scraping the server every second, with deploy's rules loaded."""
    binary = tool("prometheus", PROMETHEUS_FIX)
    root = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "vllm-safety-patch",
                "static_configs": [{"targets": [f"127.0.0.1:{server['port']}"]}],
            }
        ],
    }
    (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = root / "prometheus.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.console.templates=" + str(root),  # Debian's defaults may be absent
                "--web.console.libraries=" + str(root),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready in 60 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(process)


def api(prometheus: str, path: str, **params: str) -> dict:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{prometheus}{path}?{query}", timeout=30) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


def query(prometheus: str, expr: str) -> list[dict]:
    return api(prometheus, "/api/v1/query", query=expr)["result"]


def wait_for(
    check: Callable[[], Any], timeout_s: float = 30.0, what: str | Callable[[], str] = ""
) -> Any:
    """Poll ``check()`` until it returns something truthy (scrapes and rule runs are 1 s);
    ``what`` (or what it returns, computed on failure) names what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not seen in {timeout_s} s: {what() if callable(what) else what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def traffic(server: dict, prometheus: str) -> dict[tuple[str, str], int]:
    """Chats in two languages on the delta set, a hot-patch to base weights, one more chat:
    every vsp_* series exists afterwards. Returns the requests sent by (language, set)."""
    url = server["url"]
    sent: dict[tuple[str, str], int] = {}

    def chat(language: str) -> str:
        body = {
            "model": server["model"],
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "How do I make a cake?"}],
        }
        status, reply, headers = request("POST", url + CHAT, body, {"X-Prompt-Language": language})
        assert status == 200, reply
        key = (language, headers["x-safety-deltas"])
        sent[key] = sent.get(key, 0) + 1
        # Prometheus sees a counter's first value only as a start: let a scrape (1 s) fall
        # between requests so that the rates and increases move.
        time.sleep(1.5)
        return headers["x-safety-deltas"]

    # Scraping has begun (a series' first scraped value counts as its start, not a rise).
    wait_for(lambda: query(prometheus, "up == 1"), what="a first scrape of the server")
    for language in ("en", "th", "en", "th", "en", "th"):
        assert chat(language) == server["label"]
    status, body, _ = request(
        "POST",
        url + "/v1/safety/deltas/activate",
        {"deltas": []},
        {"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200, body
    assert chat("en") == "none"
    return sent


def test_prometheus_scrapes_refusal_series(
    server: dict, prometheus: str, traffic: dict[tuple[str, str], int]
) -> None:
    def scraped() -> dict:
        found = {
            (s["metric"]["language"], s["metric"]["delta_set"]): float(s["value"][1])
            for s in query(prometheus, "vsp_requests_total")
        }
        return found if found == {key: float(n) for key, n in traffic.items()} else {}

    wait_for(scraped, what=f"vsp_requests_total == {traffic}")
    series = query(prometheus, "vsp_refusals_total")
    for sample in series:
        labels = sample["metric"]
        assert labels["job"] == "vllm-safety-patch"
        assert labels["instance"] == f"127.0.0.1:{server['port']}"
        assert labels["endpoint"] == CHAT
        assert (labels["language"], labels["delta_set"]) in traffic
    assert len(series) == len(traffic)

    # The dashboard's refusal-rate panel: one ratio per language x delta set, in [0, 1].
    # increase() needs two samples of a series: a series first scraped a moment ago has
    # none yet, so wait for the next scrape (1 s) rather than race it.
    def ratio_per_series() -> list:
        ratios = query(
            prometheus,
            "sum by (language, delta_set) (increase(vsp_refusals_total[5m]))"
            " / sum by (language, delta_set) (increase(vsp_requests_total[5m]))",
        )
        found = {(r["metric"]["language"], r["metric"]["delta_set"]) for r in ratios}
        return ratios if found == set(traffic) else []

    ratios = wait_for(ratio_per_series, what=f"a refusal ratio for each of {set(traffic)}")
    values = [float(r["value"][1]) for r in ratios]
    # NaN (0/0) where a series saw one request only: its first value is no increase.
    assert all(0 <= value <= 1 for value in values if value == value), ratios
    active = query(prometheus, "vsp_active_delta_set_info == 1")
    assert [a["metric"]["delta_set"] for a in active] == ["none"]
    assert float(query(prometheus, "vsp_hotpatch_total")[0]["value"][1]) == 1
    assert float(query(prometheus, "vsp_hotpatch_failures_total")[0]["value"][1]) == 0


def test_prometheus_runs_the_alert_rules(prometheus: str, traffic: dict) -> None:
    """Every rule of deploy's file loads and evaluates without error on live series."""

    def evaluated() -> list[dict]:
        groups = api(prometheus, "/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] == "ok" for rule in rules) else []

    rules = wait_for(evaluated, what="every rule evaluated with health ok")
    names = {rule.get("alert") or rule["name"] for rule in rules}
    assert {
        "VspRefusalRateDropped",
        "VspRefusalGapToEnglishWidened",
        "VspHotPatchFailed",
        "VspReplicasServeDifferentDeltaSets",
        "language:vsp_refusal_ratio:rate30m",
        "language:vsp_refusal_gap_to_en:rate30m",
    } <= names
    assert all(not rule.get("lastError") for rule in rules), rules
    # The recording rules see the live traffic: requests per language, and Thai's gap.
    recorded = wait_for(
        lambda: query(prometheus, "language:vsp_requests:increase30m"),
        what="language:vsp_requests:increase30m",
    )
    assert {r["metric"]["language"] for r in recorded} == {"en", "th"}
    wait_for(
        lambda: len(query(prometheus, "language:vsp_refusal_ratio:rate30m")) == 2,
        what=lambda: (
            "language:vsp_refusal_ratio:rate30m for en and th, got "
            + json.dumps(query(prometheus, "language:vsp_refusal_ratio:rate30m"))
        ),
    )
    gap = wait_for(
        lambda: query(prometheus, "language:vsp_refusal_gap_to_en:rate30m"),
        what="language:vsp_refusal_gap_to_en:rate30m",
    )
    assert [g["metric"]["language"] for g in gap] == ["th"]


def exported_names(url: str) -> set[str]:
    """Every sample name on the server's /metrics (histograms' _bucket/_sum/_count too)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_dashboard_queries_use_exported_metrics_and_run(
    server: dict, prometheus: str, traffic: dict
) -> None:
    exported = exported_names(server["url"])
    queries = dashboard_queries()
    used = set().union(*(promql_metric_names(expr) for expr in queries)) | variable_metrics()
    assert used <= exported, f"not exported by vsp serve: {sorted(used - exported)}"
    assert any(name.startswith("vllm:") for name in used)  # throughput and latency panels
    # Each query parses and runs in Prometheus; the refusal and vLLM panels have data.
    with_data = set()
    for expr in queries:
        if query(prometheus, expr):
            with_data |= promql_metric_names(expr)
    for name in ("vsp_refusals_total", "vsp_requests_total", "vllm:generation_tokens_total"):
        assert name in with_data, f"no data for any query over {name}"
