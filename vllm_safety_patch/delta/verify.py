"""Does a (well-formed) delta belong to this model? Checked before any weight changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm_safety_patch.delta.io import Delta
from vllm_safety_patch.errors import DeltaMismatchError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import (
    architecture_config,
    fingerprint_from_digests,
    short,
    tensor_digest,
)

OTHER_MODEL_FIX = (
    "use a delta solved for this model (see 'vsp inspect'), or solve one with 'vsp solve'"
)


def check_architecture(delta: Delta, config: Mapping[str, Any]) -> None:
    """Refuse a delta solved for another architecture, naming the first difference."""
    expected = delta.manifest.base_model.architecture_config
    actual = architecture_config(config)
    differences = [key for key in sorted(expected) if expected.get(key) != actual.get(key)]
    if differences:
        key = differences[0]
        raise DeltaMismatchError(
            f"{delta.source}: delta '{delta.group}' was solved for another architecture "
            f"({key}: delta {expected.get(key)!r}, model {actual.get(key)!r})",
            OTHER_MODEL_FIX,
        )


def check_shapes(delta: Delta, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every edited tensor exists in the model with the shape the manifest records."""
    for spec in delta.manifest.tensors:
        if spec.name not in shapes:
            raise DeltaMismatchError(
                f"{delta.source}: the model has no tensor '{spec.name}'", OTHER_MODEL_FIX
            )
        if tuple(shapes[spec.name]) != spec.shape:
            raise DeltaMismatchError(
                f"{delta.source}: '{spec.name}' is {list(shapes[spec.name])} in the model, "
                f"{list(spec.shape)} in the delta",
                OTHER_MODEL_FIX,
            )


def check_fingerprint(delta: Delta, config: Mapping[str, Any], digests: Mapping[str, str]) -> None:
    """The model's edited tensors hash to the fingerprint the delta was solved against."""
    actual = fingerprint_from_digests(config, digests)
    expected = delta.manifest.base_model.fingerprint
    if actual != expected:
        raise DeltaMismatchError(
            f"{delta.source}: fingerprint mismatch: delta '{delta.group}' was solved for base "
            f"weights {short(expected)}, this model's are {short(actual)} "
            "(another model, or another conversion of it)",
            OTHER_MODEL_FIX,
        )


def verify_against_checkpoint(deltas: Sequence[Delta], checkpoint: Checkpoint) -> None:
    """Check deltas against a checkpoint on disk, reading only the edited tensors."""
    shapes = {name: checkpoint.shape(name) for name in checkpoint.tensor_names()}
    digests: dict[str, str] = {}
    for delta in deltas:
        check_architecture(delta, checkpoint.config)
        check_shapes(delta, shapes)
        for name in delta.edits:
            if name not in digests:
                digests[name] = tensor_digest(checkpoint.get(name))
        check_fingerprint(delta, checkpoint.config, {name: digests[name] for name in delta.edits})
