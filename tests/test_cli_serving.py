"""``vsp serve`` and the serving CLI as a newcomer and an operator meet them (issues 13, 15).

What runs for real: the ``vsp`` console script, ``deploy/docker/entrypoint.sh`` (as root and
as the images' uid 10001), and one ``vsp serve`` of a tiny model prepared the way
``vsp model prepare`` prepares the default one (its download and GGUF conversion replaced by
a tiny checkpoint written with transformers' ``save_pretrained``, which writes 0600).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import make_delta
from serving_helpers import (
    engine_env,
    free_port,
    request,
    start_logged,
    stop_process_group,
    vsp_command,
    wait_healthy,
)
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.cli.client import server_root
from vllm_safety_patch.config import DEFAULT_MODEL_NAME
from vllm_safety_patch.models import default_model
from vllm_safety_patch.models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"
TOKEN = "cli-serving-admin-token-0123456789"
API_KEY = "cli-serving-api-key-0123456789"
IMAGE_UID = 10001  # the Dockerfiles' USER
START_TIMEOUT_S = 360

runner = CliRunner()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's vsp/vLLM settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSP_", "VLLM_"))}
    env.update(extra)
    return env


def runner_env(**extra: str) -> dict[str, str | None]:
    """The same for CliRunner, which only overlays its ``env`` (None unsets)."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith(("VSP_", "VLLM_"))}
    return {**unset, **extra}


def modes(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Path:
    folder = tmp_path_factory.mktemp("serving-deltas")
    for group in ("th", "east-asian"):
        (folder / f"{group}.safetensors").write_bytes(make_delta(tiny_qwen2, group=group)[1])
    return folder


def serve(*args: str, **env: str):
    return runner.invoke(app, ["serve", *args], env=runner_env(**env))


def request_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return reply.read().decode()


# ---------------------------------------------------------------------------------------
# Options before '--' (issue 15)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--delta", "east-asian"], "no option --delta. Fix: did you mean --deltas?"),
        (["--delta=east-asian"], "did you mean --deltas?"),
        (["--dryrun"], "did you mean --dry-run?"),
        (["--max-model-len", "64"], "vsp serve [OPTIONS] -- --max-model-len"),
        (["east-asian"], "takes no argument 'east-asian'"),
    ],
)
def test_unknown_options_before_the_separator_are_refused(
    args: list[str], words: str, tiny_qwen2: Path, deltas: Path
) -> None:
    result = serve("--model", str(tiny_qwen2), "--delta-dir", str(deltas), *args, "--dry-run")
    assert result.exit_code == 2
    assert result.stdout == ""  # nothing launched, nothing printed as a launch
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]
    if "--max-model-len" in args:
        assert "did you mean" not in lines[0]  # no false friend ('--model')


def test_the_issue_typo_from_the_console_script(tiny_qwen2: Path, deltas: Path) -> None:
    """The reported command, as typed: refused before anything reaches vLLM."""
    command = vsp_command("serve", "--delta", "east-asian", "--dry-run")
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "did you mean --deltas?" in result.stderr


def test_vllm_arguments_after_the_separator_still_pass(tiny_qwen2: Path, deltas: Path) -> None:
    result = serve(
        "--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "th", "--dry-run",
        "--", "--max-model-len", "64", "--delta", "x",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["argv"][-4:] == ["--max-model-len", "64", "--delta", "x"]
    twice = serve("--model", str(tiny_qwen2), "--dry-run", "--", "--", "--max-model-len", "64")
    assert twice.exit_code == 2 and "'--' appears twice" in twice.stderr


def test_a_misspelt_delta_name_gets_did_you_mean(tiny_qwen2: Path, deltas: Path) -> None:
    result = serve(
        "--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "eastasian",
        "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert "did you mean east-asian?" in line and "(there: east-asian, th)" in line
    assert "pass --deltas east-asian" in line
    assert "solve" not in line  # a typo is not a 45-minute job
    unrelated = serve("--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "xyz")
    assert unrelated.exit_code == 2
    assert "did you mean" not in unrelated.stderr and "there: east-asian, th" in unrelated.stderr


# ---------------------------------------------------------------------------------------
# Secrets (issue 13, finding 4)
# ---------------------------------------------------------------------------------------


def test_printed_command_lines_carry_no_secret(tiny_qwen2: Path, deltas: Path) -> None:
    result = serve(
        "--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "th", "--dry-run",
        "--", "--api-key", API_KEY, "second-key-0123456789", "--hf-token=hf_secret_token",
        "--seed", "0",
        VSP_ADMIN_TOKEN=TOKEN,
        VLLM_API_KEY="env-api-key-0123456789",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for secret in (API_KEY, "second-key", "hf_secret_token", TOKEN, "env-api-key"):
        assert secret not in result.output
    argv = json.loads(result.stdout)["argv"]
    assert argv[-6:] == ["--api-key", "***", "***", "--hf-token=***", "--seed", "0"]


def test_an_api_key_equal_to_the_admin_token_is_refused(
    tiny_qwen2: Path, deltas: Path, tmp_path: Path
) -> None:
    """Without --dry-run: the real start-up refuses before vLLM is started."""
    token_file = tmp_path / "same-token"
    token_file.write_text(API_KEY + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    command = vsp_command(
        "serve", "--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "th",
        "--admin-token-file", str(token_file), "--port", str(free_port()),
        "--", "--api-key", API_KEY,
    )  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert result.returncode == 2
    assert "equals the admin token" in result.stderr and result.stderr.count("\n") == 1
    assert API_KEY not in result.stdout + result.stderr
    # The same through the environment (VLLM_API_KEY, VSP_ADMIN_TOKEN).
    env_case = serve(
        "--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "th",
        VSP_ADMIN_TOKEN=API_KEY, VLLM_API_KEY=API_KEY,
    )  # fmt: skip
    assert env_case.exit_code == 2 and "equals the admin token" in env_case.stderr
    different = serve(
        "--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "th", "--dry-run",
        VSP_ADMIN_TOKEN=TOKEN, VLLM_API_KEY=API_KEY,
    )  # fmt: skip
    assert different.exit_code == 0, different.output


SECRET = "SECRET-KEY-0123456789abcdef"


def api_key_spelling(spelling: str, folder: Path) -> list[str]:
    """vLLM arguments giving the API key ``SECRET`` in one of the ways vLLM's parser takes."""
    if spelling == "repeat":  # the last one wins
        return ["--api-key", "first-key-0123456789", "--api-key", SECRET]
    if spelling == "--config":
        config = folder / "vllm.yaml"
        config.write_text(f"api-key: {SECRET}\nseed: 0\n")
        return ["--config", str(config)]
    if spelling == "--api-k=":
        return [f"--api-k={SECRET}"]
    return [spelling, SECRET]


@pytest.mark.parametrize("spelling", ["--api_key", "--api-k", "--api-k=", "repeat", "--config"])
def test_every_spelling_of_the_api_key_is_checked_and_redacted(
    spelling: str, tiny_qwen2: Path, deltas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM takes --api_key, any unambiguous prefix, the last of repeated flags and
    --config FILE (issue 20, finding 1): the launcher checks the key vLLM parses, and the
    dry run prints none of them."""
    from vllm_safety_patch import serve as serve_module

    def started(launch: object) -> None:
        raise AssertionError("vLLM was started with an API key equal to the admin token")

    monkeypatch.setattr(serve_module, "exec_launch", started)
    extra = api_key_spelling(spelling, tmp_path)
    common = ["--model", str(tiny_qwen2), "--delta-dir", str(deltas), "--deltas", "th"]
    refused = serve(*common, "--", *extra, VSP_ADMIN_TOKEN=SECRET)
    assert refused.exit_code == 2, refused.output
    assert "equals the admin token" in refused.stderr and SECRET not in refused.output
    shown = serve(*common, "--dry-run", "--", *extra, VSP_ADMIN_TOKEN=TOKEN)
    assert shown.exit_code == 0, shown.output
    assert SECRET not in shown.output and "first-key" not in shown.output
    assert "***" in shown.stdout or spelling == "--config"  # the file's content is not shown


def test_the_plugin_checks_the_api_key_vllm_parsed(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever starts the server, the API-server plugin refuses to come up when the key vLLM
    parsed (args.api_key) is the admin token (issue 20, finding 1)."""
    import asyncio

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_safety_patch.errors import VSPError
    from vllm_safety_patch.server.plugin import build_state

    parser = make_arg_parser(FlexibleArgumentParser())
    monkeypatch.setenv("VSP_ADMIN_TOKEN", SECRET)
    monkeypatch.delenv("VSP_ADMIN_TOKEN_FILE", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    for spelling in ("--api_key", "--api-k", "repeat", "--config"):
        args = parser.parse_args(
            ["--model", str(tiny_qwen2), *api_key_spelling(spelling, tmp_path)]
        )
        assert args.api_key == [SECRET], spelling
        with pytest.raises(VSPError, match="equals the admin token"):
            asyncio.run(build_state(None, args))
    # No key on the command line: VLLM_API_KEY is the key, as vLLM reads it.
    args = parser.parse_args(["--model", str(tiny_qwen2)])
    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    with pytest.raises(VSPError, match="equals the admin token"):
        asyncio.run(build_state(None, args))
    monkeypatch.setenv("VLLM_API_KEY", "another-key-0123456789")
    assert asyncio.run(build_state(None, args)).admin_token == SECRET


# ---------------------------------------------------------------------------------------
# URLs and --version (issue 15)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/ "])
def test_server_urls_with_or_without_v1(suffix: str) -> None:
    assert server_root(" http://127.0.0.1:8000" + suffix) == "http://127.0.0.1:8000"


def test_a_url_without_scheme_is_one_line() -> None:
    result = runner.invoke(app, ["deltas", "list", "--url", "127.0.0.1:8000"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: '127.0.0.1:8000' is not an http(s) URL. Fix: pass e.g. --url http://127.0.0.1:8000"
    )


def test_version() -> None:
    result = subprocess.run(vsp_command("--version"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"vsp \S+ \(vllm \S+, torch \S+\)\n", result.stdout)
    assert result.stdout.startswith(f"vsp {version('vllm-safety-patch')} ")


# ---------------------------------------------------------------------------------------
# The entry point's '--' (issue 13, finding 7)
# ---------------------------------------------------------------------------------------


def dry_run_wrapper(folder: Path, python: str, site_dir: str | None = None) -> Path:
    """A ``vsp`` for the entry point's PATH that adds --dry-run to ``vsp serve``."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    wrapper = folder / "vsp"
    site = f"site.addsitedir({site_dir!r}); " if site_dir else ""
    code = f"import site, sys; {site}from vllm_safety_patch.cli import main; main()"
    wrapper.write_text(
        f'#!/usr/bin/env bash\nexec "{python}" -c "{code}" "$1" --dry-run "${{@:2}}"\n'
    )
    wrapper.chmod(0o755)
    return folder


def run_entrypoint(
    bin_dir: Path, model: Path, deltas: Path, *args: str, user: list[str] | None = None, **env: str
) -> subprocess.CompletedProcess:
    environ = clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        VSP_MODEL=str(model),
        VSP_DELTA_DIR=str(deltas),
        VSP_DELTAS="th",
        **env,
    )
    return subprocess.run(
        [*(user or []), "bash", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=180,
    )


@pytest.mark.parametrize("separator", [["--"], []])
def test_entrypoint_takes_vllm_arguments_with_or_without_separator(
    separator: list[str], tiny_qwen2: Path, deltas: Path, tmp_path: Path
) -> None:
    """`docker run IMAGE -- --max-model-len 8192` (deploy/README.md) and without the `--`."""
    bin_dir = dry_run_wrapper(tmp_path / "bin", sys.executable)
    result = run_entrypoint(bin_dir, tiny_qwen2, deltas, *separator, "--max-model-len", "8192")
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["argv"]
    assert "--" not in argv
    assert argv[-2:] == ["--max-model-len", "8192"]


# ---------------------------------------------------------------------------------------
# A prepared model: modes, the image's uid, the served name (issue 13 finding 6, issue 15)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(deltas: Path) -> Iterator[dict]:
    """``vsp model prepare`` into a world-traversable VSP_HOME (pytest's own temporary
    folders are 0700), the GGUF download and conversion replaced by a tiny checkpoint."""
    root = Path(tempfile.mkdtemp(prefix="vsp-prepared-"))
    try:
        root.chmod(0o755)
        home = root / "home"

        def fake_assemble(downloads: Path, target: Path, progress: object) -> str:
            target.write_bytes(b"GGUF")
            return "0" * 64

        def fake_convert(gguf: Path, out_dir: Path) -> None:
            build_tiny_model(out_dir, "qwen2", seed=0)  # save_pretrained: 0600 weights

        old_umask = os.umask(0o022)  # as in the images' build
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(default_model, "assemble_gguf", fake_assemble)
                patch.setattr(default_model, "convert_gguf", fake_convert)
                model = default_model.prepare_default_model(home=home).path
        finally:
            os.umask(old_umask)
        shipped = root / "deltas"
        shutil.copytree(deltas, shipped)
        os.chmod(shipped, 0o755)
        for item in shipped.iterdir():
            item.chmod(0o644)
        user_home = root / "user-home"
        user_home.mkdir(mode=0o777)
        user_home.chmod(0o777)
        yield {"root": root, "home": home, "model": model, "deltas": shipped, "user": user_home}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_written_checkpoints_are_world_readable(prepared: dict) -> None:
    model_modes = modes(prepared["model"])
    assert model_modes and set(model_modes.values()) == {0o644}, model_modes


@pytest.mark.parametrize("command", ["apply", "export"])
def test_apply_and_export_outputs_respect_the_umask(
    command: str, tiny_qwen2: Path, deltas: Path, tmp_path: Path
) -> None:
    """Under umask 027 every file is 0640: not owner-only, and the umask is obeyed."""
    out = tmp_path / "out"
    args = [command, str(deltas / "th.safetensors"), "--out", str(out), "--model", str(tiny_qwen2)]
    result = subprocess.run(
        vsp_command(*args), capture_output=True, text=True, umask=0o027, timeout=300
    )
    assert result.returncode == 0, result.stderr
    written = modes(out)
    if command == "export":  # --format peft
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(written)
    else:
        assert {"model.safetensors", "config.json", "vsp-merged.json"} <= set(written)
    assert set(written.values()) == {0o640}, written


def image_user_python() -> tuple[str, str | None] | None:
    """An interpreter uid 10001 may run, and the site folder to add when it is not the
    venv's own (a venv under /root is out of its reach); ``None`` when there is none."""
    candidates = [(sys.executable, None)]
    system = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    if system:
        candidates.append((system, sysconfig.get_paths()["purelib"]))
    for python, site_dir in candidates:
        # Through bash, as the wrapper runs it: some sandboxes let execve pass where
        # bash's own checks refuse.
        command = [*as_image_user(), "bash", "-c", f"exec '{python}' -c 'print(1)'"]
        probe = subprocess.run(command, capture_output=True, text=True)
        if probe.stdout == "1\n":
            return python, site_dir
    return None


def as_image_user() -> list[str]:
    return ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="switching to the images' uid needs root and setpriv (CI runs as root)",
)
def test_entrypoint_as_the_image_user_over_a_prepared_model(prepared: dict) -> None:
    """The images prepare the model as root and serve it as uid 10001."""
    owner_only = prepared["root"] / "owner-only"
    owner_only.write_text("x")
    owner_only.chmod(0o600)
    cannot = subprocess.run([*as_image_user(), "test", "-r", str(owner_only)])
    assert cannot.returncode != 0  # the switch really drops root's rights
    found = image_user_python()
    if found is None:
        pytest.skip(f"no Python interpreter that uid {IMAGE_UID} may run")
    bin_dir = dry_run_wrapper(prepared["root"] / "bin", *found)
    result = run_entrypoint(
        bin_dir,
        prepared["model"],
        prepared["deltas"],
        "--",
        "--max-model-len",
        "512",
        user=as_image_user(),
        HOME=str(prepared["user"]),
        VSP_HOME=str(prepared["home"]),
    )
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["argv"]
    assert argv[argv.index("--model") + 1] == str(prepared["model"])
    assert argv[argv.index("--served-model-name") + 1] == DEFAULT_MODEL_NAME
    assert argv[-2:] == ["--max-model-len", "512"]


def test_the_default_model_is_served_under_its_short_id(prepared: dict) -> None:
    env = {"VSP_HOME": str(prepared["home"])}
    result = serve("--delta-dir", str(prepared["deltas"]), "--deltas", "th", "--dry-run", **env)
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)["argv"]
    assert argv[argv.index("--served-model-name") + 1] == DEFAULT_MODEL_NAME
    assert f"as model '{DEFAULT_MODEL_NAME}' with deltas: th.safetensors" in result.stderr
    mine = serve(
        "--delta-dir", str(prepared["deltas"]), "--deltas", "th", "--dry-run",
        "--", "--served-model-name", "mine", **env,
    )  # fmt: skip
    argv = json.loads(mine.stdout)["argv"]
    assert argv.count("--served-model-name") == 1 and argv[-2:] == ["--served-model-name", "mine"]
    assert "as model 'mine'" in mine.stderr


# ---------------------------------------------------------------------------------------
# One real server: the default model's name, /v1 URLs, what the log shows
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(prepared: dict) -> Iterator[dict]:
    token_file = prepared["root"] / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others can read
    port = free_port()
    command = vsp_command(
        "serve", "--delta-dir", str(prepared["deltas"]), "--deltas", "th",
        "--admin-token-file", str(token_file), "--port", str(port),
        "--", "--max-model-len", "512", "--seed", "0", "--api-key", API_KEY,
    )  # fmt: skip
    env = engine_env(sorted(os.sched_getaffinity(0))[-1])
    env["VSP_HOME"] = str(prepared["home"])  # the prepared model is the default model
    log = prepared["root"] / "server.log"
    process = start_logged(command, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        seconds = wait_healthy(process, url, log, START_TIMEOUT_S)
        print(f"\nvsp serve (default model, tiny): healthy after {seconds:.1f} s")
        yield {"url": url, "log": log, "token_file": token_file, "model": prepared["model"]}
    finally:
        stop_process_group(process)


KEYED = {"Authorization": f"Bearer {API_KEY}"}  # the server runs with vLLM's --api-key


def test_served_name_reaches_clients_metrics_and_the_log(server: dict) -> None:
    url, path = server["url"], str(server["model"])
    status, models, _ = request("GET", url + "/v1/models", headers=KEYED)
    assert status == 200 and [m["id"] for m in models["data"]] == [DEFAULT_MODEL_NAME]
    # the card's root names the model, not where the server keeps it
    assert [m["root"] for m in models["data"]] == [DEFAULT_MODEL_NAME]
    assert path not in json.dumps(models)
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "hello", "max_tokens": 4, "temperature": 0}
    status, answer, headers = request("POST", url + "/v1/completions", body, KEYED)
    assert status == 200, answer
    assert headers["x-safety-deltas"].startswith("th@")
    status, listing, _ = request("GET", url + "/v1/safety/deltas", headers=KEYED)
    assert status == 200 and listing["model"] == DEFAULT_MODEL_NAME
    metrics = request_text(url + "/metrics")
    assert f'model_name="{DEFAULT_MODEL_NAME}"' in metrics and path not in metrics
    log = server["log"].read_text()
    assert f"as model '{DEFAULT_MODEL_NAME}'" in log
    assert TOKEN not in log


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_deltas_list_takes_the_url_with_or_without_v1(server: dict, suffix: str) -> None:
    result = runner.invoke(
        app,
        ["deltas", "list", "--url", server["url"] + suffix, "--json"],
        env=runner_env(VLLM_API_KEY=API_KEY),
    )
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["model"] == DEFAULT_MODEL_NAME
    assert sorted(item["name"] for item in listing["available"]) == ["east-asian", "th"]


def test_deltas_activate_takes_the_v1_url(server: dict) -> None:
    url = server["url"] + "/v1"
    token = ["--token-file", str(server["token_file"])]
    keyed = runner_env(VLLM_API_KEY=API_KEY)  # the key in Authorization, the token beside it
    result = runner.invoke(app, ["deltas", "activate", "none", "--url", url, *token], env=keyed)
    assert result.exit_code == 0, result.output
    assert "active: none" in result.stdout
    result = runner.invoke(app, ["deltas", "activate", "th", "--url", url, *token], env=keyed)
    assert result.exit_code == 0, result.output
    assert "active: th@" in result.stdout


@pytest.mark.parametrize("key", [None, "not-the-key-0123456789"])
def test_deltas_commands_name_the_missing_api_key(server: dict, key: str | None) -> None:
    """vLLM's --api-key answers 401 before our routes: the error names VLLM_API_KEY."""
    env = runner_env() if key is None else runner_env(VLLM_API_KEY=key)
    result = runner.invoke(app, ["deltas", "list", "--url", server["url"]], env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HTTP 401"), result.stderr
    assert "Fix: export VLLM_API_KEY=" in lines[0]
    assert ("is not set" if key is None else "is not the server's --api-key") in lines[0]
    assert API_KEY not in result.output
