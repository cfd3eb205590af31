"""Solver settings and language groups: one typed object, loaded from TOML, overridable."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vllm_safety_patch.delta.manifest import GROUP_NAME
from vllm_safety_patch.errors import DataError, VSPError
from vllm_safety_patch.languages import check_language


def _per_language(
    field: str, value: dict[str, float], bound: str, within: Callable[[float], bool]
) -> dict[str, float]:
    """A per-language table's check: known language codes, each value ``within`` its bound."""
    for code, number in value.items():
        try:
            check_language(code)
        except DataError as error:
            raise ValueError(f"{field}: {error}") from None
        if not within(number):
            raise ValueError(f"{field}: {code} = {number} must be {bound}")
    return value


class SolverSettings(BaseModel):
    """How the edit is found and solved. Every field is recorded in the delta's manifest.

    A field added later defaults to the behaviour from before it existed, so a manifest that
    lacks it still describes its solve; the shipped configs set every field explicitly.
    """

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(
        default=[8, 11, 14, 17, 20], description="decoder layers whose MLP is edited"
    )
    edit: Literal["output", "input", "attention"] = Field(
        default="output",
        description="'output': columns S of down_proj, reading the safety neurons' "
        "activations; 'input' (the paper's edit, Algorithm 1): rows S of the matrices in "
        "input_matrices, reading the MLP input (the whole normed hidden state), with the "
        "English twin's pre-activation on S as the target; 'attention': columns S of "
        "self_attn.o_proj (S: the neurons_per_layer attention-head dimensions that best "
        "separate English harmful from harmless), with the English twin's attention output "
        "as the target (where vsp localize finds that patching restores refusal)",
    )
    input_matrices: list[Literal["gate_proj", "up_proj"]] = Field(
        default=["gate_proj", "up_proj"],
        description="with edit = 'input': which matrices' rows S are edited (each solved on "
        "its own target)",
    )
    neuron_selection: Literal["top-k", "appendix-b"] = Field(
        default="top-k",
        description="'top-k': the neurons_per_layer best by Cohen's d; 'appendix-b' (the "
        "paper's): harmful-minus-harmless mean with within-layer z-score > 2, united with "
        "Cohen's d > 1, both one-sided (harmful > harmless); neurons_per_layer caps the set "
        "(best d first)",
    )
    neurons_per_layer: int = Field(default=256, gt=0, description="safety neurons kept per layer")
    rank: int = Field(default=32, gt=0, description="rank of each layer's update")
    constraint: Literal["penalty", "projection"] = Field(
        default="penalty",
        description="benign preservation: weighted penalty, or exact null-space projection",
    )
    benign_weight: float = Field(
        default=1.0, ge=0, description="lambda of the penalty on every benign token"
    )
    decision_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the penalty on benign prompts at the decision positions (the "
        "tokens the pairs are matched at): English and each language of the group get a term "
        "of this weight relative to the pair term; 0 leaves only the all-token penalty",
    )
    decision_weights: dict[str, float] = Field(
        default_factory=dict,
        description="decision_weight per language, for the languages named (e.g. "
        "{ bn = 64.0 }: hold Bengali's benign prompts harder where the edit over-refuses "
        "them); the others keep decision_weight",
    )
    unpaired_languages: list[str] = Field(
        default_factory=list,
        description="languages of the group whose harmful pairs are left out of the update "
        "(their benign prompts are still held, at their decision weight): for a language "
        "the edit over-refuses whatever its weight, e.g. ['jv']",
    )
    decision_balance: Literal["group", "language"] = Field(
        default="group",
        description="what decision_weight is relative to: the group's whole pair term "
        "('group'), or each language's own part of it ('language': a language is held as "
        "firmly in a group of one as in 'all'; English gets the mean part)",
    )
    benign_alignment: float = Field(
        default=0.0,
        ge=0,
        description="weight of mapping each low-resource benign prompt (everyday rows) onto "
        "its English twin at the decision positions, as harmful prompts are; 0 keeps them fixed",
    )
    language_shift_removed: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of each language's mean shift to English on benign prompts (its "
        "everyday prompts' English twin minus own, per position) taken out of its harmful "
        "pairs' targets: 1 maps a harmful prompt only as far as its twin differs from it "
        "beyond being English (twin-residual targets otherwise teach the edit to answer in "
        "English)",
    )
    language_shifts: dict[str, float] = Field(
        default_factory=dict,
        description="per-language language_shift_removed, e.g. { bn = 0.0 }: a language whose "
        "own refusal the edit cannot reach keeps its English target while the others keep "
        "their language",
    )
    target_scale: float = Field(
        default=1.0,
        gt=0,
        description="multiplies every harmful pair's target change (after language_shift_removed, "
        "before refusal_push): above 1 the edit overshoots the twin, as a steering strength "
        "does. With benign prompts held at zero change (benign_alignment = 0) the update "
        "scales exactly with it",
    )
    refusal_push: float = Field(
        default=0.0,
        ge=0,
        description="adds this multiple of the base model's refuse-vs-answer direction to "
        "every harmful pair's target: the mean residual of the harmful fit prompts it refuses "
        "minus those it answers, within each language, pooled (solver/refusal_push.py); a "
        "push towards refusing that carries no language. Needs target = 'twin-residual'",
    )
    neuron_scoring: Literal["english", "within-language"] = Field(
        default="english",
        description="safety neurons separate harmful from harmless English prompts, or "
        "harmful from harmless prompts within each language (mean Cohen's d over languages)",
    )
    target: Literal["twin", "twin-residual", "refusal-direction"] = Field(
        default="twin",
        description="what a harmful prompt's edited output is moved towards: its English "
        "twin's whole output of the edited matrix ('twin'); the twin's residual stream just "
        "after that output is added ('twin-residual': the edit also closes the gap earlier "
        "layers left, as patching the twin's residual stream does in vsp localize); or only "
        "the twin output's component along the English refusal direction of the layer's "
        "residual stream ('refusal-direction', output edit only: English harmful minus "
        "harmless mean at the paired positions), so the edit writes refusal and leaves what "
        "carries the language alone",
    )
    ridge: float = Field(default=1e-3, ge=0, description="ridge mu, relative to the pair trace")
    null_space_energy: float = Field(
        default=0.99, gt=0, lt=1, description="benign energy removed by the projection"
    )
    positions: int = Field(default=1, gt=0, description="trailing prompt tokens paired")
    sequential: bool = Field(
        default=True,
        description="solve layers in order, each on activations edited by the layers "
        "before it (one pass per group, moved by that group's own update)",
    )
    batch_size: int = Field(default=16, gt=0)
    max_prompt_tokens: int = Field(default=256, gt=8)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("input_matrices")
    @classmethod
    def _matrices(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("input_matrices must name gate_proj and/or up_proj, once each")
        return sorted(value)

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("layers must be distinct non-negative layer indices")
        return sorted(value)

    @field_validator("language_shifts")
    @classmethod
    def _language_shifts(cls, value: dict[str, float]) -> dict[str, float]:
        return _per_language("language_shifts", value, "between 0 and 1", lambda v: 0 <= v <= 1)

    @field_validator("decision_weights")
    @classmethod
    def _decision_weights(cls, value: dict[str, float]) -> dict[str, float]:
        return _per_language("decision_weights", value, ">= 0", lambda v: v >= 0)

    @field_validator("unpaired_languages")
    @classmethod
    def _unpaired_languages(cls, value: list[str]) -> list[str]:
        for code in value:
            try:
                check_language(code)
            except DataError as error:
                raise ValueError(f"unpaired_languages: {error}") from None
        return sorted(set(value))

    @model_validator(mode="after")
    def _target_fits_edit(self) -> SolverSettings:
        # The direction is read from the residual stream after the edited MLP output.
        if self.target == "refusal-direction" and self.edit != "output":
            raise ValueError("target = 'refusal-direction' needs edit = 'output'")
        if self.target == "twin-residual" and self.edit == "input":
            raise ValueError("target = 'twin-residual' needs edit = 'output' or 'attention'")
        return self


class DataSettings(BaseModel):
    """Which development rows the solver fits on (the rest stay held out for evaluation)."""

    model_config = ConfigDict(extra="forbid")

    multijail_ids: tuple[int, int] = Field(
        default=(0, 160), description="[start, stop) MultiJail ids used for pairs"
    )
    polyrefuse_pairs: int = Field(
        default=0, ge=0, description="PolyRefuse harmful train rows added as pairs, per language"
    )
    english_harmless: int = Field(
        default=200, ge=1, description="PolyRefuse harmless train (en) rows for neuron scoring"
    )
    benign_per_language: int = Field(
        default=30, ge=0, description="PolyRefuse harmless train rows per language (constraint)"
    )
    mgsm_rows: tuple[int, int] = Field(
        default=(0, 30), description="[start, stop) MGSM rows per language (constraint)"
    )
    everyday_rows: int = Field(
        default=0,
        ge=0,
        description="everyday train rows per language, English included (constraint, "
        "alignment twins, harmless class for neuron scoring)",
    )


class SolveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    solver: SolverSettings = SolverSettings()
    data: DataSettings = DataSettings()
    groups: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, languages in value.items():
            if not GROUP_NAME.match(name):
                # The delta's manifest refuses such a name: say so before a long solve.
                raise ValueError(
                    f"group name '{name}' must be 1-64 chars of a-z 0-9 . _ - starting with a "
                    "letter or digit (it names the delta file and the served set)"
                )
            if not languages:
                raise ValueError(f"group '{name}' has no languages")
            for code in languages:
                if code == "en":
                    raise ValueError(f"group '{name}': English is the target, not a source")
                try:
                    check_language(code)
                except DataError as error:
                    raise ValueError(f"group '{name}': {error}") from None
        return value

    @model_validator(mode="after")
    def _unpaired_in_groups(self) -> SolveConfig:
        grouped = {code for languages in self.groups.values() for code in languages}
        stray = [code for code in self.solver.unpaired_languages if code not in grouped]
        if self.groups and stray:
            raise ValueError(
                f"unpaired_languages {stray} are in no group: a language is held unpaired "
                "only inside a group that has it"
            )
        return self

    @model_validator(mode="after")
    def _push_needs_residual_targets(self) -> SolveConfig:
        # The direction is read from the residual stream after the layer: only targets in
        # that space can take it.
        if self.solver.refusal_push and self.solver.target != "twin-residual":
            raise ValueError(
                "refusal_push adds a residual-stream direction to the targets: it needs "
                f"target = 'twin-residual' (this config has '{self.solver.target}'), or set "
                "refusal_push = 0"
            )
        return self

    @model_validator(mode="after")
    def _shift_needs_everyday(self) -> SolveConfig:
        # The shift is measured on the everyday prompts' English twins: refuse before the
        # forward pass rather than after it.
        shifting = self.solver.language_shift_removed or any(self.solver.language_shifts.values())
        if shifting and not self.data.everyday_rows:
            raise ValueError(
                "language_shift_removed needs everyday prompts with English twins: set "
                "[data] everyday_rows > 0, or language_shift_removed = 0"
            )
        return self


def load_solve_config(path: str | Path) -> SolveConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VSPError(f"no solver config at {path}", "pass --config deltas/solve.toml") from None
    except tomllib.TOMLDecodeError as error:
        raise VSPError(f"{path} is not valid TOML ({error})", "fix the syntax") from None
    try:
        return SolveConfig.model_validate(raw)
    except ValidationError as error:
        issues = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}" for issue in error.errors()
        )
        raise VSPError(f"{path}: invalid solver config ({issues})", "fix the named keys") from None
