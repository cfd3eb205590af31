"""Measuring: ``vsp eval`` (the suites against an endpoint, or in-process), ``vsp eval
compare`` (two runs side by side) and ``vsp measure`` (each delta before vs after, into its
manifest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vllm_safety_patch import settings as vsp_settings
from vllm_safety_patch.cli.common import (
    PLAIN,
    ModelOption,
    cells,
    console,
    fail,
    model_path,
    row_span,
)
from vllm_safety_patch.errors import VSPError

CACHE_FILE = "cache.jsonl"
REPLIES_FILE = "replies.jsonl"
REPORT_FILE = "report.md"
# Short metric names for terminal tables (results.json and report.md keep the full ones).
SHORT_METRIC = {
    "refusal_rate": "refusal",
    "over_refusal": "over-refusal",
    "mgsm_accuracy": "MGSM acc.",
}


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _source(
    base_url: str | None,
    model: str | None,
    api_key: str | None,
    engine: str,
    deltas: list[Path],
    retries: int,
) -> tuple[Any, str]:
    """The reply source the options name (a server, or an in-process engine) and a label."""
    from vllm_safety_patch.eval.harness import EndpointSource, InProcessSource
    from vllm_safety_patch.eval.openai_client import ChatEndpoint, RetryPolicy

    if base_url is not None:
        if not model:
            raise VSPError(
                "--model is missing", "pass the served model name, e.g. from GET /v1/models"
            )
        if deltas:
            raise VSPError(
                "--delta applies to in-process runs only",
                "choose deltas on the server (vsp serve --deltas), or drop --base-url",
            )
        endpoint = ChatEndpoint(base_url, model, api_key=api_key, retry=RetryPolicy(retries))
        return EndpointSource(endpoint), model
    from vllm_safety_patch.eval.effect import engine_generator
    from vllm_safety_patch.models.catalogue import resolve_model

    model_dir = resolve_model(model or None)  # a catalogue name or a checkpoint folder
    for path in deltas:
        if not path.is_file():
            raise VSPError(f"no delta file {path}", "pass an existing .safetensors delta")
    from vllm_safety_patch.delta import read_delta, verify_against_checkpoint
    from vllm_safety_patch.models.checkpoint import Checkpoint

    verify_against_checkpoint([read_delta(path) for path in deltas], Checkpoint(model_dir))
    generator = engine_generator(engine, model_dir)
    label = model_dir.name + "".join(f"+{path.stem}" for path in deltas)
    return InProcessSource(generator, str(model_dir), list(deltas)), label


eval_app = typer.Typer(
    help="Evaluate refusal, over-refusal and MGSM accuracy per language.",
    invoke_without_command=True,
    # Without a command it runs the suites; 'compare' is the one sub-command.
    subcommand_metavar="[compare RUN_A RUN_B]",
)


@eval_app.callback()
def eval_run(
    ctx: typer.Context,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
            "(left out: generate in-process with --engine)",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="served model name (with --base-url), else a catalogue name or a "
            "checkpoint folder (default: the default model)",
        ),
    ] = None,
    suites: Annotated[
        str, typer.Option(help="comma-separated: multijail, polyrefuse, mgsm")
    ] = "multijail,polyrefuse,mgsm",
    langs: Annotated[
        str | None,
        typer.Option(help="comma-separated language codes (default: all; en always)"),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="first N held-out prompts per suite+language")
    ] = None,
    judge: Annotated[
        str, typer.Option(help="'keywords', or 'openai:URL#MODEL' for an LLM judge too")
    ] = "keywords",
    judge_template: Annotated[
        str, typer.Option(help="auto | llama-guard | qwen3guard | generic")
    ] = "auto",
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for results, report and plots")
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(help="an earlier run's folder: report and plot before/after"),
    ] = None,
    label: Annotated[str | None, typer.Option(help="name of this run in reports")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENAI_API_KEY", help="endpoint API key")
    ] = None,
    judge_api_key: Annotated[
        str | None,
        typer.Option(envvar=vsp_settings.JUDGE_API_KEY.name, help="judge API key"),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight at once")] = 8,
    retries: Annotated[int, typer.Option(help="tries per request (back-off)")] = 6,
    # equal to eval.suites.REFUSAL_TOKENS (a test checks): the same as `vsp measure`
    refusal_tokens: Annotated[int, typer.Option(help="max tokens per harmful/benign")] = 40,
    mgsm_tokens: Annotated[int, typer.Option(help="max tokens per MGSM problem")] = 320,
    engine: Annotated[
        str, typer.Option(help="in-process engine: vllm (offline LLM) or transformers")
    ] = "vllm",
    delta: Annotated[
        list[Path] | None, typer.Option(help="in-process: delta file to merge (repeatable)")
    ] = None,
) -> None:
    """Run the suites against an endpoint (or in-process); write results.json, report.md,
    replies.jsonl and PNG plots to --out. Interrupted runs resume from --out's cache."""
    if ctx.invoked_subcommand is not None:
        return
    from vllm_safety_patch.eval.cache import ReplyCache
    from vllm_safety_patch.eval.compare import compare_markdown
    from vllm_safety_patch.eval.harness import EvalSettings, evaluate, write_records
    from vllm_safety_patch.eval.judges import parse_judge
    from vllm_safety_patch.eval.plots import plot_all
    from vllm_safety_patch.eval.report import report_markdown
    from vllm_safety_patch.eval.results import read_results
    from vllm_safety_patch.eval.suites import eval_tasks

    try:
        if out is None:
            raise VSPError("--out is missing", "pass --out DIR (results, report and plots)")
        tasks = eval_tasks(
            vsp_settings.split_list(suites),
            None if langs is None else vsp_settings.split_list(langs),
            n,
        )
        llm_judge = parse_judge(judge, judge_template)
        settings = EvalSettings(
            refusal_tokens=refusal_tokens,
            mgsm_tokens=mgsm_tokens,
            concurrency=concurrency,
            retries=retries,
        )
        before = read_results(baseline) if baseline is not None else None
        source, default_label = _source(base_url, model, api_key, engine, delta or [], retries)
        run_label = label or default_label
        with ReplyCache(out / CACHE_FILE) as cache, _progress() as progress:
            bars: dict[str, Any] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in bars:
                    bars[stage] = progress.add_task(stage, total=total)
                progress.update(bars[stage], completed=done, total=total)

            results, records = evaluate(
                tasks,
                source,
                cache,
                settings,
                judge=llm_judge,
                judge_api_key=judge_api_key,
                label=run_label,
                progress=report,
            )
    except VSPError as error:
        fail(error)
    results.write(out)
    write_records(records, out / REPLIES_FILE)
    runs = [(results.run.label, results)]
    extra = ""
    if before is not None:
        base_label = before.run.label or "baseline"
        if base_label == run_label:
            base_label += " (baseline)"
        runs = [(base_label, before), *runs]
        extra = compare_markdown(base_label, run_label, before, results)
    (out / REPORT_FILE).write_text(report_markdown(results, extra), encoding="utf-8")
    plots = plot_all(runs, out)
    _print_summary(results)
    console.print(
        f"{results.run.requests} requests ({results.run.cached} cached) in "
        f"{results.run.seconds:.0f} s; wrote {out}/results.json, {REPORT_FILE}, "
        f"{REPLIES_FILE}, {', '.join(p.name for p in plots)}",
        **PLAIN,
        soft_wrap=True,
    )


@eval_app.command("compare")
def eval_compare(
    run_a: Annotated[Path, typer.Argument(help="first run's --out folder (e.g. base)")],
    run_b: Annotated[Path, typer.Argument(help="second run's --out folder (e.g. patched)")],
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for compare.md and plots")
    ] = None,
) -> None:
    """Two runs side by side: differences, significance (McNemar), gap closed, plots."""
    from vllm_safety_patch.delta.effect_review import percent
    from vllm_safety_patch.eval.compare import compare_markdown, compare_runs, gaps_closed
    from vllm_safety_patch.eval.plots import plot_all
    from vllm_safety_patch.eval.results import read_results

    try:
        a, b = read_results(run_a), read_results(run_b)
    except VSPError as error:
        fail(error)
    label_a = a.run.label or run_a.name
    label_b = b.run.label or run_b.name
    if label_a == label_b:
        label_a, label_b = run_a.name, run_b.name
    rows = compare_runs(a, b)
    if not rows:
        fail(
            VSPError(
                f"{run_a} and {run_b} share no figure",
                "compare runs of the same suites and languages",
            )
        )
    table = Table("suite", "metric", "judge", "lang", "n", label_a, label_b, "change", "p")
    for row in rows:
        style = "bold" if row.significant else ""
        table.add_row(
            *(
                Text(str(cell), style=style)
                for cell in (
                    row.a.suite,
                    SHORT_METRIC.get(row.a.metric, row.a.metric),
                    row.a.judge,
                    row.a.lang,
                    f"{row.a.n}/{row.b.n}",
                    percent(row.a.rate),
                    percent(row.b.rate),
                    f"{100 * row.difference:+.0f} pp" + (" *" if row.significant else ""),
                    f"{row.p_value:.3g}",
                )
            )
        )
    console.print(table)
    console.print("* p < 0.05, exact McNemar test on paired prompts (z-test if unpaired)")
    for suite, shares in gaps_closed(a, b).items():
        cells = ", ".join(
            f"{lang} {'no gap' if share is None else percent(share)}"
            for lang, share in shares.items()
        )
        console.print(f"gap to English closed ({suite}): {cells}", **PLAIN)
    folder = out or run_b / f"compare-{run_a.resolve().name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.md").write_text(compare_markdown(label_a, label_b, a, b), encoding="utf-8")
    plots = plot_all([(label_a, a), (label_b, b)], folder)
    console.print(f"wrote {folder}/compare.md, {', '.join(p.name for p in plots)}", **PLAIN)


def _print_summary(results) -> None:
    from vllm_safety_patch.eval.report import rate_cell

    table = Table("suite", "metric", "judge", "lang", "n", "rate [95% CI]")
    for figure in results.figures:
        if figure.metric == "attack_success_rate":
            continue
        table.add_row(
            *(
                Text(str(cell))
                for cell in (
                    figure.suite,
                    SHORT_METRIC.get(figure.metric, figure.metric),
                    figure.judge,
                    figure.lang,
                    figure.n,
                    rate_cell(figure),
                )
            )
        )
    console.print(table)


def measure_command(
    files: Annotated[list[Path], typer.Argument(help="delta .safetensors file(s)")],
    model: ModelOption = None,
    write: Annotated[
        bool, typer.Option(help="store the figures in each delta's manifest (measured_effect)")
    ] = True,
    samples: Annotated[
        Path | None, typer.Option(help="folder for the raw replies (JSON), to read by eye")
    ] = None,
    engine: Annotated[str, typer.Option(help="'vllm' (offline engine) or 'transformers'")] = "vllm",
    harmless_val: Annotated[int, typer.Option(help="PolyRefuse harmless val rows per lang")] = 20,
    everyday: Annotated[int, typer.Option(help="everyday benign rows per language")] = 64,
    everyday_split: Annotated[
        str, typer.Option(help="'test' (reported figures) or 'val' (comparing solver settings)")
    ] = "test",
    # Literal defaults keep `vsp --help` from importing the data; a test holds them equal to
    # eval.suites (HELD_OUT, REFUSAL_TOKENS, MGSM_TOKENS), where they are defined.
    mgsm_rows: Annotated[str, typer.Option(help="held-out MGSM rows START-STOP")] = "170-200",
    multijail_rows: Annotated[
        str,
        typer.Option(
            help="MultiJail rows START-STOP: 160-210 are held out (reported figures); a "
            "development solve that fits on 0-120 can choose on 120-160"
        ),
    ] = "160-210",
    summary: Annotated[
        Path | None,
        typer.Option(help="append one JSON line per delta (every figure) to compare options"),
    ] = None,
    refusal_tokens: Annotated[int, typer.Option(help="tokens generated per harmful prompt")] = 40,
    mgsm_tokens: Annotated[int, typer.Option(help="tokens generated per MGSM problem")] = 320,
    baseline_cache: Annotated[
        Path | None,
        typer.Option(help="JSONL cache of the base model's replies (keyed by its identity)"),
    ] = Path("build/measure-baseline.jsonl"),
) -> None:
    """Measure each delta on held-out rows (refusal, over-refusal, MGSM), before vs after."""
    from vllm_safety_patch.delta import read_delta, verify_against_checkpoint
    from vllm_safety_patch.delta.io import write_measured_effect
    from vllm_safety_patch.eval.effect import (
        EffectSettings,
        effect_jobs,
        engine_generator,
        measure_effect,
        run_jobs,
    )
    from vllm_safety_patch.models.checkpoint import Checkpoint

    start, stop = (int(part) for part in mgsm_rows.split("-"))
    if everyday_split not in ("val", "test"):
        fail(
            VSPError(
                f"--everyday-split {everyday_split!r} is not an evaluation split",
                "use 'test' (reported figures) or 'val' (comparing solver settings)",
            )
        )
    try:
        multijail_ids = row_span(multijail_rows, "--multijail-rows")
    except VSPError as error:
        fail(error)
    settings = EffectSettings(
        multijail_ids=(multijail_ids.start, multijail_ids.stop),
        harmless_val=harmless_val,
        everyday_rows=everyday,
        everyday_split=everyday_split,
        mgsm_rows=(start, stop),
        refusal_tokens=refusal_tokens,
        mgsm_tokens=mgsm_tokens,
    )
    try:
        deltas = [read_delta(file) for file in files]
        model_dir = model_path(model)
        verify_against_checkpoint(deltas, Checkpoint(model_dir))
        generate = engine_generator(engine, model_dir)
    except VSPError as error:
        fail(error)
    if baseline_cache is not None:
        from vllm_safety_patch.eval.cache import cached_baseline, checkpoint_identity

        identity = checkpoint_identity(model_dir)
        generate = cached_baseline(generate, baseline_cache, identity, engine)
    languages = sorted({lang for delta in deltas for lang in delta.manifest.languages})
    console.print(f"baseline on {', '.join(['en', *languages])}", highlight=False)
    baseline = run_jobs(generate, [], effect_jobs(languages, settings), settings)
    for delta, file in zip(deltas, files, strict=True):
        rows, before, after = measure_effect(
            generate, file, delta.manifest.languages, settings, baseline=baseline
        )
        table = Table("metric", "lang", "n", "before", "after", title=delta.group)
        for row in rows:
            table.add_row(
                *cells(row.metric, row.lang, row.n, f"{row.before:.3f}", f"{row.after:.3f}")
            )
        console.print(table)
        if samples:
            samples.mkdir(parents=True, exist_ok=True)
            dump = {
                "|".join(key): {"before": before[key][1], "after": after[key][1]} for key in after
            }
            (samples / f"{delta.group}.json").write_text(
                json.dumps(dump, ensure_ascii=False, indent=1)
            )
        if summary is not None:
            summary.parent.mkdir(parents=True, exist_ok=True)
            line = {
                "file": str(file),
                "group": delta.group,
                "solver": delta.manifest.solver,
                "rows": [row.model_dump(mode="json") for row in rows],
            }
            with summary.open("a") as handle:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        if write:
            write_measured_effect(file, delta, rows)
