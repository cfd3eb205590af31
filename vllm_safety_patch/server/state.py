"""What the API server knows about its safety patch: folder, model, active set, admin token.

One :class:`SafetyState` per API server process, stored as ``app.state.vsp_safety`` by the
endpoint plugin's ``init_state``. The weights themselves live in the workers; this process
keeps the record of what they hold and is the only one that changes it.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_safety_patch.delta.io import Delta, read_delta
from vllm_safety_patch.delta.verify import verify_against_checkpoint
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.checkpoint import Checkpoint
from vllm_safety_patch.models.fingerprint import short
from vllm_safety_patch.server.gate import SwitchGate
from vllm_safety_patch.server.protocol import ActiveDelta, DeltaInfo, SwitchRecord

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

HEADER = "X-Safety-Deltas"
DELTA_SUFFIX = ".safetensors"
# Environment the launcher (`vsp serve`) hands to the API server: vLLM's own argument parser
# rejects flags it does not know, so our settings cannot travel as flags.
DELTA_DIR_VAR = "VSP_DELTA_DIR"
TOKEN_FILE_VAR = "VSP_ADMIN_TOKEN_FILE"
TOKEN_VAR = "VSP_ADMIN_TOKEN"
DRAIN_TIMEOUT_VAR = "VSP_SWITCH_DRAIN_TIMEOUT_S"
DEFAULT_DRAIN_TIMEOUT_S = 60.0
MIN_TOKEN_LENGTH = 16
TOKEN_FIX = (
    "start the server with 'vsp serve --admin-token-file FILE' (or set VSP_ADMIN_TOKEN), "
    "e.g. FILE made by: python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE"
)

# A delta name is a file stem in the delta folder: never a path. No separators, no "..",
# nothing hidden, so a name can only ever resolve to DIR/<name>.safetensors.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TokenConfigError(VSPError):
    """The admin token could not be read or is too weak."""


def read_admin_token(environ: dict[str, str] | None = None) -> str | None:
    """The admin token: from ``VSP_ADMIN_TOKEN_FILE`` (what the flag sets), else
    ``VSP_ADMIN_TOKEN``; ``None`` when neither is set (admin routes then answer 403)."""
    environ = dict(os.environ) if environ is None else environ
    source = ""
    token: str | None = None
    if environ.get(TOKEN_FILE_VAR):
        path = Path(environ[TOKEN_FILE_VAR])
        source = f"admin token file {path}"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise TokenConfigError(
                f"cannot read the {source} ({error.__class__.__name__})",
                "pass a readable text file holding one token to --admin-token-file",
            ) from None
    elif TOKEN_VAR in environ:
        source = f"{TOKEN_VAR}"
        token = environ[TOKEN_VAR].strip()
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(char.isspace() for char in token):
        raise TokenConfigError(
            f"the {source} holds a token of {len(token)} characters or with white space; "
            f"a token that changes the served weights needs at least {MIN_TOKEN_LENGTH}",
            TOKEN_FIX,
        )
    return token


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
            sha256=self.sha256[:12],
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
    # Why activation cannot work on this server (no local checkpoint, no worker method,...).
    hot_patch_problem: str | None = None
    # Set when a failed switch could not be undone: inference is refused (503) from then on
    # rather than serving weights nobody can name.
    degraded: str | None = None
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    last_switch: SwitchRecord | None = None
    gate: SwitchGate = field(default_factory=SwitchGate)
    switch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    checkpoint: Checkpoint | None = None
    # sha256 -> None (matches the served checkpoint) or the problem: the checkpoint is fixed
    # for the server's life, so a file's verdict never changes.
    _verdicts: dict[str, str | None] = field(default_factory=dict)

    def header(self) -> str:
        return header_value(self.active) if self.degraded is None else "unknown"

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

    def verify(self, deltas: list[Delta]) -> None:
        """Raise the first problem of ``deltas`` against the served checkpoint (blocking)."""
        if self.checkpoint is None:
            self.checkpoint = Checkpoint(self.model_dir)
        for delta in deltas:
            verdict = self._verdicts.get(delta.sha256, "unknown")
            if verdict is None:
                continue
            verify_against_checkpoint([delta], self.checkpoint)
            self._verdicts[delta.sha256] = None

    def describe(self, name: str) -> DeltaInfo:
        """One entry of the listing (blocking: reads the file, maybe hashes base tensors)."""
        path = self.delta_path(name)
        active = {entry.sha256 for entry in self.active}

        def public(error: VSPError) -> str:
            # The listing is not admin-only: name the file, not where the server keeps it.
            return str(error).replace(str(path), path.name)

        try:
            delta = read_delta(path)
        except VSPError as error:
            return DeltaInfo(name=name, matches_model=False, problem=public(error))
        info = DeltaInfo(
            name=name,
            group=delta.group,
            languages=list(delta.manifest.languages),
            fingerprint=short(delta.manifest.base_model.fingerprint),
            sha256=delta.sha256[:12],
            matches_model=False,
            active=delta.sha256 in active,
        )
        problem = self._verdicts.get(delta.sha256, "unknown")
        if problem == "unknown":
            try:
                self.verify([delta])
                problem = None
            except VSPError as error:
                problem = public(error)
                self._verdicts[delta.sha256] = problem
        return info.model_copy(update={"matches_model": problem is None, "problem": problem})
