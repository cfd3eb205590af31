"""deploy/compose.yaml: validated and resolved by Docker Compose itself (``docker-compose
config``, the real v5 binary from the test extra; no Docker engine needed), then checked for
what ties the stack together: mounted files exist, Prometheus scrapes the server's service
and port, Grafana's data source points at Prometheus and loads the dashboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy_tools import (
    DASHBOARD,
    DEPLOY,
    EXTRA_FIX,
    dashboard_queries,
    module,
    promql_metric_names,
    tool,
    variable_metrics,
)

COMPOSE = DEPLOY / "compose.yaml"


# Variables compose.yaml interpolates: the tests read its defaults, not this shell's values.
INTERPOLATED = ("VSP_", "VLLM_", "GRAFANA_")


def compose(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(INTERPOLATED)}
    return subprocess.run(
        [tool("docker-compose", EXTRA_FIX), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose file as Compose resolves it (defaults filled, paths absolute)."""
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_validates() -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_validation_is_real(tmp_path: Path) -> None:
    """A misspelt key fails Compose's schema check, naming the key."""
    broken = COMPOSE.read_text().replace("    shm_size: 2gb", "    shm_sise: 2gb")
    (tmp_path / "compose.yaml").write_text(broken)
    result = compose("config", "--quiet", cwd=tmp_path)
    assert result.returncode != 0
    assert "shm_sise" in result.stderr


def test_one_stack(resolved: dict) -> None:
    services = resolved["services"]
    assert set(services) == {"vsp", "prometheus", "grafana"}
    vsp = services["vsp"]
    assert vsp["build"]["dockerfile"] == "deploy/docker/cpu.Dockerfile"
    assert Path(vsp["build"]["context"]) == DEPLOY.parent
    assert vsp["healthcheck"]["test"] == ["CMD", "python", "/opt/vsp/bin/healthcheck.py"]
    # Every port on loopback only: /metrics is unauthenticated.
    for service in services.values():
        for port in service.get("ports", ()):
            assert port["host_ip"] == "127.0.0.1", port
    # The admin token arrives as a secret file, which the entry point reads.
    assert vsp["environment"]["VSP_ADMIN_TOKEN_FILE"] == "/run/secrets/vsp_admin_token"
    assert resolved["secrets"]["vsp_admin_token"]["environment"] == "VSP_ADMIN_TOKEN"
    assert vsp["environment"]["VSP_DELTAS"] == "all"


def test_bind_mounts_exist(resolved: dict) -> None:
    for name, service in resolved["services"].items():
        for volume in service.get("volumes", ()):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    return {
        v["target"]: Path(v["source"]) for v in service.get("volumes", ()) if v["type"] == "bind"
    }


def test_prometheus_scrapes_the_server(resolved: dict) -> None:
    yaml = module("yaml")
    prometheus = resolved["services"]["prometheus"]
    config_path = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # rule_files are relative to the config file: the rules folder must be mounted beside it.
    assert mounts(prometheus)["/etc/prometheus/rules"] == config_path.parent / "rules"
    assert config["rule_files"] == ["rules/*.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in resolved["services"]
    server_ports = {p["target"] for p in resolved["services"][host]["ports"]}
    assert int(port) in server_ports


def test_grafana_is_provisioned(resolved: dict) -> None:
    yaml = module("yaml")
    grafana = resolved["services"]["grafana"]
    paths = mounts(grafana)
    provisioning = paths["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in resolved["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "vsp.yml").read_text())["providers"]
    dashboards = paths[provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).read_text() == DASHBOARD.read_text()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# ---------------------------------------------------------------------------------------
# The dashboard, without a server (tests/test_deploy_prometheus.py runs its queries live)
# ---------------------------------------------------------------------------------------


# Run in a fresh interpreter: the collectors are process-global, and other tests count them.
EXPORTED_NAMES = """
import json
from prometheus_client import REGISTRY
from vllm_safety_patch.server import metrics
metrics.metrics()
# A labelled family with no child yet has no samples: name its series from its type.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
names = [f.name + s for f in REGISTRY.collect() for s in SUFFIXES.get(f.type, ("",))]
print(json.dumps(names))
"""


def our_exported_names() -> set[str]:
    """Series names of the project's own collectors, made as the server makes them."""
    result = subprocess.run(
        [sys.executable, "-c", EXPORTED_NAMES], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


def test_dashboard_covers_the_issue() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"] for panel in dashboard["panels"])
    for wanted in ("Refusal rate by language × delta set", "Replicas per active delta set"):
        assert wanted in titles
    for wanted in ("Throughput", "Latency"):
        assert wanted in titles
    annotations = {item["name"] for item in dashboard["annotations"]["list"]}
    assert {"Hot-patch", "Hot-patch failure", "Canary"} <= annotations
    # Issue 14: the canary's probe figures, and an annotation per activation it probed.
    canary = next(panel for panel in dashboard["panels"] if panel["title"].startswith("Canary:"))
    assert "vsp_canary_refusal_ratio" in canary["targets"][0]["expr"]
    # Every panel reads the provisioned Prometheus through the data source variable.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uses_only_exported_vsp_metrics() -> None:
    used = set().union(*(promql_metric_names(e) for e in dashboard_queries())) | variable_metrics()
    ours = {name for name in used if not name.startswith("vllm:")}
    exported = our_exported_names()
    assert ours <= exported, f"not exported: {sorted(ours - exported)}"
    assert {"vsp_requests_total", "vsp_refusals_total", "vsp_active_delta_set_info"} <= ours
    assert {"vsp_canary_refusal_ratio", "vsp_canary_runs_total"} <= ours
