"""Helpers for the solver tests: what a module of a real HF model receives at the last token."""

from __future__ import annotations

import torch


def last_token_input(model, tokenizer, text: str, module: torch.nn.Module) -> torch.Tensor:
    """``module``'s input at the last prompt token of ``text`` (chat-templated), float64."""
    captured = {}
    handle = module.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return captured["x"][0, -1].double()
