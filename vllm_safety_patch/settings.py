"""Every ``VSP_*`` environment variable, every default path, in one place.

Each variable is named once here, with its default, its parser and its help text; every other
module reads it through this module (``tests/test_settings.py`` checks that no other module
spells a ``VSP_`` name, and that the README's table lists exactly these variables).
Variables are read when asked for, never cached at import: tests and the launcher hand in
their own environments.

Variables that vsp sets for vLLM (``VLLM_*``) stay where they are set; the variables that
only the deploy scripts and ``scripts/setup.sh`` read (``VSP_MODEL``, ``VSP_HOST``,
``VSP_PORT``, ``VSP_TARGET``, ``VSP_SKIP_MODEL``) are documented with those scripts.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vllm_safety_patch.errors import VSPError

PREFIX = "VSP_"
DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
# VLLM_CPU_KVCACHE_SPACE (GiB) that vsp sets on a CPU machine unless the caller set it: the
# default model's 32k-token window needs about 0.75 GiB of fp32 KV cache, the 1.5B's 1.75.
# deploy/ (Dockerfile, compose, Helm values) uses the same figure; tests/test_settings.py
# checks that it does.
CPU_KV_CACHE_GIB = 2

Environ = Mapping[str, str]


def _environ(environ: Environ | None) -> Environ:
    return os.environ if environ is None else environ


def split_list(text: str | None, separators: str = ",") -> list[str]:
    """The items of a list given as text, stripped, empty ones dropped: ``"a, b,,c"`` ->
    ``["a", "b", "c"]``. Any character of ``separators`` separates (``VSP_DELTAS`` and
    ``--deltas`` take ``os.pathsep`` too)."""
    text = text or ""
    for separator in separators[1:]:
        text = text.replace(separator, separators[0])
    return [part.strip() for part in text.split(separators[0]) if part.strip()]


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder once links are followed."""
    return os.path.realpath(a) == os.path.realpath(b)


@dataclass(frozen=True)
class Variable:
    """One ``VSP_*`` variable: its name, what it does (the README's table), its default."""

    name: str
    help: str
    # What an unset (or empty) variable means, as the README shows it; "" when it has none.
    default: str = ""

    def raw(self, environ: Environ | None = None) -> str | None:
        """The value as set (not stripped), ``None`` when unset."""
        return _environ(environ).get(self.name)

    def text(self, environ: Environ | None = None) -> str:
        """The value, stripped; ``""`` when unset."""
        return (self.raw(environ) or "").strip()

    def is_set(self, environ: Environ | None = None) -> bool:
        return self.name in _environ(environ)

    def set_here(self, value: str) -> None:
        """Set it in this process (inherited by every process it starts from now on)."""
        os.environ[self.name] = value


@dataclass(frozen=True)
class NumberVariable(Variable):
    """A number in ``[low, high]`` (``(low, high]`` with ``low_open``); unset or empty means
    the default. The one number parser: every bad value is a :class:`VSPError` naming the
    variable, the value and the fix."""

    value: float = 0.0
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    unit: str = ""  # "seconds": named in the error

    def number(self, environ: Environ | None = None) -> float:
        text = self.text(environ)
        if not text:
            return self.value
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above_low = value > self.low if self.low_open else value >= self.low
        if not (above_low and value <= self.high and math.isfinite(value)):
            raise VSPError(
                f"{self.name}={text[:40]!r} is not {self.wanted()}",
                f"set {self.name} to e.g. {self.value:g}, or unset it for that default",
            )
        return value

    def integer(self, environ: Environ | None = None) -> int:
        # Truncated, as the canary always read its counts (VSP_CANARY_PROMPTS=12.5 -> 12).
        return int(self.number(environ))

    def wanted(self) -> str:
        """``a positive number of seconds``, ``a number from 1 to 64``, ..."""
        of = f" of {self.unit}" if self.unit else ""
        if self.high == math.inf:
            if self.low == 0 and self.low_open:
                return f"a positive number{of}"
            return f"a number{of} {'above' if self.low_open else 'of at least'} {self.low:g}"
        low = f"above {self.low:g}" if self.low_open else f"from {self.low:g}"
        return f"a number{of} {low} to {self.high:g}"


# ---------------------------------------------------------------------------------------
# The variables (the README's table lists exactly these, in this order)
# ---------------------------------------------------------------------------------------

HOME = Variable(
    "VSP_HOME",
    "cache root: downloaded wheels, prepared models (`models/<name>/`), exported LoRA adapters",
    "`~/.cache/vllm-safety-patch`",
)
DELTAS = Variable(
    "VSP_DELTAS",
    "the deltas `vsp serve` merges when `--deltas` is not given (`all`, `none`, names or "
    "files, `,`- or `:`-separated); the `--load-format vsp` loader's delta files "
    "(`:`-separated) when its extra config has no `deltas` key",
    "`all` (`vsp serve`); none: the loader refuses to start",
)
# Several variables are what the launcher (`vsp serve`) hands to the API server: vLLM's own
# argument parser rejects flags it does not know, so these settings cannot travel as flags.
DELTA_DIR = Variable(
    "VSP_DELTA_DIR",
    "the API server's folder of named deltas (`vsp serve` sets it from `--delta-dir`)",
    "`deltas/<model>/` of this repository",
)
ADMIN_TOKEN = Variable(
    "VSP_ADMIN_TOKEN",
    "the admin token (at least 16 characters, no white space), when no token file is given; "
    "also what `vsp deltas activate`, `check` and `rollout` send without `--token-file`",
    "none: admin routes answer 403",
)
ADMIN_TOKEN_FILE = Variable(
    "VSP_ADMIN_TOKEN_FILE",
    "the API server's admin token file (`vsp serve` sets it from `--admin-token-file`); wins "
    "over `VSP_ADMIN_TOKEN`. The file must exist, be readable by the server and by no other "
    "user (e.g. mode 600 or 440)",
    "none",
)
SWITCH_DRAIN_TIMEOUT_S = NumberVariable(
    "VSP_SWITCH_DRAIN_TIMEOUT_S",
    "how long a switch waits for running requests before it answers 409 `busy`",
    "60",
    value=60.0,
    low=0,
    low_open=True,
    unit="seconds",
)
# A write to a client that waits this long (it stopped reading) ends the request. Below the
# drain timeout, so a reader that never reads cannot make a switch fail on its own.
SEND_STALL_TIMEOUT_S = NumberVariable(
    "VSP_SEND_STALL_TIMEOUT_S",
    "how long one write to a client that stopped reading may wait before the answer is cut "
    "off (keep it below the drain timeout)",
    "30",
    value=30.0,
    low=0,
    low_open=True,
    unit="seconds",
)
# After SIGTERM (vLLM stops the engine first), open HTTP connections get at most this long to
# finish before the server cancels them and exits: a client that stays connected cannot keep
# the process alive. Below Kubernetes' terminationGracePeriodSeconds (60 in the chart).
SHUTDOWN_TIMEOUT_S = NumberVariable(
    "VSP_SHUTDOWN_TIMEOUT_S",
    "after SIGTERM, how long open connections get to finish before the server exits",
    "10",
    value=10.0,
    low=0,
    low_open=True,
    unit="seconds",
)
# 12 per kind and language: the English harmful rule needs 5 against the default model's
# base rate (66%: 0 of 4 is still plausible at alpha 0.01). 12 probes of 12 tokens cost what
# 8 of 32 did on the 2-core CPU (measured: `all` 116.9 s against 115.9-122.8 s on one live
# server); 16 cost 1.5x that, as every probe's prompt (~64 tokens with the chat template)
# costs more than the tokens an early verdict saves. See the README for the count each
# language's rules need.
CANARY_PROMPTS = NumberVariable(
    "VSP_CANARY_PROMPTS",
    "canary probes per language and kind (harmful, benign), 1 to 64",
    "12",
    value=12,
    low=1,
    high=64,
)
# A refusal is decided in its opening: on the held-out rows the judge's verdict on the first
# 12 generated tokens agrees with its verdict on 40 on 99.9% of replies (2 of 2,280 differ,
# both refusals after a preface; 98% or more in every language and kind, base model and the
# shipped `all`); at 8 tokens Italian's "Mi dispiace, ma non posso" is not yet complete
# (`python -m vllm_safety_patch.eval.early_verdict`, README "Canary on activation").
CANARY_MAX_TOKENS = NumberVariable(
    "VSP_CANARY_MAX_TOKENS",
    "tokens generated per canary probe, 1 to 512",
    "12",
    value=12,
    low=1,
    high=512,
)
CANARY_ALPHA = NumberVariable(
    "VSP_CANARY_ALPHA",
    "level of the canary's one-sided binomial tests, 1e-9 to 0.5",
    "0.01",
    value=0.01,
    low=1e-9,
    high=0.5,
)
CANARY_TIMEOUT_S = NumberVariable(
    "VSP_CANARY_TIMEOUT_S",
    "bound on the canary step of an activation (probes, restore), 1 to 3600",
    "300",
    value=300.0,
    low=1,
    high=3600,
    unit="seconds",
)
CANARY_THRESHOLDS = Variable(
    "VSP_CANARY_THRESHOLDS",
    'per-language canary thresholds, JSON: `{"bn": {"harmful_min": 0.5, "benign_max": 0.25}}`',
    'none: the rules of "Canary on activation"',
)
LORA_LABELS = Variable(
    "VSP_LORA_LABELS",
    "internal: the LoRA adapters' `X-Safety-Deltas` labels, JSON, set by `vsp serve --lora` "
    "for the API server",
    "none",
)
REFUSAL_FILE = Variable(
    "VSP_REFUSAL_FILE",
    "internal: where vLLM's worker processes leave a loader refusal for the top process to "
    "print last; set by the loader",
    "a new file in the temporary folder",
)
JUDGE_API_KEY = Variable(
    "VSP_JUDGE_API_KEY",
    "API key of `vsp eval`'s LLM judge (`--judge-api-key`)",
    "none",
)

VARIABLES: tuple[Variable, ...] = (
    HOME,
    DELTAS,
    DELTA_DIR,
    ADMIN_TOKEN,
    ADMIN_TOKEN_FILE,
    SWITCH_DRAIN_TIMEOUT_S,
    SEND_STALL_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    CANARY_PROMPTS,
    CANARY_MAX_TOKENS,
    CANARY_ALPHA,
    CANARY_TIMEOUT_S,
    CANARY_THRESHOLDS,
    LORA_LABELS,
    REFUSAL_FILE,
    JUDGE_API_KEY,
)


# ---------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------


def vsp_home(environ: Environ | None = None) -> Path:
    """Cache root: ``$VSP_HOME`` or ``~/.cache/vllm-safety-patch``."""
    env = HOME.raw(environ)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-safety-patch"


def default_model_dir() -> Path:
    """Where ``vsp model prepare`` writes the safetensors checkpoint of the default model."""
    return vsp_home() / "models" / DEFAULT_MODEL_NAME


def repo_deltas_dir() -> Path:
    """Shipped deltas (a source checkout's ``deltas/`` folder)."""
    return Path(__file__).resolve().parent.parent / "deltas"


def delta_dir_for(model: str | Path) -> Path:
    """Where ``vsp solve`` writes the deltas of a model (a catalogue name or a checkpoint
    folder) and where ``vsp serve`` looks for them: ``deltas/<name>/``, the default model's
    folder under any path it is reached by."""
    same = same_path(model, default_model_dir())
    return repo_deltas_dir() / (DEFAULT_MODEL_NAME if same else Path(model).name)


def served_delta_dir(model: str | Path, environ: Environ | None = None) -> Path:
    """The API server's delta folder: ``VSP_DELTA_DIR``, else :func:`delta_dir_for`."""
    return Path(DELTA_DIR.raw(environ) or delta_dir_for(model))


# ---------------------------------------------------------------------------------------
# The admin token: one reader, one set of rules, for the server, the launcher and the client
# ---------------------------------------------------------------------------------------

MIN_TOKEN_LENGTH = 16
# A token file is small; anything bigger was named by mistake (and is not read into memory).
MAX_TOKEN_FILE_BYTES = 1 << 16
TOKEN_FIX = (
    f"start the server with 'vsp serve --admin-token-file FILE' (or set {ADMIN_TOKEN.name}), "
    "e.g. FILE made by: (umask 077; python -c 'import secrets; "
    "print(secrets.token_urlsafe(32))' > FILE)"
)


class TokenConfigError(VSPError):
    """The admin token could not be read or is too weak."""


def read_admin_token(
    environ: Environ | None = None,
    *,
    token_file: Path | None = None,
    flag: str = "--admin-token-file",
) -> str | None:
    """The admin token: from ``token_file`` (a command-line flag, ``flag``), else the file
    ``VSP_ADMIN_TOKEN_FILE`` names, else ``VSP_ADMIN_TOKEN``; ``None`` when none is set
    (admin routes then answer 403). Refused, with the problem and the fix: a file that is
    missing, not a regular file, unreadable, readable or writable by other users, or too
    big; a token shorter than 16 characters or with white space inside (the white space
    around it, such as the newline ``echo`` adds, is dropped)."""
    if token_file is None and ADMIN_TOKEN_FILE.raw(environ):
        token_file = Path(ADMIN_TOKEN_FILE.raw(environ) or "")
        flag = ADMIN_TOKEN_FILE.name
    if token_file is not None:
        source = f"admin token file {token_file}"
        token = _read_token_file(token_file, flag)
    elif ADMIN_TOKEN.is_set(environ):
        source = ADMIN_TOKEN.name
        token = ADMIN_TOKEN.text(environ)
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(char.isspace() for char in token):
        raise TokenConfigError(
            f"the {source} holds a token of {len(token)} characters or with white space; "
            f"a token that changes the served weights needs at least {MIN_TOKEN_LENGTH}",
            TOKEN_FIX,
        )
    return token


def _read_token_file(path: Path, flag: str) -> str:
    source = f"admin token file {path}"
    point = f"point {flag} at a file holding one token"
    try:
        # stat first: opening a FIFO would wait for a writer, and the mode is checked before
        # the secret is read.
        status = path.stat()
    except FileNotFoundError:
        raise TokenConfigError(f"the {source} does not exist", f"create it, or {point}") from None
    except OSError as error:
        raise TokenConfigError(
            f"cannot read the {source} ({error.__class__.__name__})", point
        ) from None
    if not stat.S_ISREG(status.st_mode):
        raise TokenConfigError(f"the {source} is not a regular file", point)
    mode = stat.S_IMODE(status.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise TokenConfigError(
            f"the {source} can be read or written by every user on this machine (mode {mode:04o})",
            f"chmod o-rw {path} (e.g. chmod 600), so that only its owner (and group) can",
        )
    if status.st_size > MAX_TOKEN_FILE_BYTES:
        raise TokenConfigError(f"the {source} is {status.st_size} bytes, not one token", point)
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_TOKEN_FILE_BYTES + 1).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenConfigError(
            f"cannot read the {source} ({error.__class__.__name__})",
            f"make it readable by this user (uid {os.getuid()}) as UTF-8 text, or {point}",
        ) from None
