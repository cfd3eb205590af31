"""vllm_safety_patch/settings.py: every VSP_* variable once, its one number parser, the one
admin-token reader (environment and file, hostile files included), the delta folder rule, and
the README's table and deploy/'s KV-cache figure kept equal to the module."""

from __future__ import annotations

import ast
import math
import os
import re
import stat
from pathlib import Path

import pytest

from vllm_safety_patch import settings
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.server import canary
from vllm_safety_patch.settings import (
    ADMIN_TOKEN,
    ADMIN_TOKEN_FILE,
    NumberVariable,
    TokenConfigError,
    read_admin_token,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vllm_safety_patch"
TOKEN = "settings-admin-token-0123456789"
NUMBERS = [v for v in settings.VARIABLES if isinstance(v, NumberVariable)]
ROOT_USER = os.geteuid() == 0


def token_file(folder: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = folder / "admin-token"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


# ---------------------------------------------------------------------------------------
# Each name once, and nowhere else
# ---------------------------------------------------------------------------------------


def test_each_variable_is_named_once() -> None:
    names = [variable.name for variable in settings.VARIABLES]
    assert len(names) == len(set(names)) == 16
    assert all(name.startswith(settings.PREFIX) for name in names)
    assert all(variable.help and variable.default for variable in settings.VARIABLES)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, docstrings left out (they may talk about variables)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_other_module_spells_a_vsp_name() -> None:
    """Every read (and the one write) goes through settings.py: no other module holds a
    ``VSP_*`` name in its code, so none can read one past it."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text[:60]!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "settings.py"
        for line, text in _code_strings(path)
        if re.search(r"\bVSP_[A-Z]", text)
    ]
    assert found == []


def test_the_readme_table_is_the_module() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = [re.match(r"\| `([A-Z_0-9]+)` \|", row).group(1) for row in rows]  # type: ignore[union-attr]
    assert listed == [variable.name for variable in settings.VARIABLES]
    # Default and help as the module has them, word for word.
    for row, variable in zip(rows, settings.VARIABLES, strict=True):
        assert row == f"| `{variable.name}` | {variable.default} | {variable.help} |"


# ---------------------------------------------------------------------------------------
# The one number parser
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", NUMBERS, ids=lambda v: v.name)
def test_unset_or_empty_is_the_default(variable: NumberVariable) -> None:
    assert variable.number({}) == variable.value
    assert variable.number({variable.name: "  "}) == variable.value
    assert variable.number({variable.name: f" {variable.value:g}\n"}) == variable.value


@pytest.mark.parametrize("variable", NUMBERS, ids=lambda v: v.name)
@pytest.mark.parametrize("bad", ["ten", "1,5", "nan", "inf", "-inf", "-1", "0", "1e9"])
def test_a_bad_number_names_variable_value_and_fix(variable: NumberVariable, bad: str) -> None:
    value = float(bad) if re.fullmatch(r"-?[0-9.e]+", bad) else math.nan
    fine = value > variable.low if variable.low_open else value >= variable.low
    if fine and value <= variable.high and math.isfinite(value):
        assert variable.number({variable.name: bad}) == value
        return
    with pytest.raises(VSPError) as caught:
        variable.number({variable.name: bad})
    error = caught.value
    assert error.problem == f"{variable.name}={bad!r} is not {variable.wanted()}"
    assert (
        error.fix == f"set {variable.name} to e.g. {variable.value:g}, or unset it for that default"
    )
    assert "\n" not in str(error)


def test_the_number_descriptions() -> None:
    assert settings.SWITCH_DRAIN_TIMEOUT_S.wanted() == "a positive number of seconds"
    assert settings.CANARY_PROMPTS.wanted() == "a number from 1 to 64"
    assert settings.CANARY_TIMEOUT_S.wanted() == "a number of seconds from 1 to 3600"
    assert settings.CANARY_ALPHA.wanted() == "a number from 1e-09 to 0.5"


def test_a_long_bad_value_is_cut_in_the_message() -> None:
    with pytest.raises(VSPError) as caught:
        settings.SHUTDOWN_TIMEOUT_S.number({"VSP_SHUTDOWN_TIMEOUT_S": "x" * 500})
    assert len(caught.value.problem) < 120


def test_counts_are_whole_numbers() -> None:
    assert settings.CANARY_PROMPTS.integer({"VSP_CANARY_PROMPTS": "6"}) == 6
    # Truncated, as the canary always read them.
    assert settings.CANARY_PROMPTS.integer({"VSP_CANARY_PROMPTS": "6.9"}) == 6


def test_the_canary_and_the_launcher_use_the_same_parser() -> None:
    from vllm_safety_patch.serve import check_server_settings

    parsed = canary.settings_from_env({"VSP_CANARY_TIMEOUT_S": "90", "VSP_CANARY_ALPHA": "0.05"})
    assert (parsed.timeout_s, parsed.alpha, parsed.prompts) == (90.0, 0.05, 12)
    for name, bad in (
        ("VSP_CANARY_MAX_TOKENS", "513"),
        ("VSP_SWITCH_DRAIN_TIMEOUT_S", "0"),
        ("VSP_SEND_STALL_TIMEOUT_S", "soon"),
        ("VSP_SHUTDOWN_TIMEOUT_S", "-3"),
    ):
        with pytest.raises(VSPError, match=f"^{name}={bad!r} is not a"):
            check_server_settings({name: bad})
    check_server_settings({})


# ---------------------------------------------------------------------------------------
# The one admin-token reader: environment
# ---------------------------------------------------------------------------------------


def test_no_token_configured() -> None:
    assert read_admin_token({}) is None
    assert read_admin_token({ADMIN_TOKEN_FILE.name: ""}) is None  # empty: unset


def test_a_token_from_the_environment() -> None:
    assert read_admin_token({ADMIN_TOKEN.name: TOKEN}) == TOKEN
    assert read_admin_token({ADMIN_TOKEN.name: f"  {TOKEN}\n"}) == TOKEN


@pytest.mark.parametrize(
    "value", ["", "short", "x" * 15, "admin token with spaces inside", "tab\tinside-0123456789"]
)
def test_a_weak_token_in_the_environment_is_refused(value: str) -> None:
    with pytest.raises(TokenConfigError) as caught:
        read_admin_token({ADMIN_TOKEN.name: value})
    assert caught.value.problem.startswith(f"the {ADMIN_TOKEN.name} holds a token of ")
    assert "at least 16" in caught.value.problem
    assert "--admin-token-file" in caught.value.fix and "umask 077" in caught.value.fix


def test_sixteen_characters_are_enough() -> None:
    assert read_admin_token({ADMIN_TOKEN.name: "x" * 16}) == "x" * 16


# ---------------------------------------------------------------------------------------
# The one admin-token reader: files, hostile ones included
# ---------------------------------------------------------------------------------------


def test_a_token_file_with_a_trailing_newline(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN + "\n")
    assert read_admin_token({}, token_file=path) == TOKEN
    assert read_admin_token({ADMIN_TOKEN_FILE.name: str(path)}) == TOKEN
    assert read_admin_token({}, token_file=token_file(tmp_path, TOKEN + "\r\n")) == TOKEN


def test_the_file_wins_over_the_variable(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    assert read_admin_token({ADMIN_TOKEN_FILE.name: str(path), ADMIN_TOKEN.name: "x"}) == TOKEN
    # The flag's file wins over the variable's.
    (tmp_path / "other").mkdir()
    other = token_file(tmp_path / "other", "another-admin-token-0123456789")
    assert (
        read_admin_token({ADMIN_TOKEN_FILE.name: str(path)}, token_file=other)
        == "another-admin-token-0123456789"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440, 0o660])
def test_owner_and_group_may_read_it(tmp_path: Path, mode: int) -> None:
    assert read_admin_token({}, token_file=token_file(tmp_path, mode=mode)) == TOKEN


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o444, 0o602, 0o666])
def test_a_file_other_users_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path, mode=mode)
    with pytest.raises(TokenConfigError) as caught:
        read_admin_token({}, token_file=path)
    assert caught.value.problem == (
        f"the admin token file {path} can be read or written by every user on this machine "
        f"(mode {mode:04o})"
    )
    assert caught.value.fix.startswith(f"chmod o-rw {path}")
    assert TOKEN not in str(caught.value)  # refused before it is read


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    for environ, options, flag in (
        ({}, {"token_file": path}, "--admin-token-file"),
        ({ADMIN_TOKEN_FILE.name: str(path)}, {}, ADMIN_TOKEN_FILE.name),
        ({}, {"token_file": path, "flag": "--token-file"}, "--token-file"),
    ):
        with pytest.raises(TokenConfigError) as caught:
            read_admin_token(environ, **options)
        assert caught.value.problem == f"the admin token file {path} does not exist"
        assert caught.value.fix == f"create it, or point {flag} at a file holding one token"


@pytest.mark.parametrize(
    ("text", "length"),
    [("", 0), ("\n", 0), ("short\n", 5), ("x" * 15 + "\n", 15), ("two tokens-0123456789\n", 21)],
)
def test_a_short_or_spaced_token_in_a_file(tmp_path: Path, text: str, length: int) -> None:
    path = token_file(tmp_path, text)
    with pytest.raises(TokenConfigError) as caught:
        read_admin_token({}, token_file=path)
    assert caught.value.problem.startswith(
        f"the admin token file {path} holds a token of {length} characters or with white space"
    )


def test_not_a_regular_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # opening it would wait for a writer: refused from its stat
    for path in (folder, fifo, Path("/dev/null")):
        with pytest.raises(TokenConfigError, match="is not a regular file"):
            read_admin_token({}, token_file=path)


def test_a_path_that_cannot_be_looked_at(tmp_path: Path) -> None:
    path = token_file(tmp_path) / "below-a-file"
    with pytest.raises(TokenConfigError) as caught:
        read_admin_token({}, token_file=path)
    assert caught.value.problem == (f"cannot read the admin token file {path} (NotADirectoryError)")
    assert caught.value.fix == "point --admin-token-file at a file holding one token"


@pytest.mark.skipif(ROOT_USER, reason="root reads any file")
def test_an_unreadable_file(tmp_path: Path) -> None:
    path = token_file(tmp_path, mode=0o200)
    with pytest.raises(TokenConfigError) as caught:
        read_admin_token({}, token_file=path)
    assert caught.value.problem == f"cannot read the admin token file {path} (PermissionError)"
    assert f"uid {os.getuid()}" in caught.value.fix
    locked = tmp_path / "locked"
    locked.mkdir()
    inside = token_file(locked)
    locked.chmod(0o000)
    try:
        with pytest.raises(TokenConfigError, match="cannot read the admin token file"):
            read_admin_token({}, token_file=inside)
    finally:
        locked.chmod(0o700)


def test_binary_or_huge_files(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" * 20)
    binary.chmod(0o600)
    with pytest.raises(TokenConfigError, match=r"\(UnicodeDecodeError\)"):
        read_admin_token({}, token_file=binary)
    huge = tmp_path / "huge"
    with huge.open("wb") as handle:
        handle.truncate(settings.MAX_TOKEN_FILE_BYTES + 1)
    huge.chmod(0o600)
    with pytest.raises(TokenConfigError, match="bytes, not one token"):
        read_admin_token({}, token_file=huge)


def test_a_link_is_judged_by_its_target(tmp_path: Path) -> None:
    """Kubernetes mounts a Secret's key as a link to the real file (mode 0440 in the chart)."""
    target = token_file(tmp_path, mode=0o440)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert stat.S_ISLNK(link.lstat().st_mode)
    assert read_admin_token({}, token_file=link) == TOKEN


# ---------------------------------------------------------------------------------------
# The same rules everywhere: launcher, API server, client
# ---------------------------------------------------------------------------------------


def test_the_launcher_uses_the_reader(tmp_path: Path, tiny_qwen2: Path) -> None:
    from vllm_safety_patch.serve import build_launch

    common = {"model": tiny_qwen2, "deltas": ["none"], "gpu": False, "check": False}
    good = token_file(tmp_path)
    launch = build_launch(admin_token_file=good, environ={"PATH": "/usr/bin"}, **common)
    assert launch.env[ADMIN_TOKEN_FILE.name] == str(good.resolve())
    assert TOKEN in launch.secrets
    good.chmod(0o644)
    with pytest.raises(TokenConfigError, match="can be read or written by every user"):
        build_launch(admin_token_file=good, environ={"PATH": "/usr/bin"}, **common)
    with pytest.raises(TokenConfigError, match="holds a token of 5 characters"):
        build_launch(environ={"PATH": "/usr/bin", ADMIN_TOKEN.name: "short"}, **common)


def test_the_api_server_uses_the_reader(
    tmp_path: Path, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    from argparse import Namespace

    from vllm_safety_patch.server.plugin import build_state

    path = token_file(tmp_path, mode=0o644)
    monkeypatch.delenv(ADMIN_TOKEN.name, raising=False)
    monkeypatch.setenv(ADMIN_TOKEN_FILE.name, str(path))
    monkeypatch.setenv("VSP_DELTA_DIR", str(tmp_path))
    args = Namespace(model=str(tiny_qwen2), api_key=None)
    with pytest.raises(TokenConfigError, match="can be read or written by every user"):
        asyncio.run(build_state(None, args))
    path.chmod(0o600)
    state = asyncio.run(build_state(None, args))
    assert state.admin_token == TOKEN
    assert state.delta_dir == tmp_path


def test_the_client_uses_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_safety_patch.cli.client import admin_token

    monkeypatch.delenv(ADMIN_TOKEN.name, raising=False)
    monkeypatch.setenv(ADMIN_TOKEN_FILE.name, "/nonexistent")  # the client never reads it
    assert admin_token(None) is None
    path = token_file(tmp_path)
    assert admin_token(path) == TOKEN
    path.chmod(0o644)
    with pytest.raises(TokenConfigError) as caught:
        admin_token(path)
    assert "every user" in caught.value.problem
    with pytest.raises(TokenConfigError) as caught:
        admin_token(tmp_path / "absent")
    assert caught.value.fix == "create it, or point --token-file at a file holding one token"
    monkeypatch.setenv(ADMIN_TOKEN.name, "short")
    with pytest.raises(TokenConfigError, match="holds a token of 5 characters"):
        admin_token(None)
    monkeypatch.setenv(ADMIN_TOKEN.name, TOKEN)
    assert admin_token(None) == TOKEN


def test_deploy_mounts_token_files_no_other_user_can_read() -> None:
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    secret = compose.split("      - source: vsp_admin_token\n", 1)[1].split("\n    ports:", 1)[0]
    assert 'uid: "10001"' in secret and "mode: 0o400" in secret
    chart = ROOT / "deploy" / "k8s" / "vllm-safety-patch" / "templates" / "deployment.yaml"
    assert "defaultMode: 0440" in chart.read_text()


# ---------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------


def test_vsp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSP_HOME", str(tmp_path))
    assert settings.vsp_home() == tmp_path
    assert settings.default_model_dir() == tmp_path / "models" / settings.DEFAULT_MODEL_NAME
    monkeypatch.setenv("VSP_HOME", "")
    assert settings.vsp_home() == Path.home() / ".cache" / "vllm-safety-patch"
    assert settings.vsp_home({"VSP_HOME": "~/x"}) == Path.home() / "x"


def test_delta_dir_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSP_HOME", str(tmp_path / "home"))
    deltas = ROOT / "deltas"
    default = settings.default_model_dir()
    default.mkdir(parents=True)
    # The default model under any path that reaches it, a catalogue name, another folder.
    link = tmp_path / "elsewhere"
    link.symlink_to(default)
    assert settings.delta_dir_for(default) == deltas / settings.DEFAULT_MODEL_NAME
    assert settings.delta_dir_for(link) == deltas / settings.DEFAULT_MODEL_NAME
    assert settings.delta_dir_for("qwen2.5-coder-1.5b-instruct") == (
        deltas / "qwen2.5-coder-1.5b-instruct"
    )
    assert settings.delta_dir_for(tmp_path / "my-model") == deltas / "my-model"
    assert settings.served_delta_dir(tmp_path / "my-model", {}) == deltas / "my-model"
    assert settings.served_delta_dir(default, {"VSP_DELTA_DIR": "/srv/d"}) == Path("/srv/d")


def test_split_list_and_same_path(tmp_path: Path) -> None:
    # One list reader for options and variables: stripped, empty items dropped.
    assert settings.split_list(" a, b,,c ") == ["a", "b", "c"]
    assert settings.split_list(None) == settings.split_list("") == settings.split_list(" , ") == []
    assert settings.split_list(f"a{os.pathsep} b,c", "," + os.pathsep) == ["a", "b", "c"]
    assert settings.split_list(f"a{os.pathsep}b,c", os.pathsep) == ["a", "b,c"]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert settings.same_path(tmp_path / "link", str(tmp_path / "real"))
    assert not settings.same_path(tmp_path / "link", tmp_path)


# ---------------------------------------------------------------------------------------
# The CPU KV cache: one figure, in the code and in deploy/
# ---------------------------------------------------------------------------------------


def test_the_code_sets_the_one_kv_cache_default(tiny_qwen2: Path) -> None:
    from vllm_safety_patch.eval.vllm_offline import _cpu_environment
    from vllm_safety_patch.serve import build_launch

    launch = build_launch(
        model=tiny_qwen2, deltas=["none"], environ={"PATH": "/usr/bin"}, gpu=False, check=False
    )
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == str(settings.CPU_KV_CACHE_GIB)
    assert _cpu_environment().get("VLLM_CPU_KVCACHE_SPACE") == os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE", str(settings.CPU_KV_CACHE_GIB)
    )


def test_deploy_uses_the_same_kv_cache_default() -> None:
    deploy = ROOT / "deploy"
    gib = settings.CPU_KV_CACHE_GIB
    dockerfile = (deploy / "docker" / "cpu.Dockerfile").read_text()
    assert re.findall(r"VLLM_CPU_KVCACHE_SPACE=(\d+)", dockerfile) == [str(gib)]
    compose = (deploy / "compose.yaml").read_text()
    assert re.findall(r"VLLM_CPU_KVCACHE_SPACE:-(\d+)", compose) == [str(gib)]
    values = (deploy / "k8s" / "vllm-safety-patch" / "values.yaml").read_text()
    assert re.findall(r"^cpuKvCacheGiB: (\d+)", values, re.MULTILINE) == [str(gib)]
    readme = (deploy / "README.md").read_text()
    assert set(re.findall(r"VLLM_CPU_KVCACHE_SPACE=(\d+)", readme)) == {str(gib)}
