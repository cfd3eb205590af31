"""``vsp solve``: one sequential pass over the prompts, one closed-form solve per layer.

For each edited layer, in order:
1. run the layer over the English batches (harmful twins, harmless) and score neurons;
2. run it over the other batches, streaming per-language sufficient statistics of the pairs
   (``X X^T`` and ``T X^T`` on the safety neurons) and the benign Gram matrix;
3. solve every group's update from its languages' statistics;
4. add the update's effect to every batch's residual stream, so the next layer is solved on
   activations the earlier edits already moved (``sequential``: one pass per group, each
   moved by its own update, as serving that delta moves them).
No activation outlives its layer: only sums, Gram matrices and the residual stream are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_safety_patch.delta.build import build_delta
from vllm_safety_patch.delta.io import Delta, TensorEdit
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.hf import load_causal_lm
from vllm_safety_patch.solver.closed_form import LayerStatistics, LowRankUpdate, solve_layer
from vllm_safety_patch.solver.input_edit import InputCollector, apply_rows
from vllm_safety_patch.solver.layerwise import (
    LayerwiseForward,
    TokenBatch,
    decoder_layers,
    tokenize_chats,
)
from vllm_safety_patch.solver.neurons import ClassMoments, separation_scores, top_neurons
from vllm_safety_patch.solver.prompts import SolveData, SolvePrompt, gather_solve_data
from vllm_safety_patch.solver.refusal_push import (
    OPENING_TOKENS,
    DecisionSums,
    collect_decisions,
    pooled_direction,
)
from vllm_safety_patch.solver.settings import SolveConfig, SolverSettings
from vllm_safety_patch.solver.statistics import Gram, PairTables, Regression
from vllm_safety_patch.solver.stats_cache import (
    StatsCache,
    checkpoint_digest,
    decisions_key,
    layer_key,
)

SOLVE_METHOD = (
    "sequential closed-form reduced-rank ridge on down_proj columns, each group on its own edits"
)
ATTENTION_SOLVE_METHOD = (
    "sequential closed-form reduced-rank ridge on self_attn.o_proj columns (the attention "
    "output), each group on its own edits"
)
INPUT_SOLVE_METHOD = (
    "sequential closed-form reduced-rank ridge on gate_proj/up_proj rows (the paper's "
    "Algorithm 1), each group on its own edits"
)
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class SolveTimings:
    forward_seconds: float = 0.0  # running layers, hooks included (sums, Gram matrices)
    solve_seconds: float = 0.0  # Cholesky, SVD, propagation
    total_seconds: float = 0.0


@dataclass
class SolveResult:
    deltas: dict[str, Delta]
    blobs: dict[str, bytes]
    neurons: dict[str, dict[int, torch.Tensor]]  # group -> layer -> safety neurons
    timings: SolveTimings
    singular_values: dict[str, dict[int | str, list[float]]] = field(default_factory=dict)


def _real_rows(batch: TokenBatch, activations: torch.Tensor) -> torch.Tensor:
    """All real (non-padding) token rows of ``activations`` [B, L, n] -> [tokens, n]."""
    return activations[batch.attention_mask.bool()]


class _LayerCollector(PairTables):
    """Streams one layer's statistics from down_proj inputs."""

    def __init__(
        self,
        english: list[SolvePrompt],
        others: list[SolvePrompt],
        english_batches: list[TokenBatch],
        weight: torch.Tensor,
        positions: int,
        languages: list[str],
    ) -> None:
        self.english, self.others = english, others
        self.english_batches = {id(batch): batch for batch in english_batches}
        self.weight = weight  # down_proj weight, float32 [d, n]
        self.positions = positions
        width = weight.shape[1]
        # Decision-position moments per language and class, for neuron scoring.
        self.harmful: dict[str, ClassMoments] = {}
        self.harmless: dict[str, ClassMoments] = {}
        self.width = width
        self.english_stash: dict[int, torch.Tensor] = {}  # batch id -> full [B, L, n]
        self.twin_outputs: dict[str, torch.Tensor] = {}  # pair -> W a_en (+ residual) [p, d]
        self.neurons: torch.Tensor | None = None
        self.languages = languages
        self.pair = {lang: Regression() for lang in languages}  # harmful -> English twin
        self.aligned = {lang: Regression() for lang in languages}  # benign -> English twin
        # Benign decision positions per language: with and without an English twin.
        self.decision: dict[str, Gram] = {}
        self.decision_twinned: dict[str, Gram] = {}
        self.benign_gram: torch.Tensor | None = None
        self.benign_tokens = 0
        self.other_stash: dict[int, torch.Tensor] = {}  # batch id -> [B, L, k]
        self.direction: torch.Tensor | None = None  # unit [d]: targets are projected on it
        # With target = 'twin-residual': the residual stream the edited matrix's output is
        # added to, for the batch being observed ([B, L, d]); targets are then residual streams.
        self.residual: Callable[[TokenBatch], torch.Tensor] | None = None

    def _outputs(self, batch: TokenBatch, last: torch.Tensor) -> torch.Tensor:
        """[B, p, d]: what the edited matrix writes at the paired positions, plus the residual
        stream it is added to when the target is the twin's residual stream."""
        written = last @ self.weight.T
        if self.residual is None:
            return written
        return written + batch.last_rows(self.residual(batch).float(), self.positions)

    def _moments(self, table: dict[str, ClassMoments], lang: str) -> ClassMoments:
        if lang not in table:
            table[lang] = ClassMoments(self.width)
        return table[lang]

    def observe_english(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        inputs = inputs.float()
        self.english_stash[id(batch)] = inputs
        last = batch.last_rows(inputs, self.positions)  # [B, p, n]
        outputs = self._outputs(batch, last)
        for row, item in enumerate(batch.items):
            prompt = self.english[item]
            if prompt.pair is not None:
                self.twin_outputs[prompt.pair] = outputs[row]
            harmful = prompt.role == "harmful_en"
            self._moments(self.harmful if harmful else self.harmless, "en").add(last[row])

    def observe_scores(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        """Within-language scoring: decision-position moments of the other languages."""
        last = batch.last_rows(inputs.float(), self.positions)
        for row, item in enumerate(batch.items):
            prompt = self.others[item]
            if prompt.role == "harmful_lr":
                self._moments(self.harmful, prompt.lang).add(last[row])
            elif prompt.role == "benign_lr":
                self._moments(self.harmless, prompt.lang).add(last[row])

    def choose_neurons(self, count: int, scoring: str) -> torch.Tensor:
        if scoring == "english":
            scores = separation_scores(self.harmful["en"], self.harmless["en"])
        else:
            # Mean over languages of each language's own harmful-vs-harmless separation, so
            # a neuron that only tells languages apart scores nothing.
            both = sorted(set(self.harmful) & set(self.harmless))
            scores = sum(separation_scores(self.harmful[g], self.harmless[g]) for g in both)
            scores = scores / len(both)
        self.neurons = top_neurons(scores, count)
        k = self.neurons.numel()
        self.benign_gram = torch.zeros(k, k, dtype=torch.float64)
        # English prompts are benign for the constraint: the edit must leave them as they are.
        # (they were stashed in full because the neurons were not known yet)
        for stash_id, inputs in self.english_stash.items():
            batch = self.english_batches[stash_id]
            rows = _real_rows(batch, inputs)[:, self.neurons].to(torch.float64)
            self.benign_gram += rows.T @ rows
            self.benign_tokens += rows.shape[0]
            last = batch.last_rows(inputs, self.positions)[..., self.neurons]
            for row in range(last.shape[0]):
                self._gram(self.decision, "en").add(last[row])
        return self.neurons

    def _gram(self, table: dict[str, Gram], lang: str) -> Gram:
        if lang not in table:
            table[lang] = Gram(self.neurons.numel())
        return table[lang]

    def observe_other(self, batch: TokenBatch, inputs: torch.Tensor) -> None:
        inputs = inputs.float()
        selected = inputs[..., self.neurons]
        self.other_stash[id(batch)] = selected
        last = batch.last_rows(inputs, self.positions)  # [B, p, n]
        outputs = self._outputs(batch, last)
        for row, item in enumerate(batch.items):
            prompt = self.others[item]
            x = last[row][:, self.neurons]  # [p, k]
            if prompt.role in ("harmful_lr", "benign_lr"):
                twin = self.twin_outputs.get(prompt.pair)
                if twin is None:
                    continue  # its English twin was not loaded (should not happen)
                target = twin - outputs[row]  # [p, d]
                if self.direction is not None:
                    target = (target @ self.direction)[:, None] * self.direction
                table = self.pair if prompt.role == "harmful_lr" else self.aligned
                table[prompt.lang].add(x, target)
                if prompt.role == "harmful_lr":
                    continue
            real = selected[row, : int(batch.lengths[row])].to(torch.float64)
            self.benign_gram += real.T @ real
            self.benign_tokens += real.shape[0]
            table = self.decision_twinned if prompt.role == "benign_lr" else self.decision
            self._gram(table, prompt.lang).add(x)

    def set_refusal_direction(self, batches: list[TokenBatch]) -> None:
        """English harmful minus harmless mean of the residual stream after this layer (base
        weights for this layer), at the paired positions: the direction refusal is written on."""
        harmful, harmless = [], []
        for batch in batches:
            last = batch.last_rows(batch.hidden.float(), self.positions)  # [B, p, d]
            for row, item in enumerate(batch.items):
                role = self.english[item].role
                (harmful if role == "harmful_en" else harmless).append(last[row])
        direction = torch.cat(harmful).mean(0) - torch.cat(harmless).mean(0)
        self.direction = direction / direction.norm().clamp(min=1e-12)


def _statistics(
    tables: PairTables,
    config: SolveConfig,
    group: str,
    push: torch.Tensor | None,
    target_map: torch.Tensor | None = None,
) -> LayerStatistics:
    """One group's statistics with every target setting of ``config`` applied."""
    settings = config.solver
    return tables.statistics(
        config.groups[group],
        settings.benign_alignment > 0,
        target_map,
        settings.unpaired_languages,
        language_shift=settings.language_shift_removed,
        push=push,
        language_shifts=settings.language_shifts,
        scale=settings.target_scale,
    )


def _solve(stats: LayerStatistics, settings: SolverSettings) -> LowRankUpdate:
    return solve_layer(
        stats,
        rank=settings.rank,
        constraint=settings.constraint,
        benign_weight=settings.benign_weight,
        ridge=settings.ridge,
        null_space_energy=settings.null_space_energy,
        decision_weight=settings.decision_weight,
        decision_balance=settings.decision_balance,
        decision_weights=settings.decision_weights,
        benign_alignment=settings.benign_alignment,
    )


def solve(
    model_dir: str | Path,
    config: SolveConfig,
    groups: list[str],
    model_id: str,
    progress: Progress = _no_progress,
    stats_cache: Path | None = None,
) -> SolveResult:
    """Solve one delta per group in ``groups`` (names from ``config.groups``).

    With ``stats_cache`` (a folder) each layer's statistics are stored there, and a pass whose
    layers are all stored skips its forward passes (output and attention edits; see
    ``stats_cache``): options that differ only in the solve take seconds.

    With ``sequential`` each group gets its own pass: its later layers are solved on
    activations moved by its own earlier edits, which is what serving that delta applies
    (a pass shared with 'all' would solve a group's layer 11 as if 'all' had edited layer 8,
    and the group's own layers would then overshoot). Without it one pass serves every group.
    """
    started = time.perf_counter()
    unknown = [name for name in groups if name not in config.groups]
    if unknown:
        raise VSPError(
            f"unknown group(s) {', '.join(unknown)}",
            f"use groups defined in the config: {', '.join(sorted(config.groups))}",
        )
    settings = config.solver
    checkpoint = Checkpoint(model_dir)
    model, tokenizer = load_causal_lm(Path(model_dir), settings.dtype)
    num_layers = len(decoder_layers(model))  # also refuses models without a gated MLP
    bad_layers = [layer for layer in settings.layers if layer >= num_layers]
    if bad_layers:
        raise VSPError(
            f"layers {bad_layers} do not exist (the model has {num_layers})",
            f"choose layers in 0..{num_layers - 1} in the solver config",
        )

    passes = [[name] for name in groups] if settings.sequential else [list(groups)]
    cache = None
    if stats_cache is not None and settings.edit != "input":
        cache = _PassCache(StatsCache(stats_cache), checkpoint_digest(Path(model_dir)), config)
    steps = max(settings.layers) + 1
    timings = SolveTimings()
    edits: dict[str, list[TensorEdit]] = {}
    neurons: dict[str, dict[int, torch.Tensor]] = {}
    spectra: dict[str, dict[int | str, list[float]]] = {}
    digests: dict[str, str] = {}
    for number, pass_groups in enumerate(passes):

        def report(stage: str, done: int, total: int, offset: int = number * steps) -> None:
            progress(stage, offset + done, len(passes) * steps)

        languages = sorted({lang for name in pass_groups for lang in config.groups[name]})
        data = gather_solve_data(languages, config.data)
        digests.update(data.digests)
        keys = cache.keys(data, languages) if cache else {}
        push = (
            _refusal_push(model, tokenizer, config, data, languages, cache, timings, report)
            if settings.refusal_push
            else {}
        )
        if cache and all(cache.store.has(key) for key in keys.values()):
            found = _solve_cached(model, config, pass_groups, cache.store, keys, timings, push)
        else:
            found = _solve_pass(
                model, tokenizer, config, pass_groups, data, timings, report, cache, keys, push
            )
        for name in pass_groups:
            edits[name], neurons[name], spectra[name] = found[name]

    names = [name for layer in settings.layers for name in _edited_tensors(settings, layer)]
    base_tensors = checkpoint.get_many(names)
    deltas, blobs = {}, {}
    for group in groups:
        delta, blob = build_delta(
            group=group,
            languages=config.groups[group],
            model_id=model_id,
            config=checkpoint.config,
            base_tensors=base_tensors,
            edits=edits[group],
            solver={
                "method": {
                    "output": SOLVE_METHOD,
                    "input": INPUT_SOLVE_METHOD,
                    "attention": ATTENTION_SOLVE_METHOD,
                }[settings.edit],
                **settings.model_dump(mode="json"),
                "data": config.data.model_dump(mode="json"),
            },
            data_digests={key: digests[key] for key in _group_digests(digests, config, group)},
        )
        deltas[group], blobs[group] = delta, blob
    timings.total_seconds = time.perf_counter() - started
    return SolveResult(deltas, blobs, neurons, timings, spectra)


def _edited_tensors(settings: SolverSettings, layer: int) -> list[str]:
    """The HF tensor names the chosen edit changes at ``layer``."""
    if settings.edit == "input":
        return [f"model.layers.{layer}.mlp.{matrix}.weight" for matrix in settings.input_matrices]
    if settings.edit == "attention":
        return [f"model.layers.{layer}.self_attn.o_proj.weight"]
    return [f"model.layers.{layer}.mlp.down_proj.weight"]


def _group_digests(digests: dict[str, str], config: SolveConfig, group: str) -> list[str]:
    """The data files one group's solve read: English ones and its languages' ones."""
    languages = {"en", *config.groups[group]}
    return sorted(key for key in digests if key.rsplit("/", 1)[-1] in languages)


def _solve_pass(
    model,
    tokenizer,
    config: SolveConfig,
    groups: list[str],
    data: SolveData,
    timings: SolveTimings,
    progress: Progress,
    cache: _PassCache | None = None,
    keys: dict[int, str] | None = None,
    push: dict[int, torch.Tensor] | None = None,
) -> dict[str, tuple[list[TensorEdit], dict[int, torch.Tensor], dict[int, list[float]]]]:
    """One layer-by-layer pass over ``data``, solving ``groups`` at every edited layer
    (storing each layer's statistics in ``cache`` under ``keys[layer]``; ``push[layer]`` added
    to the harmful pairs' targets)."""
    settings = config.solver
    languages = sorted({lang for name in groups for lang in config.groups[name]})
    english_batches = tokenize_chats(
        tokenizer, [p.text for p in data.english], settings.batch_size, settings.max_prompt_tokens
    )
    other_batches = tokenize_chats(
        tokenizer, [p.text for p in data.others], settings.batch_size, settings.max_prompt_tokens
    )
    english_run = LayerwiseForward(model, english_batches)
    other_run = LayerwiseForward(model, other_batches)
    tick = time.perf_counter()
    english_run.start()
    other_run.start()
    timings.forward_seconds += time.perf_counter() - tick

    edits: dict[str, list[TensorEdit]] = {name: [] for name in groups}
    chosen: dict[int, torch.Tensor] = {}
    spectra: dict[str, dict[int | str, list[float]]] = {name: {} for name in groups}
    last_layer = max(settings.layers)
    # Input-side and attention edits are written into the model's weights for the rest of the
    # pass (the residual stream then moves as serving moves it); ``restore`` undoes them.
    restore: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    for layer in range(last_layer + 1):
        progress("layers", layer, last_layer + 1)
        if layer not in settings.layers:
            tick = time.perf_counter()
            english_run.run_layer()
            other_run.run_layer()
            timings.forward_seconds += time.perf_counter() - tick
            continue
        if settings.edit == "input":
            tick = time.perf_counter()
            layer_edits, neurons = _input_layer(
                model, layer, english_run, other_run, data, config, groups, spectra, restore
            )
            timings.forward_seconds += time.perf_counter() - tick
            chosen[layer] = neurons
            for group in groups:
                edits[group].extend(layer_edits[group])
            continue
        # The attention output feeds the same layer's MLP, so its edit cannot be added to the
        # streams afterwards: collect without advancing, write the update, then advance.
        attention = settings.edit == "attention"
        site = "o_proj" if attention else "down_proj"
        (name,) = _edited_tensors(settings, layer)
        weight = model.get_parameter(name).detach().float()
        collector = _LayerCollector(
            data.english, data.others, english_batches, weight, settings.positions, languages
        )
        tick = time.perf_counter()
        unhook = _watch_residual(collector, decoder_layers(model)[layer], attention, settings)
        english_run.run_layer(collector.observe_english, advance=not attention, site=site)
        if settings.target == "refusal-direction":
            collector.set_refusal_direction(english_batches)
        if settings.neuron_scoring == "within-language":
            # One extra pass over this layer: the neurons must be known before the stash.
            other_run.run_layer(collector.observe_scores, advance=False, site=site)
        neurons = collector.choose_neurons(settings.neurons_per_layer, settings.neuron_scoring)
        other_run.run_layer(collector.observe_other, advance=not attention, site=site)
        unhook()
        if cache is not None and keys:
            cache.store.save(keys[layer], collector, neurons)
        timings.forward_seconds += time.perf_counter() - tick  # includes hook time

        tick = time.perf_counter()
        chosen[layer] = neurons
        updates = {}
        for group in groups:
            stats = _statistics(collector, config, group, (push or {}).get(layer))
            if stats.pairs == 0:
                raise VSPError(f"group '{group}' has no paired data", "add languages with pairs")
            update = _solve(stats, settings)
            updates[group] = update
            spectra[group][layer] = [round(float(v), 6) for v in update.singular_values[:64]]
            edits[group].append(
                TensorEdit.build(
                    name,
                    tuple(weight.shape),
                    "columns",
                    neurons,
                    update.B.float(),
                    update.A.float(),
                )
            )
        if attention:
            if settings.sequential:  # one group per pass: serve its update for the rest
                module = model.get_submodule(name.removesuffix(".weight"))
                restore.append((module, module.weight.detach().clone()))
                with torch.no_grad():
                    module.weight[:, neurons] += updates[groups[0]].dense().to(module.weight.dtype)
            english_run.run_layer()
            other_run.run_layer()
        elif settings.sequential:  # one group per pass: move the streams by its update
            update_t = updates[groups[0]].dense().float().T  # [k, d]
            for batch in english_batches:
                stash = collector.english_stash[id(batch)][..., neurons]
                batch.hidden = batch.hidden + (stash @ update_t).to(batch.hidden.dtype)
            for batch in other_batches:
                stash = collector.other_stash[id(batch)]
                batch.hidden = batch.hidden + (stash @ update_t).to(batch.hidden.dtype)
        timings.solve_seconds += time.perf_counter() - tick
    for module, original in reversed(restore):
        with torch.no_grad():
            module.weight.copy_(original)
    progress("layers", last_layer + 1, last_layer + 1)
    return {group: (edits[group], dict(chosen), spectra[group]) for group in groups}


class _PassCache:
    """The statistics cache of one solve and how its keys are made."""

    def __init__(self, store: StatsCache, checkpoint: str, config: SolveConfig) -> None:
        self.store, self.checkpoint, self.config = store, checkpoint, config

    def keys(self, data: SolveData, languages: list[str]) -> dict[int, str]:
        solver = self.config.solver.model_dump(mode="json")
        return {
            layer: layer_key(
                checkpoint=self.checkpoint,
                solver=solver,
                data=self.config.data.model_dump(mode="json"),
                digests=data.digests,
                languages=languages,
                layer=layer,
            )
            for layer in self.config.solver.layers
        }


def _solve_cached(
    model,
    config: SolveConfig,
    groups: list[str],
    store: StatsCache,
    keys: dict[int, str],
    timings: SolveTimings,
    push: dict[int, torch.Tensor],
) -> dict[str, tuple[list[TensorEdit], dict[int, torch.Tensor], dict[int, list[float]]]]:
    """``_solve_pass`` from stored statistics: no forward pass."""
    settings = config.solver
    edits: dict[str, list[TensorEdit]] = {name: [] for name in groups}
    chosen: dict[int, torch.Tensor] = {}
    spectra: dict[str, dict[int | str, list[float]]] = {name: {} for name in groups}
    tick = time.perf_counter()
    for layer in sorted(settings.layers):
        tables, neurons = store.load(keys[layer])
        chosen[layer] = neurons
        (name,) = _edited_tensors(settings, layer)
        shape = tuple(model.get_parameter(name).shape)
        for group in groups:
            stats = _statistics(tables, config, group, push.get(layer))
            update = _solve(stats, settings)
            spectra[group][layer] = [round(float(v), 6) for v in update.singular_values[:64]]
            edits[group].append(
                TensorEdit.build(
                    name, shape, "columns", neurons, update.B.float(), update.A.float()
                )
            )
    timings.solve_seconds += time.perf_counter() - tick
    return {group: (edits[group], dict(chosen), spectra[group]) for group in groups}


def _refusal_push(
    model,
    tokenizer,
    config: SolveConfig,
    data: SolveData,
    languages: list[str],
    cache: _PassCache | None,
    timings: SolveTimings,
    progress: Progress,
) -> dict[int, torch.Tensor]:
    """Per edited layer, ``refusal_push`` times the base model's pooled refuse-vs-answer
    direction on this pass's harmful fit prompts (read from ``cache`` when stored there)."""
    settings = config.solver
    layers = sorted(settings.layers)
    key = None
    if cache is not None:
        key = decisions_key(
            checkpoint=cache.checkpoint,
            record={
                "data": config.data.model_dump(mode="json"),
                "digests": data.digests,
                "languages": sorted(languages),
                "layers": layers,
                "positions": settings.positions,
                "max_prompt_tokens": settings.max_prompt_tokens,
                "opening_tokens": OPENING_TOKENS,
                "dtype": settings.dtype,
            },
        )
    if key is not None and cache.store.has(key):
        entry = cache.store.load_entry(key)
        sums = {
            int(layer): {lang: DecisionSums.from_dict(v) for lang, v in by_lang.items()}
            for layer, by_lang in entry["sums"].items()
        }
    else:
        tick = time.perf_counter()
        sums, verdicts = collect_decisions(
            model,
            tokenizer,
            [*data.english, *data.others],
            layers,
            settings.positions,
            settings.batch_size,
            settings.max_prompt_tokens,
            lambda done, total: progress("refusal verdicts", done, total),
        )
        timings.forward_seconds += time.perf_counter() - tick
        if key is not None:
            cache.store.save_entry(
                key,
                {
                    "sums": {
                        layer: {lang: v.to_dict() for lang, v in by_lang.items()}
                        for layer, by_lang in sums.items()
                    },
                    "verdicts": verdicts,
                },
            )
    return {layer: settings.refusal_push * pooled_direction(sums[layer]) for layer in layers}


def _watch_residual(
    collector: _LayerCollector, layer: torch.nn.Module, attention: bool, settings: SolverSettings
) -> Callable[[], None]:
    """With target = 'twin-residual', tell ``collector`` which residual stream the edited
    matrix's output is added to: the layer's input for o_proj, the stream after attention
    (what post_attention_layernorm reads) for down_proj. Returns what undoes it."""
    if settings.target != "twin-residual":
        return lambda: None
    if attention:
        collector.residual = lambda batch: batch.hidden
        return lambda: None
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is None or hasattr(layer, "pre_feedforward_layernorm"):
        # Gemma-style layers normalise the attention output before adding it: the input of
        # post_attention_layernorm is then not the residual stream.
        raise VSPError(
            f"target = 'twin-residual' needs a pre-norm layer with post_attention_layernorm "
            f"before the MLP ({type(layer).__name__} is not one)",
            "use target = 'twin' with this model",
        )
    seen: dict[str, torch.Tensor] = {}
    handle = norm.register_forward_pre_hook(lambda module, args: seen.update(mid=args[0]))
    collector.residual = lambda batch: seen["mid"]
    return handle.remove


def _input_layer(
    model,
    layer: int,
    english_run: LayerwiseForward,
    other_run: LayerwiseForward,
    data: SolveData,
    config: SolveConfig,
    groups: list[str],
    spectra: dict[str, dict[int | str, list[float]]],
    restore: list,
) -> tuple[dict[str, list[TensorEdit]], torch.Tensor]:
    """The paper's edit at one layer: collect MLP inputs, choose S, solve rows S of each
    input matrix for every group; with ``sequential`` (one group) write the update into the
    model and then advance the residual streams through the edited layer."""
    settings = config.solver
    languages = sorted({lang for name in groups for lang in config.groups[name]})
    mlp = decoder_layers(model)[layer].mlp
    collector = InputCollector(data.english, data.others, mlp, settings.positions, languages)
    english_run.run_layer(collector.observe_english, advance=False, site="mlp")
    neurons = collector.choose_neurons(settings.neurons_per_layer, settings.neuron_selection)
    other_run.run_layer(collector.observe_other, advance=False, site="mlp")
    layer_edits: dict[str, list[TensorEdit]] = {group: [] for group in groups}
    for matrix in settings.input_matrices:
        module = getattr(mlp, matrix)
        weight = module.weight.detach().float()
        target_map = weight[neurons].double()  # [k, hidden]: input change -> pre-activation
        for group in groups:
            stats = _statistics(collector, config, group, None, target_map)
            if stats.pairs == 0:
                raise VSPError(f"group '{group}' has no paired data", "add languages with pairs")
            update = _solve(stats, settings)
            spectra[group][f"{layer}.{matrix}"] = [
                round(float(v), 6) for v in update.singular_values[:64]
            ]
            layer_edits[group].append(
                TensorEdit.build(
                    f"model.layers.{layer}.mlp.{matrix}.weight",
                    tuple(weight.shape),
                    "rows",
                    neurons,
                    update.B.float(),
                    update.A.float(),
                )
            )
            if settings.sequential and len(groups) == 1:
                restore.append((module, module.weight.detach().clone()))
                apply_rows(module, neurons, update.dense())
    english_run.run_layer()
    other_run.run_layer()
    return layer_edits, neurons
