"""The solver's commands: ``vsp solve`` (write deltas), ``vsp scan`` (choose layers) and
``vsp localize`` (where refusal fails per language)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from vllm_safety_patch.cli.common import (
    ModelOption,
    console,
    fail,
    model_path,
    progress_columns,
    row_span,
)
from vllm_safety_patch.config import repo_deltas_dir
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.fingerprint import short
from vllm_safety_patch.settings import split_list

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="solver settings and language groups (TOML; default: the repository's "
        "deltas/solve.toml, wherever vsp runs from)",
    ),
]


def solve_command(
    config: ConfigOption = None,
    groups: Annotated[
        str | None,
        typer.Option("--groups", help="comma-separated group names (default: the config's)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="folder for the delta files (required, unless --overwrite-shipped: then "
            "the shipped deltas/<model>/)",
        ),
    ] = None,
    overwrite_shipped: Annotated[
        bool,
        typer.Option(
            "--overwrite-shipped",
            help="write into the repository's deltas/ folder, replacing the shipped deltas "
            "('make deltas' does); refused without it",
        ),
    ] = False,
    model: ModelOption = None,
    stats_cache: Annotated[
        Path | None,
        typer.Option(
            "--stats-cache",
            help="folder of per-layer statistics: a later solve that differs only in solve "
            "settings (rank, weights, ridge, constraint) skips the forward passes",
        ),
    ] = None,
) -> None:
    """Find safety neurons and solve one sparse low-rank delta per language group.

    Writes to --out; replacing the shipped deltas (deltas/<model>/, the default folder)
    takes --overwrite-shipped.
    """
    from vllm_safety_patch.config import DEFAULT_MODEL_NAME
    from vllm_safety_patch.solver.pipeline import solve
    from vllm_safety_patch.solver.settings import load_solve_config

    try:
        model_dir = model_path(model)
        model_id = DEFAULT_MODEL_NAME if model is None else model_dir.name
        out_dir = solve_out_dir(out, model_id, overwrite_shipped)
        settings = load_solve_config(solve_config_path(config))
        names = split_list(groups) if groups else list(settings.groups)
        with Progress(*progress_columns(), console=console) as progress:
            task = progress.add_task(f"solve {', '.join(names)}", total=None)

            def report(stage: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            result = solve(
                model_dir, settings, names, model_id, progress=report, stats_cache=stats_cache
            )
    except VSPError as error:
        fail(error)
    from vllm_safety_patch.delta.io import write_delta

    for name, delta in result.deltas.items():
        path = write_delta(out_dir / f"{name}.safetensors", delta.manifest, delta.edits)
        console.print(
            f"wrote {path} ({delta.manifest.neuron_count} neurons, sha256 {short(delta.sha256)})",
            highlight=False,
        )
    timings = result.timings
    console.print(
        f"forward {timings.forward_seconds:.1f} s, solve {timings.solve_seconds:.2f} s, "
        f"total {timings.total_seconds:.1f} s",
        highlight=False,
    )


def solve_config_path(config: Path | None) -> Path:
    """The given config, else the repository's deltas/solve.toml (not the working folder's)."""
    return config if config is not None else repo_deltas_dir() / "solve.toml"


def solve_out_dir(out: Path | None, model_id: str, overwrite_shipped: bool) -> Path:
    """Where ``vsp solve`` writes; refused, before any work, if that replaces shipped deltas
    and --overwrite-shipped was not given."""
    shipped = repo_deltas_dir()
    out_dir = out if out is not None else shipped / model_id
    if overwrite_shipped or not out_dir.resolve().is_relative_to(shipped.resolve()):
        return out_dir
    if out is None:
        problem = f"without --out, vsp solve would write into the shipped deltas ({out_dir})"
    else:
        problem = f"--out {out} is inside the shipped deltas folder ({shipped})"
    raise VSPError(
        problem,
        "pass --out DIR for new deltas, or --overwrite-shipped to replace the shipped ones "
        "(as 'make deltas' does)",
    )


def scan_command(
    config: ConfigOption = None,
    langs: Annotated[
        str | None,
        typer.Option(help="languages whose twin gap to measure (default: the config's)"),
    ] = None,
    pairs: Annotated[
        int, typer.Option(help="MultiJail pairs and English harmless prompts (0: the config's)")
    ] = 64,
    count: Annotated[int, typer.Option(help="layers to suggest")] = 5,
    spacing: Annotated[int, typer.Option(help="minimum distance between suggested layers")] = 3,
    model: ModelOption = None,
) -> None:
    """Per-layer separation (harmful vs harmless, English) and each language's gap to English."""
    from rich.table import Table

    from vllm_safety_patch.models.hf import load_causal_lm
    from vllm_safety_patch.solver.layer_scan import scan_layers, suggest_layers
    from vllm_safety_patch.solver.prompts import gather_solve_data
    from vllm_safety_patch.solver.settings import load_solve_config

    config = solve_config_path(config)
    try:
        settings = load_solve_config(config)
        config_langs = sorted({lang for group in settings.groups.values() for lang in group})
        languages = split_list(langs) if langs else config_langs
        data_settings = settings.data
        if pairs:  # a quick look; --pairs 0 scans on all the data a solve reads
            data_settings = data_settings.model_copy(
                update={"multijail_ids": (0, pairs), "english_harmless": pairs}
            )
        data = gather_solve_data(languages, data_settings)
        model_dir = model_path(model)
        hf_model, tokenizer = load_causal_lm(model_dir, settings.solver.dtype)
        rows = scan_layers(hf_model, tokenizer, data, settings.solver)
    except VSPError as error:
        fail(error)
    k = settings.solver.neurons_per_layer
    table = Table(title=f"top-{k} safety neurons per layer")
    for column in ["layer", "mean d", "best d", *languages]:
        table.add_column(column, justify="right")
    edited = set(settings.solver.layers)
    for row in rows:
        mark = "*" if row.layer in edited else ""
        gaps = [f"{row.twin_gap.get(lang, float('nan')):.2f}" for lang in languages]
        table.add_row(f"{row.layer}{mark}", f"{row.mean_d:.2f}", f"{row.best_d:.2f}", *gaps)
    console.print(table)
    suggested = suggest_layers(rows, count, spacing)
    console.print(
        f"mean/best d: Cohen's d of the top-{k} neurons (English harmful vs harmless); per "
        "language: twin gap |a_lang - a_en| / |a_en| on them, last prompt token\n"
        f"* = edited by {config}; strongest separation, {spacing} apart: {suggested}",
        highlight=False,
    )


def localize_command(
    langs: Annotated[
        str, typer.Option(help="languages to patch (each against its English twins)")
    ] = "zh,it,vi,ar,ko,th,bn,sw,jv",
    harmful_rows: Annotated[
        str, typer.Option(help="MultiJail pairs START-STOP (development rows)")
    ] = "100-124",
    everyday_rows: Annotated[
        str, typer.Option(help="everyday train pairs START-STOP (benign side)")
    ] = "0-12",
    probe_rows: Annotated[
        int, typer.Option(help="harmful and everyday prompts per language for the probe")
    ] = 64,
    layers: Annotated[
        str, typer.Option(help="layers to patch: 'all', 'every2' or a list like 8,12,16")
    ] = "all",
    sites: Annotated[
        str, typer.Option(help="site kinds: resid, dir, dirs, attn, mlp (comma-separated)")
    ] = "resid,dir,dirs,attn,mlp",
    # 8: the judge needs "I'm sorry, but" (5 tokens) or "作为一个AI助手，我不能" (7); with 4 it
    # missed every Chinese refusal.
    opening_tokens: Annotated[int, typer.Option(help="greedy tokens judged per patch")] = 8,
    reply_tokens: Annotated[
        int, typer.Option(help="tokens of the unpatched reply (opening verdict agreement)")
    ] = 40,
    out: Annotated[Path | None, typer.Option(help="write the whole result as JSON")] = None,
    model: ModelOption = None,
) -> None:
    """Where refusal fails per language: patch the English twin in, one layer and site at a time."""

    from vllm_safety_patch.models.hf import load_causal_lm
    from vllm_safety_patch.solver.localize import SITE_KINDS, LocalizeRows, localize
    from vllm_safety_patch.solver.localize_report import print_localization

    try:
        kinds = split_list(sites)
        unknown = [kind for kind in kinds if kind not in SITE_KINDS]
        if unknown:
            raise VSPError(
                f"unknown site kind(s) {', '.join(unknown)}", f"use {', '.join(SITE_KINDS)}"
            )
        rows = LocalizeRows(
            harmful_ids=row_span(harmful_rows, "--harmful-rows"),
            everyday_ids=row_span(everyday_rows, "--everyday-rows"),
            probe_harmful_ids=range(0, probe_rows),
            probe_everyday_ids=range(96, 96 + probe_rows),
        )
        model_dir = model_path(model)
        hf_model, tokenizer = load_causal_lm(model_dir)
        count = hf_model.config.num_hidden_layers
        if layers == "all":
            chosen = list(range(count))
        elif layers == "every2":
            chosen = sorted({*range(0, count, 2), count - 1})
        else:
            chosen = [int(part) for part in layers.split(",")]
        if not chosen or min(chosen) < 0 or max(chosen) >= count:
            raise VSPError(f"--layers {layers}: the model has layers 0..{count - 1}", "fix it")

        def save(partial) -> None:
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(partial.to_json(), indent=1, ensure_ascii=False))
            if not console.is_terminal:  # a log shows each language as it ends
                print(f"localize: {', '.join(partial.languages)} done, {partial.seconds:.0f} s")

        with Progress(*progress_columns(), console=console) as bar:
            task = bar.add_task("localize", total=None)

            def report(stage: str, done: int, total: int) -> None:
                bar.update(task, description=stage, completed=done, total=total)

            result = localize(
                hf_model,
                tokenizer,
                split_list(langs),
                rows,
                chosen,
                kinds,
                opening_tokens=opening_tokens,
                reply_tokens=reply_tokens,
                progress=report,
                on_language=save,
            )
    except (VSPError, ValueError) as error:
        fail(error if isinstance(error, VSPError) else VSPError(str(error), "fix the options"))
    save(result)
    print_localization(result, console)
