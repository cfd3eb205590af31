"""deploy/k8s: the Helm chart renders with Helm's own Go engine (helm-python-sdk binds the
Helm SDK: lint, values schema, templates) and every manifest validates against the
Kubernetes 1.30 OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors).
rollout.sh runs against a stand-in kubectl that records its calls."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_deploy_tools import DEPLOY, module

CHART = DEPLOY / "k8s" / "vllm-safety-patch"
EXAMPLES = DEPLOY / "k8s" / "examples"
KUBERNETES = "1.30"
TOKEN = "chart-admin-token-0123456789"


@pytest.fixture(scope="module")
def helm() -> Any:
    return module("helm_python")


def values_file(name: str) -> dict:
    yaml = module("yaml")
    return yaml.safe_load((EXAMPLES / name).read_text())


def render(helm: Any, values: dict) -> list[dict]:
    """The manifests of a release 'vsp' in namespace 'ai' (NOTES.txt left out)."""
    yaml = module("yaml")
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="vsp", namespace="ai")
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    kinds = {}
    for manifest in manifests:
        assert manifest["kind"] not in kinds, f"two {manifest['kind']}s"
        kinds[manifest["kind"]] = manifest
    return kinds


CASES = {
    "default, chart-made token": {"adminToken": {"value": TOKEN}},
    "gpu example": values_file("gpu.yaml") | {"adminToken": {"existingSecret": "vsp-admin"}},
    "cpu, mounted model and deltas": values_file("cpu-mounted.yaml"),
    "no token, one replica": {"replicaCount": 1, "serviceMonitor": {"enabled": False}},
}


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_renders_and_validates(helm: Any, case: str) -> None:
    report = helm.lint(str(CHART), CASES[case], strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    kubernetes_validate = module("kubernetes_validate")
    for manifest in render(helm, CASES[case]):
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no upstream schema; test_service_monitor_scrapes_the_service
        try:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{manifest['kind']}: {error.message} at {list(error.path)}")


def test_validation_is_strict(helm: Any) -> None:
    """The schema check is real: an unknown field and a wrong type are both refused."""
    kubernetes_validate = module("kubernetes_validate")
    deployment = by_kind(render(helm, {}))["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGett"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    container["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=False)


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container["env"]}


def test_deployment_serves_the_release_values(helm: Any) -> None:
    values = {"adminToken": {"value": TOKEN}, "deltas": "all,east-asian"}
    kinds = by_kind(render(helm, values))
    spec = kinds["Deployment"]["spec"]
    assert spec["replicas"] == 2  # several replicas by default
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = env_of(container)
    assert env["VSP_DELTAS"] == "all,east-asian"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # what vsp serve sets on CPU
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 900
    assert container["resources"]["requests"]["cpu"] == "4"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    # The admin token: a Secret, mounted as a file the entry point passes to vsp serve.
    secret = kinds["Secret"]
    token_volume = next(v for v in pod["volumes"] if v.get("secret"))
    assert token_volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == token_volume["name"])
    item = token_volume["secret"]["items"][0]
    assert env["VSP_ADMIN_TOKEN_FILE"] == f"{mount['mountPath']}/{item['path']}"
    assert item["key"] in secret["data"]
    assert "VSP_ADMIN_TOKEN" not in env  # never the token itself in the pod spec


def test_gpu_variant(helm: Any) -> None:
    values = values_file("gpu.yaml") | {"adminToken": {"existingSecret": "vsp-admin"}}
    kinds = by_kind(render(helm, values))
    assert "Secret" not in kinds  # the existing Secret is used as it is
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith(":gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "VLLM_CPU_KVCACHE_SPACE" not in env_of(container)
    assert container["args"] == ["--max-model-len", "8192", "--gpu-memory-utilization", "0.90"]
    assert next(v for v in pod["volumes"] if v.get("secret"))["secret"]["secretName"] == (
        "vsp-admin"
    )


def test_mounted_model_and_deltas(helm: Any) -> None:
    pod = by_kind(render(helm, values_file("cpu-mounted.yaml")))["Deployment"]["spec"]
    container = pod["template"]["spec"]["containers"][0]
    env = env_of(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model"]["mountPath"] == env["VSP_MODEL"] == "/models/qwen2.5-coder-0.5b-instruct"
    assert mounts["deltas"]["mountPath"] == env["VSP_DELTA_DIR"] == "/deltas"
    volumes = {v["name"]: v for v in pod["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "vsp-model"


def test_no_token_means_no_secret(helm: Any) -> None:
    kinds = by_kind(render(helm, {}))
    assert "Secret" not in kinds
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "VSP_ADMIN_TOKEN_FILE" not in env_of(container)


def test_service_monitor_scrapes_the_service(helm: Any) -> None:
    kinds = by_kind(render(helm, {"serviceMonitor": {"labels": {"release": "prometheus"}}}))
    service, monitor = kinds["Service"], kinds["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["ai"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


BAD_VALUES = [
    ({"variant": "tpu"}, "/variant"),
    ({"deltas": "../../etc/passwd"}, "/deltas"),
    ({"deltas": "all,,th"}, "/deltas"),
    ({"replicaCount": 0}, "/replicaCount"),
    ({"adminToken": {"value": "short"}}, "/adminToken/value"),
    ({"replicas": 3}, "additional properties 'replicas'"),
    ({"model": {"path": "relative/path"}}, "/model/path"),
    ({"vllmArgs": ["--port=9000"]}, "--port is set by the chart"),
    ({"vllmArgs": ["--model", "x"]}, "--model is set by the chart"),
    (
        {"adminToken": {"existingSecret": "a", "value": TOKEN}},
        "give existingSecret or value, not both",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_bad_values_are_refused_by_name(helm: Any, values: dict, message: str) -> None:
    with pytest.raises(Exception) as caught:
        render(helm, values)
    assert type(caught.value).__name__ in {"HelmValuesError", "HelmRenderError"}
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------------
# rollout.sh (finds the pods of a release; the rollout itself: tests/test_safe_rollout.py)
# ---------------------------------------------------------------------------------------

FAKE_KUBECTL = """#!/usr/bin/env bash
# Stand-in kubectl: records each call; lists $FAKE_PODS (name ip port); 'exec' exits
# $EXEC_STATUS (the real rollout against live servers is in tests/test_safe_rollout.py).
echo "$*" >> "$KUBECTL_LOG"
case "$1" in
  get) printf '%b' "${FAKE_PODS:-}" ;;
  exec) echo "rollout output"; exit "${EXEC_STATUS:-0}" ;;
esac
"""
TWO_PODS = "vsp-a 10.0.0.5 8000\\nvsp-b fd00::7 8000\\n"


def run_rollout_sh(
    tmp_path: Path, *args: str, pods: str = TWO_PODS, exec_status: int = 0
) -> tuple[int, str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    log = tmp_path / "kubectl.log"
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", KUBECTL_LOG=str(log))
    env.update(FAKE_PODS=pods, EXEC_STATUS=str(exec_status))
    result = subprocess.run(
        ["bash", str(DEPLOY / "k8s" / "rollout.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return result.returncode, result.stdout + result.stderr, log.read_text().splitlines()


def test_rollout_sh_runs_the_fleet_rollout_in_the_first_pod(tmp_path: Path) -> None:
    code, output, calls = run_rollout_sh(tmp_path, "-n", "ai", "vsp", "all", "east-asian")
    assert code == 0, output
    assert calls[0].startswith("get pods -n ai -l app.kubernetes.io/name=vllm-safety-patch,")
    assert "app.kubernetes.io/instance=vsp" in calls[0] and "status.podIP" in calls[0]
    # One exec: the rollout runs inside the first pod and reaches every pod at its IP.
    assert calls[1:] == [
        "exec -n ai vsp-a -c vsp -- vsp deltas rollout all east-asian "
        "--url http://10.0.0.5:8000 --name vsp-a --url http://[fd00::7]:8000 --name vsp-b "
        "--token-file /var/run/secrets/vsp/admin-token"
    ]
    # The release's values are the source of truth after a restart: say how to update them.
    assert "helm upgrade vsp deploy/k8s/vllm-safety-patch -n ai --reuse-values" in output
    assert "--set deltas=all,east-asian" in output


def test_rollout_sh_passes_on_failure_and_options(tmp_path: Path) -> None:
    code, output, calls = run_rollout_sh(
        tmp_path, "--no-canary", "--token-file", "/t", "vsp", "none", exec_status=3
    )
    assert code == 3 and "helm upgrade" not in output
    assert calls[1].endswith("--token-file /t --no-canary")
    code, output, calls = run_rollout_sh(tmp_path, "vsp", "all", pods="")
    assert code == 1 and "no running pods of release 'vsp'" in output and len(calls) == 1


def test_rollout_sh_usage(tmp_path: Path) -> None:
    for args in (("vsp",), ("--bogus", "vsp", "all"), ("-n",)):
        code, output, calls = run_rollout_sh(tmp_path, *args)
        assert code == 2 and "usage:" in output and calls == [], args
