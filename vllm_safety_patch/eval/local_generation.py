"""Greedy chat generation in-process with transformers (no server): what the solver uses to
measure a delta's effect, with the same prompts and judge as the harness."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def generate_chat(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy replies to single-turn chats, in the order of ``prompts``."""
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        for text in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    replies: list[str] = [""] * len(encoded)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    try:
        for start in range(0, len(order), batch_size):
            items = order[start : start + batch_size]
            inputs = tokenizer(
                [encoded[index] for index in items],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for row, index in enumerate(items):
                replies[index] = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
            if on_batch:
                on_batch(len(items))
    finally:
        tokenizer.padding_side = previous_side
    return replies
