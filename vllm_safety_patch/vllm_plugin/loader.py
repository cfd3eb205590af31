"""Load-time merge: a vLLM model loader that applies vsp deltas while the weights stream in.

Select it with ``--load-format vsp`` and name the deltas with
``--model-loader-extra-config '{"deltas": ["/abs/path/a.safetensors", ...]}'`` (or the
``VSP_DELTAS`` environment variable, ``os.pathsep``-separated, when that key is absent).

The edit happens in :meth:`DeltaMergingModelLoader.get_all_weights`, on the HF-named tensors
*before* vLLM fuses (``gate_up_proj``) and shards them, so the same code is correct under
tensor and pipeline parallelism: every rank edits the full tensor, then keeps its slice.
Every refusal raises one of our :class:`~vllm_safety_patch.errors.VSPError` types, whose
``str()`` is one line naming the problem and the fix; start-up then fails. Base weights are
never served by accident (cf. vLLM issue #55193): a delta that is not applied in full, or
whose fingerprint does not match the streamed tensors, stops the load.

Nothing here imports vLLM at module import time; :func:`register_loader` does, lazily.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import os
import sys
import tempfile
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vllm_safety_patch import settings
from vllm_safety_patch.delta.io import Delta, TensorEdit, read_delta
from vllm_safety_patch.delta.merge import check_distinct, edit_weight, edits_by_tensor
from vllm_safety_patch.delta.verify import OTHER_MODEL_FIX, check_architecture, check_fingerprint
from vllm_safety_patch.errors import DeltaMismatchError, VSPError
from vllm_safety_patch.models.fingerprint import short, tensor_digest

if TYPE_CHECKING:
    from torch import nn

LOAD_FORMAT = "vsp"
DELTAS_KEY = "deltas"
ENV_VAR = settings.DELTAS.name
# Where worker processes leave their refusal for the top process to print last (see below).
REFUSAL_FILE_VAR = settings.REFUSAL_FILE.name
LOADER_CLASS_NAME = "DeltaMergingModelLoader"

# A child of the "vllm" logger so vLLM's handler, format and VLLM_LOGGING_LEVEL apply: a
# logger outside that tree has no handler in vLLM processes and its INFO lines vanish.
logger = logging.getLogger(f"vllm.{__name__}")

CONFIG_FIX = (
    'pass --model-loader-extra-config \'{"deltas": ["/abs/path/delta.safetensors"]}\' '
    f"(or set {ENV_VAR}); use '{{\"deltas\": []}}' to serve base weights on purpose"
)


class LoaderConfigError(VSPError):
    """``--load-format vsp`` was given a configuration it cannot use."""


class AppliedDelta(NamedTuple):
    """One delta the loader merged into this process's weights."""

    group: str
    sha256: str
    fingerprint: str


# What the last completed load in this process applied. In a served model the loader runs
# in the worker processes, so the API server must ask the workers (collective_rpc).
_applied: list[AppliedDelta] = []
_loader_class: type | None = None


def applied_deltas() -> list[AppliedDelta]:
    """The deltas merged by the last ``vsp`` load in this process, in group order.

    Empty before any load, while one runs, after one failed, and for ``"deltas": []``.
    """
    return list(_applied)


def delta_paths_from_config(
    extra_config: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[list[Path], dict[str, Any]]:
    """Split the extra config into our delta paths and the keys meant for vLLM's loader."""
    rest = {key: value for key, value in extra_config.items() if key != DELTAS_KEY}
    if DELTAS_KEY in extra_config:
        raw = extra_config[DELTAS_KEY]
        if isinstance(raw, str) or not isinstance(raw, list | tuple):
            raise LoaderConfigError(
                f'--model-loader-extra-config: "{DELTAS_KEY}" must be a JSON list of delta '
                f"file paths, got {type(raw).__name__}",
                CONFIG_FIX,
            )
        entries = list(raw)
    elif settings.DELTAS.is_set(environ):
        entries = settings.split_list(settings.DELTAS.raw(environ), os.pathsep)
    else:
        # --load-format vsp without deltas is a deployment mistake, never "serve base".
        raise LoaderConfigError(
            f'--load-format {LOAD_FORMAT} was given no deltas (no "{DELTAS_KEY}" in '
            f"--model-loader-extra-config and no {ENV_VAR} variable)",
            CONFIG_FIX,
        )
    paths: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise LoaderConfigError(
                f'--model-loader-extra-config: "{DELTAS_KEY}" holds {entry!r}, not a path',
                CONFIG_FIX,
            )
        # Absolute, so an error names the file the worker actually looked for.
        paths.append(Path(os.path.abspath(entry.strip())))
    return paths, rest


def read_deltas(paths: Sequence[Path]) -> list[Delta]:
    """Read every delta, refusing the same file or the same group twice."""
    deltas = [read_delta(path) for path in paths]
    check_distinct(deltas)
    return sorted(deltas, key=lambda delta: delta.group)


def read_model_config_json(model: str, revision: str | None) -> dict[str, Any]:
    """The checkpoint's raw ``config.json`` (what ``vsp`` fingerprints), not vLLM's view."""
    from vllm.transformers_utils.repo_utils import get_hf_file_to_dict

    config = get_hf_file_to_dict("config.json", model, revision)
    if not isinstance(config, dict):
        raise DeltaMismatchError(
            f"'{model}' has no readable config.json to check the deltas against",
            "serve an HF safetensors checkpoint folder (config.json + *.safetensors)",
        )
    return config


class MergePlan:
    """Deltas validated for one checkpoint, and the bookkeeping of one streaming pass."""

    def __init__(self, deltas: Sequence[Delta], config: Mapping[str, Any]) -> None:
        self.deltas = list(deltas)
        self.config = dict(config)
        self.edits: dict[str, list[TensorEdit]] = edits_by_tensor(self.deltas)

    @classmethod
    def prepare(cls, paths: Sequence[Path], config: Mapping[str, Any]) -> MergePlan:
        """Read every delta and check its architecture: all before any weight streams."""
        deltas = read_deltas(paths)
        for delta in deltas:
            check_architecture(delta, config)
        # Every delta sharing a tensor must agree on its shape, or one of them is wrong.
        plan = cls(deltas, config)
        for name, edits in plan.edits.items():
            shapes = {edit.spec.shape for edit in edits}
            if len(shapes) > 1:
                raise DeltaMismatchError(
                    f"deltas disagree on the shape of '{name}' ({sorted(shapes)})",
                    OTHER_MODEL_FIX,
                )
        return plan

    def stream(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Generator[tuple[str, torch.Tensor], None, list[AppliedDelta]]:
        """Yield ``weights`` with the edited tensors replaced; verify all at the end."""
        digests: dict[str, str] = {}
        for name, tensor in weights:
            edits = self.edits.get(name)
            if edits is None:
                yield name, tensor
                continue
            if name in digests:  # editing one tensor twice would double the edit
                raise DeltaMismatchError(
                    f"the checkpoint holds '{name}' twice, an edited tensor must be unique",
                    "remove the duplicate safetensors shard from the model folder",
                )
            expected = edits[0].spec.shape
            if tuple(tensor.shape) != expected:
                raise DeltaMismatchError(
                    f"{self._sources(name)}: '{name}' is {list(tensor.shape)} in the model, "
                    f"{list(expected)} in the delta",
                    OTHER_MODEL_FIX,
                )
            # Digest the tensor as stored (checkpoint dtype, before vLLM casts it to the
            # serving dtype) so it equals what 'vsp verify' reads from the file.
            digests[name] = tensor_digest(tensor)
            yield name, edit_weight(tensor, edits)
        missing = sorted(set(self.edits) - set(digests))
        if missing:
            raise DeltaMismatchError(
                f"{self._sources(missing[0])}: the checkpoint streamed no tensor "
                f"'{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                OTHER_MODEL_FIX,
            )
        applied = []
        for delta in self.deltas:
            check_fingerprint(delta, self.config, {name: digests[name] for name in delta.edits})
            applied.append(
                AppliedDelta(delta.group, delta.sha256, delta.manifest.base_model.fingerprint)
            )
        return applied

    def _sources(self, name: str) -> str:
        return ", ".join(delta.source for delta in self.deltas if name in delta.edits)


def _log_applied(plan: MergePlan) -> None:
    if not plan.deltas:
        logger.info('vsp: no deltas configured ("deltas": []): serving base weights')
        return
    for delta in plan.deltas:
        logger.info(
            "vsp: applied delta group=%s tensors=%d fingerprint=%s sha256=%s (%s)",
            delta.group,
            len(delta.edits),
            short(delta.manifest.base_model.fingerprint),
            short(delta.sha256),
            delta.source,
        )


def _log_refusal(error: VSPError) -> None:
    """Log the refusal here and hand it to the top process, which prints it last."""
    logger.error("vsp: refusing to start: %s", error)
    relay = settings.REFUSAL_FILE.raw()
    # Only children relay: in the top process the exception itself reaches the caller.
    if relay and multiprocessing.parent_process() is not None:
        try:
            with open(relay, "a", encoding="utf-8") as handle:
                handle.write(f"{error}\n")
        except OSError:
            pass  # the log line above still carries it


# A refusal in a worker reaches the API server only as "Engine core initialization failed.
# See root cause above.", ~100 traceback lines below our line. The top process (API server,
# or the script that built vllm.LLM) therefore prints the workers' refusals after its own
# traceback, so the one line naming problem and fix is the last thing the operator reads.
def _install_refusal_relay() -> None:
    if multiprocessing.parent_process() is not None:
        return  # a vLLM child (EngineCore, worker): it writes to the inherited file
    if os.path.basename(settings.REFUSAL_FILE.raw() or "").startswith(_relay_prefix()):
        return  # already installed in this process
    relay = os.path.join(tempfile.gettempdir(), f"{_relay_prefix()}{uuid.uuid4().hex}.txt")
    settings.REFUSAL_FILE.set_here(relay)  # inherited by the processes vLLM spawns
    previous_hook = sys.excepthook

    def print_refusals_last(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        previous_hook(kind, value, traceback)
        lines = _take_refusals(relay)
        if lines and not isinstance(value, VSPError):  # a VSPError is already the last line
            for line in lines:
                print(f"\nvsp: start-up refused: {line}", file=sys.stderr, flush=True)

    sys.excepthook = print_refusals_last
    atexit.register(_take_refusals, relay)


def _relay_prefix() -> str:
    return f"vsp-refusal-{os.getpid()}-"


def _take_refusals(relay: str) -> list[str]:
    """Read and delete the relay file: the refusals, each once, in order."""
    try:
        with open(relay, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
        os.unlink(relay)
    except OSError:
        return []
    return list(dict.fromkeys(lines))


def _make_loader_class() -> type:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader

    class DeltaMergingModelLoader(DefaultModelLoader):
        """``DefaultModelLoader`` (safetensors) that merges vsp deltas into the stream."""

        def __init__(self, load_config: LoadConfig) -> None:
            extra = load_config.model_loader_extra_config
            # A new dict, never a pop: vLLM builds this loader again from the same LoadConfig
            # when it reloads weights, and the deltas must still be there.
            try:
                if not isinstance(extra, dict):
                    raise LoaderConfigError(
                        "--model-loader-extra-config must be a JSON object for "
                        f"--load-format {LOAD_FORMAT}",
                        CONFIG_FIX,
                    )
                self.delta_paths, rest = delta_paths_from_config(extra)
            except VSPError as error:
                _log_refusal(error)
                raise
            super().__init__(
                dataclasses.replace(
                    load_config, load_format="safetensors", model_loader_extra_config=rest
                )
            )
            self._plan: MergePlan | None = None
            self._plan_model: str | None = None
            self._completed = False

        def plan_for(self, model_config: ModelConfig) -> MergePlan:
            """Read and check the deltas for this checkpoint (once per checkpoint)."""
            if self._plan is None or self._plan_model != model_config.model:
                try:
                    config = read_model_config_json(model_config.model, model_config.revision)
                    self._plan = MergePlan.prepare(self.delta_paths, config)
                except VSPError as error:
                    _log_refusal(error)
                    raise
                self._plan_model = model_config.model
            return self._plan

        def load_model(
            self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
        ) -> nn.Module:
            self.plan_for(model_config)  # fail before the model is even allocated
            return super().load_model(vllm_config, model_config, prefix)

        def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
            self.plan_for(model_config)
            self._completed = False
            super().load_weights(model, model_config)
            if not self._completed:  # the model stopped reading early: edits unverified
                error = DeltaMismatchError(
                    f"{model_config.model}: the model stopped reading weights before the vsp "
                    "loader could verify every delta",
                    "serve a merged checkpoint written by 'vsp apply' with the default loader, "
                    "and report this model architecture to vllm-safety-patch",
                )
                _log_refusal(error)
                raise error

        def get_all_weights(
            self, model_config: ModelConfig, model: nn.Module
        ) -> Generator[tuple[str, torch.Tensor], None, None]:
            global _applied
            plan = self.plan_for(model_config)
            _applied = []  # a load that does not complete reports nothing
            try:
                applied = yield from plan.stream(super().get_all_weights(model_config, model))
            except VSPError as error:
                _log_refusal(error)
                raise
            _applied = applied
            self._completed = True
            _log_applied(plan)

    # Importable as loader.DeltaMergingModelLoader (module __getattr__), so it pickles.
    DeltaMergingModelLoader.__qualname__ = LOADER_CLASS_NAME
    return DeltaMergingModelLoader


def register_loader() -> type:
    """Register the ``vsp`` load format with vLLM. Idempotent; runs in every vLLM process."""
    global _loader_class
    from vllm.model_executor import model_loader

    if _loader_class is None:
        _loader_class = _make_loader_class()
        _install_refusal_relay()
    # Registering again only logs a "will be overwritten" warning: skip it when ours is in.
    registry = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", None)
    if registry is None or registry.get(LOAD_FORMAT) is not _loader_class:
        model_loader.register_model_loader(LOAD_FORMAT)(_loader_class)
    return _loader_class


def __getattr__(name: str) -> Any:
    # The class subclasses a vLLM type, so it exists only once vLLM is imported: on demand.
    if name == LOADER_CLASS_NAME:
        return register_loader()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
