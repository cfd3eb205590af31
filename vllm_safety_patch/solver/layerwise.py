"""Run a decoder model one layer at a time over a fixed set of prompt batches.

The sequential solve edits layer l and must see its effect at layer l+1 without running the
earlier layers again. So every batch's residual stream is kept between layers and each layer
is run over all batches before the next. The inputs the model gives its first layer (causal
mask, rotary embeddings, position ids, any embedding scaling) are captured from the model's
own forward, which keeps this generic over HF decoders (Qwen2, Llama, Mistral, Gemma).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_safety_patch.errors import VSPError


class _StopForward(Exception):
    pass


@dataclass
class TokenBatch:
    """Right-padded prompts; padding comes after the real tokens, so causal attention keeps
    every real position exactly as it would be without padding."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    lengths: torch.Tensor  # [B]
    items: list[int]  # indices into the caller's prompt list
    hidden: torch.Tensor | None = None
    layer_kwargs: dict[str, Any] = field(default_factory=dict)

    def last_positions(self, count: int = 1) -> torch.Tensor:
        """[B, count] indices of each prompt's last ``count`` tokens (oldest first)."""
        offsets = torch.arange(count - 1, -1, -1)
        return (self.lengths[:, None] - 1 - offsets[None, :]).clamp(min=0)

    def last_rows(self, activations: torch.Tensor, count: int = 1) -> torch.Tensor:
        """[B, count, n]: each prompt's last ``count`` real tokens of ``activations``."""
        positions = self.last_positions(count)
        return activations[torch.arange(activations.shape[0])[:, None], positions]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers):
        raise VSPError(
            f"{type(model).__name__} has no model.layers",
            "use a decoder-only HF model (Qwen2, Llama, Mistral, Gemma)",
        )
    mlp = getattr(layers[0], "mlp", None)
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        raise VSPError(
            f"{type(model).__name__} has no gated MLP (gate_proj, up_proj, down_proj)",
            "the edit targets gated-MLP decoders (Qwen2, Llama, Mistral, Gemma)",
        )
    return layers


def chat_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """One user turn chat-templated with the generation prompt, at most ``max_tokens`` long."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)[-max_tokens:]  # keep the end: the generation prompt decides the answer


def tokenize_chats(
    tokenizer, prompts: Sequence[str], batch_size: int, max_tokens: int
) -> list[TokenBatch]:
    """Chat-template every prompt, sort by length (little padding), batch."""
    encoded = [chat_ids(tokenizer, text, max_tokens) for text in prompts]
    order = sorted(range(len(encoded)), key=lambda index: (len(encoded[index]), index))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(order), batch_size):
        items = order[start : start + batch_size]
        width = max(len(encoded[index]) for index in items)
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, index in enumerate(items):
            ids = encoded[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        lengths = mask.sum(dim=1)
        batches.append(TokenBatch(input_ids, mask, lengths, items))
    return batches


class LayerwiseForward:
    """Holds each batch's residual stream; advances all batches one layer at a time."""

    def __init__(self, model: torch.nn.Module, batches: list[TokenBatch]) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.batches = batches
        self.next_layer = 0

    @torch.no_grad()
    def start(self) -> None:
        """Embed every batch and capture the arguments the model passes to its layers."""
        captured: dict[str, Any] = {}

        def grab(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {
                key: value for key, value in kwargs.items() if key != "hidden_states"
            }
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for batch in self.batches:
                try:
                    self.model.model(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        use_cache=False,
                    )
                except _StopForward:
                    pass
                batch.hidden = captured["hidden"].detach()
                batch.layer_kwargs = captured["kwargs"]
        finally:
            handle.remove()
        self.next_layer = 0

    @torch.no_grad()
    def run_layer(
        self,
        on_down_proj_input: Callable[[TokenBatch, torch.Tensor], None] | None = None,
        advance: bool = True,
        site: str = "down_proj",
    ) -> int:
        """Advance every batch through the next layer; report each ``down_proj`` input (the
        neurons' activations), with ``site="mlp"`` each MLP input (the normed residual
        stream that gate_proj and up_proj read), with ``site="o_proj"`` each attention
        output projection's input (the heads' outputs, concatenated).

        ``advance=False`` only reports: the residual streams stay where they were."""
        index = self.next_layer
        layer = self.layers[index]
        handle = None
        current: dict[str, TokenBatch] = {}
        if on_down_proj_input is not None:

            def observe(module, args):
                on_down_proj_input(current["batch"], args[0])

            modules = {
                "down_proj": layer.mlp.down_proj,
                "mlp": layer.mlp,
                "o_proj": layer.self_attn.o_proj,
            }
            module = modules[site]
            handle = module.register_forward_pre_hook(observe)
        try:
            for batch in self.batches:
                current["batch"] = batch
                output = layer(batch.hidden, **batch.layer_kwargs)
                if advance:
                    batch.hidden = output[0] if isinstance(output, tuple) else output
        finally:
            if handle is not None:
                handle.remove()
        if advance:
            self.next_layer += 1
        return index
