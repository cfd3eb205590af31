"""base + delta, the merged checkpoint and base + the exported LoRA give the same logits."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import make_delta
from transformers import AutoModelForCausalLM

from vllm_safety_patch.delta.export import write_merged_checkpoint
from vllm_safety_patch.delta.export_peft import lora_factors, write_peft_adapter
from vllm_safety_patch.models.checkpoint import Checkpoint


def test_lora_factors_are_the_update(tiny_qwen2: Path) -> None:
    delta, _ = make_delta(tiny_qwen2)
    for name, edit in delta.edits.items():
        lora_a, lora_b = lora_factors(delta)[name.removesuffix(".weight")]
        dense = torch.zeros(edit.spec.shape)
        if edit.spec.axis == "columns":
            dense[:, edit.neurons] = edit.update()
        else:
            dense[edit.neurons, :] = edit.update()
        assert torch.allclose(lora_b @ lora_a, dense, atol=1e-6)


@pytest.mark.parametrize("architecture", ["tiny_qwen2", "tiny_llama"])
def test_merged_and_lora_match(architecture: str, request, tmp_path: Path) -> None:
    model_dir: Path = request.getfixturevalue(architecture)
    delta, _ = make_delta(model_dir, seed=3)
    merged = write_merged_checkpoint(Checkpoint(model_dir), [delta], tmp_path / "merged")
    adapter = write_peft_adapter(delta, str(model_dir), tmp_path / "lora")
    ids = torch.tensor([[5, 17, 80, 120, 33, 200, 7]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        base_logits = base(input_ids=ids).logits
        merged_logits = (
            AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
            .eval()(input_ids=ids)
            .logits
        )
        lora = peft.PeftModel.from_pretrained(base, adapter).eval()
        lora_logits = lora(input_ids=ids).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4)  # the delta matters
    assert torch.allclose(merged_logits, lora_logits, atol=1e-4)


def test_cli_export_both_formats(tiny_qwen2: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vllm_safety_patch.cli import app

    _, blob = make_delta(tiny_qwen2, seed=4)
    delta_file = tmp_path / "d.safetensors"
    delta_file.write_bytes(blob)
    runner = CliRunner()
    for fmt, marker in (("peft", "adapter_config.json"), ("merged", "vsp-merged.json")):
        out = tmp_path / fmt
        result = runner.invoke(
            app,
            [
                "export",
                str(delta_file),
                "--out",
                str(out),
                "--format",
                fmt,
                "--model",
                str(tiny_qwen2),
            ],
        )
        assert result.exit_code == 0, result.output
        assert (out / marker).is_file()
    bad = runner.invoke(
        app,
        [
            "export",
            str(delta_file),
            "--out",
            str(tmp_path / "x"),
            "--format",
            "onnx",
            "--model",
            str(tiny_qwen2),
        ],
    )
    assert bad.exit_code == 2 and "unknown export format 'onnx'" in bad.output
