"""The delta file commands: ``vsp inspect``, ``verify``, ``apply``, ``export`` and ``rehash``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vllm_safety_patch.cli.common import (
    DELTA_FINGERPRINT,
    ModelOption,
    Stages,
    cells,
    console,
    error_console,
    fail,
    model_path,
)
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.fingerprint import short


def inspect(
    file: Annotated[Path, typer.Argument(help="delta .safetensors file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """Print a delta's manifest (reads the header only: use 'vsp verify' to check the file)."""
    from vllm_safety_patch.delta_view import read_delta_header

    try:
        delta = read_delta_header(file)
    except VSPError as error:
        fail(error)
    manifest = delta.manifest
    if as_json:
        print(json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False))
        return
    base = manifest.base_model
    # Manifest strings are data: print them with markup off, and tables from Text cells.
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"{file}  group {manifest.group}  sha256 {short(delta.sha256)}", **plain)
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
            *cells(tensor.name, list(tensor.shape), tensor.axis, tensor.neurons, tensor.rank)
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
                *cells(
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
    from vllm_safety_patch.delta.effect_review import before_after, review_effect

    review = review_effect(manifest)
    if review.languages:
        table = Table(
            "lang", "harmful refused", "everyday benign refused", "n benign",
            title="both sides (held out; before -> after)",
        )  # fmt: skip
        for row in review.languages:
            table.add_row(
                *cells(
                    row.lang,
                    before_after(row.harmful_before, row.harmful_after),
                    before_after(row.benign_before, row.benign_after),
                    row.benign_n or "-",
                )
            )
        console.print(table)
    for flag in review.flags:
        console.print(f"flag: {flag}", **plain)
    if review.languages and review.ok:
        console.print("both sides measured in every language; no benign flag", **plain)


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
        fail(error)
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
        fingerprint = f"{DELTA_FINGERPRINT} {short(manifest.base_model.fingerprint)}"
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
    checkpoint = Checkpoint(model_path(model))
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


def apply(
    files: Annotated[list[Path], typer.Argument(help="delta .safetensors file(s)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the edited checkpoint")],
    model: ModelOption = None,
) -> None:
    """Write base + deltas as a full edited checkpoint (for engines without the plugin)."""
    try:
        _check_out_dir(out)
        with Stages() as stages:
            stages.next(f"read and check {len(files)} delta file(s)")
            from vllm_safety_patch.delta.export import write_merged_checkpoint
            from vllm_safety_patch.models.checkpoint import Checkpoint

            deltas = _read_deltas(files)
            checkpoint = Checkpoint(model_path(model))
            stages.next(f"verify against {checkpoint.path}, merge, write {out}")
            path = _writing(out, lambda: write_merged_checkpoint(checkpoint, deltas, out))
    except VSPError as error:
        fail(error)
    console.print(f"wrote {path}", markup=False, soft_wrap=True)


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
        with Stages() as stages:
            stages.next("read and check the delta file")
            from vllm_safety_patch.delta import verify_against_checkpoint
            from vllm_safety_patch.delta.export import write_merged_checkpoint
            from vllm_safety_patch.delta.export_peft import write_peft_adapter
            from vllm_safety_patch.models.checkpoint import Checkpoint

            [delta] = _read_deltas([file])
            checkpoint = Checkpoint(model_path(model))
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
        fail(error)
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
        fail(error)
    for path, delta, rewritten in done:
        digest = short(delta.manifest.tensors_sha256 or "")
        state = "recorded tensor digest" if rewritten else "already records tensor digest"
        console.print(
            f"{path}: {state} {digest} (file sha256 {short(delta.sha256)})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
