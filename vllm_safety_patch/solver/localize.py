"""Where refusal fails, per language: activation patching on the base model (``vsp localize``).

A harmful prompt in language X and its English twin (the same MultiJail row) end in the same
chat-template tokens (``<|im_end|>\\n<|im_start|>assistant\\n`` for Qwen): the *decision
positions*, where the reply's first token is chosen. Each site of the forward pass at those
positions is taken from the English run and put into X's run, one site at a time:

- ``resid`` l: the residual stream after decoder layer l (everything the later layers read);
- ``attn`` l / ``mlp`` l: what layer l's attention / MLP adds to it;
- ``dir`` l: only the residual stream's component along the English refusal direction at l
  (English harmful minus English everyday mean at the last prompt token): whether the
  direction alone carries what the English run has and X's lacks;
- ``dirs`` l: the same at layer l and every layer after it (what edits writing the direction
  in several layers would do).

The greedy opening of the reply is judged. *Refusal restored*: the share of X's harmful prompts
refused with the patch (among pairs whose English twin is refused). *Benign refused*: the same
patch on X's everyday requests with their English twins. Beside it, per layer and language and
without any patch: how well a linear read of the residual stream separates X's harmful from X's
everyday requests (held-out accuracy), and how much of English's harmful/everyday separation
along the refusal direction X keeps.

A patch at the decision positions leaves every earlier position as it was, so the prompt before
them runs once per prompt and its key/value cache is shared by all sites (one batch row each).
The patch covers prompt positions only: the first generated token is X's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from vllm_safety_patch.data import load_pairs, load_prompts
from vllm_safety_patch.judge.refusal import is_refusal
from vllm_safety_patch.solver.layerwise import decoder_layers, tokenize_chats

SITE_KINDS = ("resid", "dir", "dirs", "attn", "mlp")
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Site:
    kind: str  # one of SITE_KINDS
    layer: int


@dataclass
class LocalizeRows:
    """Development rows: patching pairs (harmful, everyday) and probe rows per language."""

    harmful_ids: Sequence[int] = range(100, 124)  # MultiJail (fit rows; held-out start at 160)
    everyday_ids: Sequence[int] = range(0, 12)  # everyday train split
    probe_harmful_ids: Sequence[int] = range(0, 64)
    probe_everyday_ids: Sequence[int] = range(96, 160)  # everyday train rows the pairs skip


@dataclass
class SiteCounts:
    refused: int = 0
    total: int = 0

    def add(self, refused: bool) -> None:
        self.refused += int(refused)
        self.total += 1

    @property
    def rate(self) -> float:
        return self.refused / self.total if self.total else float("nan")


@dataclass
class LanguageResult:
    lang: str
    harmful: dict[str, SiteCounts] = field(default_factory=dict)  # site key -> counts
    benign: dict[str, SiteCounts] = field(default_factory=dict)
    opening_agreement: SiteCounts = field(default_factory=SiteCounts)  # opening == full judge
    samples: list[dict] = field(default_factory=list)  # unpatched replies, to read
    probe_accuracy: list[float] = field(default_factory=list)  # per layer
    direction_share: list[float] = field(default_factory=list)  # per layer, English = 1


@dataclass
class LocalizeResult:
    layers: int
    sites: list[str]
    languages: dict[str, LanguageResult]
    english_refused: SiteCounts
    settings: dict
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def site_key(site: Site) -> str:
    return f"{site.kind}:{site.layer}"


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class _Sites:
    """Forward hooks on every layer, attention and MLP: capture or patch the last positions."""

    def __init__(self, model: torch.nn.Module, positions: int) -> None:
        self.layers = decoder_layers(model)
        self.positions = positions
        self.mode = "off"  # "capture" | "patch" | "off"
        self.captured: dict[tuple[str, int], torch.Tensor] = {}  # (kind, layer) -> [K, d]
        self.rows: dict[tuple[str, int], list[int]] = {}  # site -> batch rows it patches
        self.source: dict[tuple[str, int], torch.Tensor] = {}  # the English twin's [K, d]
        self.directions: torch.Tensor | None = None  # [L, d] unit refusal directions
        self.handles = []
        for index, layer in enumerate(self.layers):
            for kind, module in (("resid", layer), ("attn", layer.self_attn), ("mlp", layer.mlp)):
                self.handles.append(module.register_forward_hook(self._hook(kind, index)))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, kind: str, index: int):
        def hook(module, args, output):
            if self.mode == "capture":
                self.captured[(kind, index)] = _main(output)[0, -self.positions :].detach()
            elif self.mode == "patch":
                return self._patch(kind, index, output)
            return None

        return hook

    def _patch(self, kind: str, index: int, output):
        tensor = _main(output)
        if tensor.shape[1] != self.positions:
            return None  # a generated token: not patched
        patched = None
        for site_kind in ("resid", "dir", "dirs") if kind == "resid" else (kind,):
            if site_kind == "dirs":
                rows = [r for layer in range(index + 1) for r in self.rows.get(("dirs", layer), [])]
            else:
                rows = self.rows.get((site_kind, index))
            if not rows:
                continue
            if patched is None:
                patched = tensor.clone()
            english = self.source[(kind, index)]
            if site_kind in ("dir", "dirs"):
                unit = self.directions[index].to(tensor.dtype)
                shift = (english - tensor[rows]) @ unit  # [r, K]
                patched[rows] = tensor[rows] + shift[..., None] * unit
            else:
                patched[rows] = english.to(tensor.dtype)
        return None if patched is None else _replace(output, patched)


def _chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def decision_positions(tokenizer) -> int:
    """How many trailing tokens every chat prompt shares (the template's closing tokens)."""
    first, second = _chat_ids(tokenizer, "a b c"), _chat_ids(tokenizer, "x y z w")
    count = 0
    while count < min(len(first), len(second)) - 1 and first[-1 - count] == second[-1 - count]:
        count += 1
    return max(count, 1)


class _Patcher:
    def __init__(self, model, tokenizer, sites: list[Site], opening_tokens: int) -> None:
        self.model, self.tokenizer, self.sites = model, tokenizer, sites
        self.positions = decision_positions(tokenizer)
        self.hooks = _Sites(model, self.positions)
        self.opening_tokens = opening_tokens
        self.eos = tokenizer.eos_token_id

    @torch.no_grad()
    def capture(self, text: str) -> dict[tuple[str, int], torch.Tensor]:
        """Every site's activation at the decision positions of ``text`` (no patch)."""
        ids = torch.tensor([_chat_ids(self.tokenizer, text)])
        self.hooks.mode = "capture"
        try:
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            self.hooks.mode = "off"
        return dict(self.hooks.captured)

    @torch.no_grad()
    def openings(self, text: str, english: dict[tuple[str, int], torch.Tensor]) -> list[str]:
        """Greedy openings: row 0 unpatched, row i+1 with ``sites[i]`` from ``english``."""
        ids = _chat_ids(self.tokenizer, text)
        prefix, suffix = ids[: -self.positions], ids[-self.positions :]
        rows = len(self.sites) + 1
        out = self.model(input_ids=torch.tensor([prefix]), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(rows)
        self.hooks.rows = {}
        for row, site in enumerate(self.sites, start=1):
            self.hooks.rows.setdefault((site.kind, site.layer), []).append(row)
        self.hooks.source = english
        self.hooks.mode = "patch"
        try:
            step = torch.tensor([suffix] * rows)
            tokens = []
            for _ in range(self.opening_tokens):
                out = self.model(
                    input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                step = out.logits[:, -1].argmax(dim=-1, keepdim=True)
                tokens.append(step)
        finally:
            self.hooks.mode = "off"
        generated = torch.cat(tokens, dim=1)
        return [self._decode(row) for row in generated.tolist()]

    def _decode(self, tokens: list[int]) -> str:
        if self.eos is not None and self.eos in tokens:
            tokens = tokens[: tokens.index(self.eos)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def full_reply(self, text: str, tokens: int) -> str:
        ids = torch.tensor([_chat_ids(self.tokenizer, text)])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=self.eos,
        )
        return self._decode(out[0, ids.shape[1] :].tolist())


@torch.no_grad()
def _last_token_states(model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    """[prompts, layers, d]: the residual stream after each layer at the last prompt token."""
    result = torch.zeros(len(texts), len(decoder_layers(model)), model.config.hidden_size)
    for batch in tokenize_chats(tokenizer, texts, batch_size, max_tokens=256):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        states = torch.stack(out.hidden_states[1:], dim=1)  # [B, layers, L, d]
        last = states[torch.arange(states.shape[0]), :, batch.lengths - 1]
        result[batch.items] = last.float()
    return result


def probe_accuracy(positive: torch.Tensor, negative: torch.Tensor, folds: int = 4) -> float:
    """Held-out accuracy of a shrinkage-LDA read separating two classes ([n, d] each)."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = order[torch.isin(order, test, invert=True)]
        xt, yt = x[train], y[train]
        mu1, mu0 = xt[yt == 1].mean(0), xt[yt == 0].mean(0)
        centred = torch.cat([xt[yt == 1] - mu1, xt[yt == 0] - mu0])
        cov = centred.T @ centred / max(len(centred) - 1, 1)
        # Half shrinkage to the scaled identity: d >> n here, the plain covariance is singular.
        cov = 0.5 * cov + 0.5 * torch.eye(len(cov), dtype=cov.dtype) * torch.trace(cov) / len(cov)
        w = torch.linalg.solve(cov, mu1 - mu0)
        bias = -w @ (mu1 + mu0) / 2
        predicted = (x[test] @ w + bias > 0).double()
        correct += int((predicted == y[test]).sum())
    return correct / len(x)


def localize(
    model,
    tokenizer,
    languages: list[str],
    rows: LocalizeRows,
    layers: list[int],
    kinds: Sequence[str] = SITE_KINDS,
    opening_tokens: int = 8,
    reply_tokens: int = 40,
    progress: Progress = _no_progress,
    on_language: Callable[[LocalizeResult], None] | None = None,
) -> LocalizeResult:
    """Patch every site for each language in turn; ``on_language`` gets the result so far
    after each language (a long run saves what it has)."""
    started = time.perf_counter()
    num_layers = len(decoder_layers(model))
    sites = [Site(kind, layer) for kind in kinds for layer in layers]

    # Probe rows: the last-token residual stream at every layer, no patch.
    english_harm = [p.text for p in load_prompts("multijail", "en", ids=rows.probe_harmful_ids)]
    english_day = [
        p.text for p in load_prompts("everyday", "en", "train", ids=rows.probe_everyday_ids)
    ]
    en_states = _last_token_states(model, tokenizer, english_harm + english_day, 8)
    en_harm, en_day = en_states[: len(english_harm)], en_states[len(english_harm) :]
    direction = en_harm.mean(0) - en_day.mean(0)  # [layers, d]
    units = direction / direction.norm(dim=-1, keepdim=True)
    en_gap = ((en_harm.mean(0) - en_day.mean(0)) * units).sum(-1)

    def probed(lang: str) -> LanguageResult:
        harm = [p.text for p in load_prompts("multijail", lang, ids=rows.probe_harmful_ids)]
        day = [p.text for p in load_prompts("everyday", lang, "train", ids=rows.probe_everyday_ids)]
        states = _last_token_states(model, tokenizer, harm + day, 8)
        h, b = states[: len(harm)], states[len(harm) :]
        result = LanguageResult(lang)
        result.probe_accuracy = [
            round(probe_accuracy(h[:, layer], b[:, layer]), 3) for layer in range(num_layers)
        ]
        gap = ((h.mean(0) - b.mean(0)) * units).sum(-1) / en_gap
        result.direction_share = [round(float(v), 3) for v in gap]
        return result

    patcher = _Patcher(model, tokenizer, sites, opening_tokens)
    patcher.hooks.directions = units
    english_refused = SiteCounts()
    result_so_far = LocalizeResult(
        layers=num_layers,
        sites=[site_key(site) for site in sites],
        languages={},
        english_refused=english_refused,
        settings={
            "harmful_ids": _span(rows.harmful_ids),
            "everyday_ids": _span(rows.everyday_ids),
            "probe_harmful_ids": _span(rows.probe_harmful_ids),
            "probe_everyday_ids": _span(rows.probe_everyday_ids),
            "decision_positions": patcher.positions,
            "opening_tokens": opening_tokens,
            "reply_tokens": reply_tokens,
        },
    )
    try:
        harmful_pairs = {
            lang: load_pairs("multijail", lang, ids=rows.harmful_ids) for lang in languages
        }
        everyday_pairs = {
            lang: list(
                zip(
                    load_prompts("everyday", "en", "train", ids=rows.everyday_ids),
                    load_prompts("everyday", lang, "train", ids=rows.everyday_ids),
                    strict=True,
                )
            )
            for lang in languages
        }
        # English twins: captured once, reused by every language.
        twins: dict[str, dict] = {}
        refused_twins: set[int] = set()
        for english, _ in next(iter(harmful_pairs.values())):
            twins[f"h{english.index}"] = patcher.capture(english.text)
            refused = is_refusal(patcher.full_reply(english.text, reply_tokens), "en")
            english_refused.add(refused)
            if refused:
                refused_twins.add(english.index)
        for english, _ in next(iter(everyday_pairs.values())):
            twins[f"b{english.index}"] = patcher.capture(english.text)
        total = sum(len(refused_twins) + len(everyday_pairs[lang]) for lang in languages)
        done = 0
        for lang in languages:
            result = probed(lang)
            for kind, pairs, table in (
                ("h", harmful_pairs[lang], result.harmful),
                ("b", everyday_pairs[lang], result.benign),
            ):
                for english, prompt in pairs:
                    if kind == "h" and english.index not in refused_twins:
                        continue  # English does not refuse it: nothing to restore
                    openings = patcher.openings(prompt.text, twins[f"{kind}{english.index}"])
                    verdicts = [is_refusal(text, lang) for text in openings]
                    table.setdefault("none", SiteCounts()).add(verdicts[0])
                    for site, verdict in zip(sites, verdicts[1:], strict=True):
                        table.setdefault(site_key(site), SiteCounts()).add(verdict)
                    if kind == "h":
                        reply = patcher.full_reply(prompt.text, reply_tokens)
                        full = is_refusal(reply, lang)
                        result.opening_agreement.add(full == verdicts[0])
                        result.samples.append(
                            {"id": english.index, "opening": openings[0], "reply": reply}
                        )
                    done += 1
                    progress("patch", done, total)
            result_so_far.languages[lang] = result
            result_so_far.seconds = round(time.perf_counter() - started, 1)
            if on_language is not None:
                on_language(result_so_far)
    finally:
        patcher.hooks.close()
    return result_so_far


def _span(ids: Sequence[int]) -> str:
    ids = list(ids)
    return f"{min(ids)}-{max(ids) + 1}" if ids else "none"
