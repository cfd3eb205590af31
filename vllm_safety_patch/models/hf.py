"""A checkpoint folder loaded whole into transformers: for the commands that run the model
in-process with PyTorch (scan, localize, and measure and eval with --engine transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_causal_lm(model_dir: Path, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)``: the model in eval mode, its weights in ``dtype`` (the name of a
    torch dtype, as the solver settings write it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return model, tokenizer
