"""The manifest schema: what a delta edits, for which base model, how it was made."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_safety_patch import __version__
from vllm_safety_patch.delta.header import DuplicateKeyError, unique_keys
from vllm_safety_patch.errors import DataError, DeltaFormatError
from vllm_safety_patch.languages import check_language
from vllm_safety_patch.models.fingerprint import ARCHITECTURE_KEYS

FORMAT_NAME = "vsp-delta"
FORMAT_VERSION = 1
MANIFEST_KEY = "vsp_manifest"

GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EditedTensor(_Strict):
    """One edited base weight."""

    name: str = Field(description="HF tensor name, e.g. model.layers.18.mlp.down_proj.weight")
    shape: tuple[int, int] = Field(description="shape of the base weight, [out, in]")
    axis: Literal["columns", "rows"] = Field(
        description="'columns': neurons index the input dim (down_proj); "
        "'rows': neurons index the output dim (gate_proj/up_proj)"
    )
    neurons: int = Field(gt=0, description="number of edited neurons k")
    rank: int = Field(gt=0, description="rank r of the update B @ A")

    @model_validator(mode="after")
    def _fits(self) -> EditedTensor:
        if min(self.shape) <= 0:
            raise ValueError(f"shape {list(self.shape)} has a non-positive dimension")
        neuron_dim = self.shape[1] if self.axis == "columns" else self.shape[0]
        if self.neurons > neuron_dim:
            raise ValueError(f"{self.neurons} neurons but the {self.axis} dim is {neuron_dim}")
        return self

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shapes of the stored tensors ``neurons``, ``B`` and ``A``."""
        out_dim, in_dim = self.shape
        k, r = self.neurons, self.rank
        if self.axis == "columns":
            return {"neurons": (k,), "B": (out_dim, r), "A": (r, k)}
        return {"neurons": (k,), "B": (k, r), "A": (r, in_dim)}


class BaseModelRef(_Strict):
    """The base model the delta was solved for."""

    id: str = Field(description="human-readable model id, e.g. qwen2.5-coder-0.5b-instruct")
    architecture: str = Field(description="config.json 'architectures'[0]")
    fingerprint: str = Field(description="vsp fingerprint of the edited base tensors")
    architecture_config: dict[str, Any] = Field(
        description="the config.json keys the fingerprint covers"
    )

    @model_validator(mode="after")
    def _architecture_recorded(self) -> BaseModelRef:
        missing = [key for key in ARCHITECTURE_KEYS if key not in self.architecture_config]
        if missing:
            raise ValueError(f"architecture_config lacks {', '.join(missing)}")
        recorded = self.architecture_config.get("architectures") or [None]
        if recorded[0] != self.architecture:
            raise ValueError(f"architecture {self.architecture!r} is not architectures[0]")
        return self

    @field_validator("fingerprint")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX64.match(value):
            raise ValueError("must be 64 lowercase hex characters (sha256)")
        return value


class EffectRow(_Strict):
    """One measured figure, before and after the edit."""

    metric: str = Field(description="e.g. refusal_rate, over_refusal, mgsm_accuracy")
    suite: str
    lang: str
    split: str = Field(description="the held-out rows measured, e.g. 'multijail ids 160-209'")
    n: int = Field(ge=0)
    before: float
    after: float

    @field_validator("lang")
    @classmethod
    def _lang(cls, value: str) -> str:
        try:
            return check_language(value)
        except DataError as error:
            raise ValueError(str(error)) from None


class DeltaManifest(_Strict):
    """Everything a reader needs to trust and apply a delta file."""

    format: Literal["vsp-delta"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
    group: str = Field(description="delta set name, e.g. 'south-east-asian' or 'all'")
    languages: list[str] = Field(description="ISO 639-1 codes this delta targets")
    base_model: BaseModelRef
    tensors: list[EditedTensor]
    neuron_count: int = Field(gt=0, description="sum of edited neurons over all tensors")
    rank: int = Field(gt=0, description="the largest rank over all tensors")
    solver: dict[str, Any] = Field(default_factory=dict, description="solver settings used")
    data_digests: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each data file the solver read"
    )
    measured_effect: list[EffectRow] = Field(default_factory=list)
    tensors_sha256: str | None = Field(
        default=None,
        description="digest of the stored tensors (delta/digest.py): set by every write, "
        "checked by every read; absent only in files written before it existed",
    )
    created_by: str = f"vllm-safety-patch {__version__}"
    description: str = ""

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not GROUP_NAME.match(value):
            raise ValueError("must be 1-64 chars of a-z 0-9 . _ - starting with a letter/digit")
        return value

    @field_validator("tensors_sha256")
    @classmethod
    def _digest_hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value):
            raise ValueError("must be 64 lowercase hex characters (sha256)")
        return value

    @field_validator("languages")
    @classmethod
    def _languages(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one language")
        if len(set(value)) != len(value):
            raise ValueError("has duplicates")
        for code in value:
            try:
                check_language(code)
            except DataError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeltaManifest:
        if not self.tensors:
            raise ValueError("tensors: a delta must edit at least one tensor")
        names = [tensor.name for tensor in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensors: a tensor is listed twice")
        if self.neuron_count != sum(tensor.neurons for tensor in self.tensors):
            raise ValueError("neuron_count is not the sum of the tensors' neurons")
        if self.rank != max(tensor.rank for tensor in self.tensors):
            raise ValueError("rank is not the largest of the tensors' ranks")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): same manifest, same bytes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str) -> DeltaManifest:
        try:
            data = json.loads(text, object_pairs_hook=unique_keys)
        except DuplicateKeyError as duplicate:  # two values for one field: which one counts?
            raise DeltaFormatError(
                f"{source}: the manifest gives the key {duplicate.shown()} twice",
                "regenerate the delta with 'vsp solve'; do not edit the manifest by hand",
            ) from None
        except (ValueError, RecursionError) as error:  # JSONDecodeError, huge ints, nesting
            detail = (
                f"{error.msg} at char {error.pos}"
                if isinstance(error, json.JSONDecodeError)
                else type(error).__name__
            )
            raise DeltaFormatError(
                f"{source}: the manifest is not valid JSON ({detail})",
                "regenerate the delta with 'vsp solve'; do not edit the manifest by hand",
            ) from None
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            # One mistake repeated in every tensor entry reads once, with all its places.
            places: dict[str, list[str]] = {}
            for issue in error.errors():
                where = ".".join(str(part) for part in issue["loc"]) or "manifest"
                places.setdefault(issue["msg"], []).append(where)
            issues = "; ".join(f"{', '.join(where)}: {msg}" for msg, where in places.items())
            raise DeltaFormatError(
                f"{source}: the manifest is malformed ({issues})",
                "regenerate the delta with 'vsp solve' (format version "
                f"{FORMAT_VERSION}); do not edit the manifest by hand",
            ) from None
