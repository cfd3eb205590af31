"""What the API server knows about its safety patch: folder, model, active set, admin token.

One :class:`SafetyState` per API server process, stored as ``app.state.vsp_safety`` by the
endpoint plugin's ``init_state``. The weights themselves live in the workers; this process
keeps the record of what they hold and is the only one that changes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_safety_patch import settings
from vllm_safety_patch.delta.effect_review import review_effect
from vllm_safety_patch.delta.header import SafetensorsHeader, parse_header
from vllm_safety_patch.delta.io import FACTOR_DTYPE, NEURONS_DTYPE, Delta, read_delta, tensor_key
from vllm_safety_patch.delta.manifest import MANIFEST_KEY, DeltaManifest
from vllm_safety_patch.delta.verify import (
    check_architecture,
    check_fingerprint,
    check_shapes,
    verify_against_checkpoint,
)
from vllm_safety_patch.errors import DeltaFormatError, VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import (
    editable_tensor_names,
    fingerprint_from_digests,
    short,
    tensor_digest,
)
from vllm_safety_patch.server.canary import CanarySettings
from vllm_safety_patch.server.canary_baseline import Baseline, baseline_for
from vllm_safety_patch.server.gate import SwitchGate
from vllm_safety_patch.server.protocol import (
    ActiveDelta,
    DeltaInfo,
    LanguageEffectInfo,
    SwitchRecord,
)

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

logger = logging.getLogger(f"vllm.{__name__}")

HEADER = "X-Safety-Deltas"
DELTA_SUFFIX = ".safetensors"
# The listing reads headers only; a delta's header is a few kB, a model's tens of kB.
LISTING_HEADER_CAP = 1 << 20
# A delta name is a file stem in the delta folder: never a path. No separators, no "..",
# nothing hidden, so a name can only ever resolve to DIR/<name>.safetensors.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# Problems the open listing reports. Fixed texts: never bytes of the file (it may be any file,
# e.g. a link to /etc/passwd), never the server's paths.
OUTSIDE_FOLDER = (
    "a link to a file outside the delta folder: refused; copy the file into the folder instead"
)
UNREADABLE = "the server cannot read it (permissions or I/O error); fix the file's permissions"
NOT_A_DELTA = (
    "not a valid vsp delta (damaged, truncated or another kind of file); "
    "check it with 'vsp verify', or regenerate it with 'vsp solve'"
)
HEADER_TOO_LARGE = (
    f"its header is over {LISTING_HEADER_CAP} bytes, which no delta's is: not a vsp delta; "
    "remove it from the delta folder"
)
OTHER_MODEL_FIX = "use a delta solved for this model, or solve one with 'vsp solve'"
OTHER_ARCHITECTURE = f"solved for another architecture; {OTHER_MODEL_FIX}"
OTHER_SHAPES = f"edits tensors this model lacks or has in another shape; {OTHER_MODEL_FIX}"
OTHER_WEIGHTS = (
    f"solved for other base weights (fingerprint mismatch: another model, or another "
    f"conversion of it); {OTHER_MODEL_FIX}"
)


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is unchanged without reading it (a rewrite changes size or mtime)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _identity(path: Path) -> FileIdentity | None:
    try:
        return FileIdentity.of(path.stat())
    except OSError:
        return None


def read_header_capped(fd: int, size: int, source: str) -> SafetensorsHeader | str:
    """The safetensors header of an open file, reading at most the cap; or a problem."""
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        return NOT_A_DELTA
    (length,) = struct.unpack("<Q", prefix)
    if length > LISTING_HEADER_CAP:
        return HEADER_TOO_LARGE
    try:
        return parse_header(prefix + os.pread(fd, length, 8), size, source)
    except DeltaFormatError:
        return NOT_A_DELTA


def manifest_of(header: SafetensorsHeader, source: str) -> DeltaManifest | None:
    """The manifest, if the header holds one and its tensors are exactly those it names."""
    try:
        manifest = DeltaManifest.from_json(header.metadata[MANIFEST_KEY], source)
    except (KeyError, DeltaFormatError):
        return None
    expected = {
        tensor_key(spec.name, part): (NEURONS_DTYPE if part == "neurons" else FACTOR_DTYPE, shape)
        for spec in manifest.tensors
        for part, shape in spec.factor_shapes().items()
    }
    found = {key: (entry.dtype, entry.shape) for key, entry in header.tensors.items()}
    return manifest if found == expected else None


def check_name(name: Any) -> str:
    """A plain delta name, or :class:`ValueError` saying why not."""
    if not isinstance(name, str):
        raise ValueError(f"{name!r} is not a string")
    if "/" in name or "\\" in name or ".." in name or not _NAME.match(name):
        raise ValueError(
            f"'{name}' is not a delta name (letters, digits, '.', '_', '-'; no path parts)"
        )
    return name


@dataclass(frozen=True)
class ActiveEntry:
    """One delta merged into the served weights, as this process records it."""

    group: str
    sha256: str
    fingerprint: str
    path: str
    tensors: frozenset[str]
    name: str | None = None

    @classmethod
    def of(cls, delta: Delta, path: Path, delta_dir: Path) -> ActiveEntry:
        in_dir = path.parent.resolve() == delta_dir.resolve() and path.suffix == DELTA_SUFFIX
        return cls(
            group=delta.group,
            sha256=delta.sha256,
            fingerprint=delta.manifest.base_model.fingerprint,
            path=str(path),
            tensors=frozenset(delta.edits),
            name=path.stem if in_dir else None,
        )

    def label(self) -> str:
        return f"{self.group}@{short(self.fingerprint)}"

    def public(self) -> ActiveDelta:
        return ActiveDelta(
            name=self.name,
            group=self.group,
            fingerprint=short(self.fingerprint),
            sha256=short(self.sha256),
        )


def header_value(active: list[ActiveEntry]) -> str:
    return ",".join(entry.label() for entry in active) if active else "none"


@dataclass
class SafetyState:
    """The safety patch as one API server process sees it."""

    delta_dir: Path
    model_dir: Path
    served_model: str
    admin_token: str | None
    active: list[ActiveEntry] = field(default_factory=list)
    engine: EngineClient | None = None
    # Why activation cannot work on this server (no local checkpoint, no worker method,...):
    # fixed words for the open listing; the detail (paths, worker errors) for the log and
    # the admin routes only.
    hot_patch_problem: str | None = None
    hot_patch_detail: str | None = None
    # Set when a failed switch could not be undone: inference is refused (503) from then on
    # rather than serving weights nobody can name. The detail goes to the log and the admin
    # routes; users get a generic answer with ``incident``, the id the log line carries.
    degraded: str | None = None
    incident: str | None = None
    drain_timeout_s: float = settings.SWITCH_DRAIN_TIMEOUT_S.value
    send_stall_timeout_s: float = settings.SEND_STALL_TIMEOUT_S.value
    shutdown_timeout_s: float = settings.SHUTDOWN_TIMEOUT_S.value
    canary: CanarySettings = field(default_factory=CanarySettings)
    # Set when the server begins shutting down (vLLM stops the engine): an activation in
    # flight answers 503 at once, and new ones are refused.
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    last_switch: SwitchRecord | None = None
    gate: SwitchGate = field(default_factory=SwitchGate)
    switch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    checkpoint: Checkpoint | None = None
    # sha256 -> None: verified against the served checkpoint, which is fixed for the server's
    # life, so a file's verdict never changes and each is checked once.
    _verdicts: dict[str, None] = field(default_factory=dict)
    # The open listing's memory, so a call costs a stat per file, not a read: name -> (file
    # identity, what its header said); identity -> sha256 of files this process read whole
    # (at start-up or activation); base tensor name -> digest (for fingerprints).
    _listed: dict[str, tuple[FileIdentity, DeltaInfo]] = field(default_factory=dict)
    _digests: dict[FileIdentity, str] = field(default_factory=dict)
    _base_digests: dict[str, str] = field(default_factory=dict)
    _model_fingerprint: str | None = None
    # Listing and activation run in threads and share the caches and the checkpoint.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def header(self) -> str:
        return header_value(self.active) if self.degraded is None else "unknown"

    def degrade(self, detail: str) -> None:
        """Refuse inference from now on; the log gets ``detail`` under a new incident id."""
        self.incident = secrets.token_hex(4)
        self.degraded = detail
        logger.critical(
            "vsp: incident %s: %s; refusing inference until restarted", self.incident, detail
        )

    def delta_path(self, name: str) -> Path:
        return self.delta_dir / f"{name}{DELTA_SUFFIX}"

    def available_names(self) -> list[str]:
        if not self.delta_dir.is_dir():
            return []
        return sorted(
            path.stem
            for path in self.delta_dir.glob(f"*{DELTA_SUFFIX}")
            if path.is_file() and _NAME.match(path.stem) and ".." not in path.stem
        )

    def inside_folder(self, path: Path) -> bool:
        """Whether ``path``, links followed, is in the delta folder (links may not leave it)."""
        return path.resolve().is_relative_to(self.delta_dir.resolve())

    def checkpoint_of(self) -> Checkpoint:
        if self.checkpoint is None:
            self.checkpoint = Checkpoint(self.model_dir)
        return self.checkpoint

    def read_recorded(self, path: Path) -> Delta:
        """:func:`read_delta`, remembering the digest under the file's identity for the
        listing (only if the file did not change while it was read). Blocking."""
        before = _identity(path)
        delta = read_delta(path)  # raises DeltaFormatError for a missing or bad file
        if before is not None and _identity(path) == before:
            with self._lock:
                self._digests[before] = delta.sha256
        return delta

    def baseline(self) -> Baseline | None:
        """The shipped base-model figures for the served checkpoint, if any (blocking: the
        first call hashes every MLP weight, about 2 s for the default model)."""
        with self._lock:
            if self._model_fingerprint is None:
                checkpoint = self.checkpoint_of()
                names = editable_tensor_names(checkpoint.tensor_names())
                for name in names:
                    if name not in self._base_digests:
                        self._base_digests[name] = tensor_digest(checkpoint.get(name))
                digests = {name: self._base_digests[name] for name in names}
                self._model_fingerprint = fingerprint_from_digests(checkpoint.config, digests)
            return baseline_for(self._model_fingerprint)

    def verify(self, deltas: list[Delta]) -> None:
        """Raise the first problem of ``deltas`` against the served checkpoint (blocking)."""
        with self._lock:
            checkpoint = self.checkpoint_of()
            for delta in deltas:
                verdict = self._verdicts.get(delta.sha256, "unknown")
                if verdict is None:
                    continue
                verify_against_checkpoint([delta], checkpoint)
                self._verdicts[delta.sha256] = None

    def available(self) -> list[DeltaInfo]:
        """The listing: one entry per delta file (blocking: a stat per file, and a header
        read for the files that are new or changed since the last call)."""
        with self._lock:
            names = self.available_names()
            listed = {name: self._describe(name) for name in names}
            # Forget files that left the folder (bounded by what the folder holds).
            self._listed = {name: self._listed[name] for name in names if name in self._listed}
            present = {identity for identity, _ in self._listed.values()}
            self._digests = {k: v for k, v in self._digests.items() if k in present}
            return list(listed.values())

    def _describe(self, name: str) -> DeltaInfo:
        path = self.delta_path(name)
        if not self.inside_folder(path):
            return DeltaInfo(name=name, matches_model=False, problem=OUTSIDE_FOLDER)
        try:
            # Non-blocking: a FIFO swapped in for the file must not hang the listing.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return DeltaInfo(name=name, matches_model=False, problem=UNREADABLE)
        try:
            status = os.fstat(fd)  # of what was opened: the facts below belong to it
            identity = FileIdentity.of(status)
            cached = self._listed.get(name)
            if cached is None or cached[0] != identity:
                if not stat.S_ISREG(status.st_mode):
                    return DeltaInfo(name=name, matches_model=False, problem=NOT_A_DELTA)
                cached = (identity, self._header_facts(name, fd, status.st_size))
                self._listed[name] = cached
        except OSError:
            return DeltaInfo(name=name, matches_model=False, problem=UNREADABLE)
        finally:
            os.close(fd)
        sha256 = self._digests.get(identity)
        active = sha256 is not None and sha256 in {entry.sha256 for entry in self.active}
        short_sha = short(sha256) if sha256 else None
        return cached[1].model_copy(update={"sha256": short_sha, "active": active})

    def _header_facts(self, name: str, fd: int, size: int) -> DeltaInfo:
        """What the header of one file says, and whether it fits the served model."""
        source = f"{name}{DELTA_SUFFIX}"
        header = read_header_capped(fd, size, source)
        manifest = manifest_of(header, source) if not isinstance(header, str) else None
        if manifest is None:
            problem = header if isinstance(header, str) else NOT_A_DELTA
            return DeltaInfo(name=name, matches_model=False, problem=problem)
        problem = self._model_problem(manifest, source)
        review = review_effect(manifest)
        return DeltaInfo(
            name=name,
            group=manifest.group,
            languages=list(manifest.languages),
            fingerprint=short(manifest.base_model.fingerprint),
            matches_model=problem is None,
            problem=problem,
            effect=[LanguageEffectInfo(**vars(row)) for row in review.languages],
            flags=list(review.flags),
        )

    def _model_problem(self, manifest: DeltaManifest, source: str) -> str | None:
        """The manifest against the served checkpoint: architecture, shapes, fingerprint.
        Reads only base tensors (each hashed once); the delta's tensor bytes are checked
        when it is activated."""
        checkpoint = self.checkpoint_of()
        delta = Delta(manifest=manifest, edits={}, sha256="", source=source)
        shapes = {name: checkpoint.shape(name) for name in checkpoint.tensor_names()}
        edited = [spec.name for spec in manifest.tensors]

        def fingerprint() -> None:
            for name in edited:
                if name not in self._base_digests:
                    self._base_digests[name] = tensor_digest(checkpoint.get(name))
            digests = {name: self._base_digests[name] for name in edited}
            check_fingerprint(delta, checkpoint.config, digests)

        checks: list[tuple[Callable[[], None], str]] = [
            (lambda: check_architecture(delta, checkpoint.config), OTHER_ARCHITECTURE),
            (lambda: check_shapes(delta, shapes), OTHER_SHAPES),
            (fingerprint, OTHER_WEIGHTS),
        ]
        for check, problem in checks:
            try:
                check()
            except VSPError:
                return problem
        return None
