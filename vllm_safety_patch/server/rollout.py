"""Fleet rollout: every replica switches to the same delta set, or none stays switched.

``vsp deltas rollout --url A --url B NAME...`` (and ``deploy/k8s/rollout.sh``, which runs it
over the pods of a Helm release):

1. **survey**: every replica's listing: reachable, hot patching on, and the set it serves
   now named in its delta folder (a rollback needs those names);
2. **check**: ``POST /v1/safety/deltas/check`` on every replica: the names resolve, every
   file is read and verified there and on every worker of it, and every replica resolves
   them to the same files (sha256); nothing is switched anywhere until all agree;
3. **switch**, one replica at a time, each with its canary (``POST .../activate``);
4. **verify**: every replica's listing names the requested set with the same files.

If any step fails on any replica, every replica an activation was sent to is brought back to
what it served before (``"canary": false``: that set was serving); the result names the
replica and the reason. An activation that got no usable answer (timed out, cut off, a body
that is not JSON, a proxy's error page) leaves the replica's state unknown: a switch the
client gave up on may still finish on the server, so the replica is polled until no switch
runs there (its listing's ``switching``, bounded) before anything is decided. So at the end
every replica reports the same set and fingerprints, or none changed (unless a rollback
itself fails, which the result says: ``consistent`` is then false).

The admin token goes only to the admin routes (check, activate), never to the open listing.
The HTTP calls go through a ``call(method, url, body, token, timeout)`` function (the CLI's),
so the logic is tested against real servers and against stand-ins alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vllm_safety_patch.errors import VSPError

Call = Callable[..., tuple[int, dict]]
Log = Callable[[str], None]

LISTING = "/v1/safety/deltas"
CHECK = "/v1/safety/deltas/check"
ACTIVATE = "/v1/safety/deltas/activate"
ADMIN_ROUTES = (CHECK, ACTIVATE)  # the only calls that carry the admin token
# An activation runs a canary; on a CPU with a many-language set that takes a minute or two.
ACTIVATE_TIMEOUT_S = 900.0
CALL_TIMEOUT_S = 120.0
# How long to wait for a switch the client gave up on to end on the server (its drain,
# reload and canary are each bounded there), polling the listing.
SETTLE_TIMEOUT_S = 900.0
SETTLE_POLL_S = 1.0


class NoAnswerError(VSPError):
    """A request was sent but no usable answer came back (timed out, cut off, not JSON):
    what it asked for may have happened, or may still happen."""


@dataclass(frozen=True)
class Replica:
    name: str  # what the log and the result call it (a pod name, or host:port)
    url: str  # the server root (http://host:port)


@dataclass
class ReplicaState:
    replica: Replica
    before_names: list[str] = field(default_factory=list)
    before_header: str = ""
    before_sha256: list[str] = field(default_factory=list)
    attempted: bool = False  # an activation was sent to it: it may serve the new set
    switched: bool = False  # it serves the new set (its activation said so, or settling did)


@dataclass
class RolloutResult:
    ok: bool
    target: list[str]
    header: str | None = None  # the set every replica serves now, when ok
    failed_replica: str | None = None
    reason: str | None = None
    rolled_back: list[str] = field(default_factory=list)
    rollback_failures: list[str] = field(default_factory=list)
    final: dict[str, str] = field(default_factory=dict)  # replica -> X-Safety-Deltas now
    before: dict[str, str] = field(default_factory=dict)  # replica -> what it served first

    @property
    def consistent(self) -> bool:
        """Every replica serves what it served before, or the new set: never a mix left by
        a rollback that failed."""
        return not self.rollback_failures


class _StepError(Exception):
    def __init__(self, replica: Replica, reason: str, sent: bool = True) -> None:
        super().__init__(f"{replica.name}: {reason}")
        self.replica = replica
        self.reason = reason
        self.sent = sent  # False: the request never reached the replica (nothing to settle)


@contextmanager
def _reading(replica: Replica, what: str) -> Iterator[None]:
    """An answer without the fields it must have is a failure of that replica, not a
    traceback out of the rollout."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise _StepError(
            replica, f"{what}: a malformed answer ({type(error).__name__}: {error})"
        ) from None


def replicas_from(urls: Sequence[str], names: Sequence[str] | None = None) -> list[Replica]:
    """``--url`` values (and optional ``--name`` values, one per URL) -> replicas."""
    from urllib.parse import urlsplit

    if not urls:
        raise VSPError("no replica given", "pass --url http://HOST:PORT once per replica")
    if names and len(names) != len(urls):
        raise VSPError(
            f"{len(names)} --name values for {len(urls)} --url values",
            "give one --name per --url, in the same order, or none",
        )
    roots = []
    for url in urls:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise VSPError(f"'{url}' is not an http(s) URL", "pass e.g. --url http://10.0.0.5:8000")
        roots.append(url.strip().rstrip("/").removesuffix("/v1").rstrip("/"))
    if len(set(roots)) != len(roots):
        raise VSPError("a replica URL is given twice", "give each replica once")
    labels = list(names) if names else [urlsplit(root).netloc for root in roots]
    return [Replica(name, root) for name, root in zip(labels, roots, strict=True)]


def _message(status: int, payload: dict) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        kind = error.get("type")
        text = error.get("message") or error.get("problem") or ""
        return f"HTTP {status} {kind}: {text}" if kind else f"HTTP {status}: {text}"
    return f"HTTP {status}: {str(payload)[:300]}"


def _serving(listing: dict) -> tuple[str, list[str]]:
    """(header, sorted sha256 of the active files) of a listing."""
    return str(listing["header"]), sorted(str(entry["sha256"]) for entry in listing["active"])


class Rollout:
    """One rollout of ``target`` (delta names; [] = base weights) over ``replicas``."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        target: Sequence[str],
        token: str | None,
        call: Call,
        log: Log = print,
        canary: bool | dict = True,
        activate_timeout_s: float = ACTIVATE_TIMEOUT_S,
        settle_timeout_s: float = SETTLE_TIMEOUT_S,
        settle_poll_s: float = SETTLE_POLL_S,
    ) -> None:
        self.states = [ReplicaState(replica) for replica in replicas]
        self.target = list(target)
        self.token = token
        self.call = call
        self.log = log
        self.canary = canary  # True, False, or the request's canary options
        self.activate_timeout_s = activate_timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.settle_poll_s = settle_poll_s
        self.expected: list[str] | None = None  # sha256 (12) of the requested files
        self.expected_header: str | None = None
        self.current: Replica | None = None  # the replica being worked on

    def _request(
        self, replica: Replica, method: str, path: str, body: dict | None, timeout: float
    ) -> tuple[int, dict]:
        self.current = replica
        token = self.token if path in ADMIN_ROUTES else None
        try:
            status, payload = self.call(method, replica.url + path, body, token, timeout=timeout)
        except NoAnswerError as error:  # sent: it may have acted on it
            raise _StepError(replica, error.problem) from None
        except VSPError as error:  # unreachable, or a redirect: nothing was done there
            raise _StepError(replica, error.problem, sent=False) from None
        if not isinstance(payload, dict):
            raise _StepError(replica, f"HTTP {status}: the answer is not a JSON object")
        return status, payload

    def _listing(self, replica: Replica) -> dict:
        status, payload = self._request(replica, "GET", LISTING, None, CALL_TIMEOUT_S)
        if status != 200:
            raise _StepError(replica, f"listing: {_message(status, payload)}")
        with _reading(replica, "listing"):
            _serving(payload)  # the fields every later step reads
        return payload

    def _settle(self, replica: Replica) -> dict:
        """The replica's listing once no switch runs there. A switch whose client gave up
        (timed out, malformed answer) goes on on the server, and the listing shows the old
        set until it ends: deciding earlier would miss a switch that lands later."""
        deadline = time.monotonic() + self.settle_timeout_s
        while True:
            try:
                listing = self._listing(replica)
                if not listing.get("switching"):
                    return listing
                why = "a switch is still running there"
            except _StepError as error:
                why = error.reason
            if time.monotonic() >= deadline:
                raise _StepError(
                    replica,
                    f"its state is unknown: no settled answer within {self.settle_timeout_s:g}"
                    f" s ({why})",
                )
            time.sleep(self.settle_poll_s)

    # -- the phases ------------------------------------------------------------------

    def survey(self) -> None:
        for state in self.states:
            listing = self._listing(state.replica)
            if not listing.get("hot_patch", False):
                problem = listing.get("hot_patch_problem") or "unknown"
                raise _StepError(state.replica, f"hot patching is unavailable: {problem}")
            with _reading(state.replica, "listing"):
                active = listing["active"]
                unnamed = [entry.get("group") for entry in active if not entry.get("name")]
                if unnamed:
                    raise _StepError(
                        state.replica,
                        f"it serves {listing.get('header')}, loaded from outside its delta "
                        f"folder ({', '.join(map(str, unnamed))}): a rollback could not name "
                        "it; restart it with deltas from its folder first",
                    )
                state.before_names = [str(entry["name"]) for entry in active]
                state.before_header, state.before_sha256 = _serving(listing)
            self.log(f"survey   {state.replica.name}: serves {state.before_header}")

    def check(self) -> None:
        for state in self.states:
            status, payload = self._request(
                state.replica, "POST", CHECK, {"deltas": self.target}, CALL_TIMEOUT_S
            )
            if status != 200:
                raise _StepError(state.replica, f"check: {_message(status, payload)}")
            with _reading(state.replica, "check"):
                found = sorted(str(entry["sha256"]) for entry in payload["requested"])
                header = str(payload["requested_header"])
            if self.expected is None:
                self.expected, self.expected_header = found, header
            elif found != self.expected or header != self.expected_header:
                raise _StepError(
                    state.replica,
                    f"check: the names resolve to other files here ({header}"
                    f", sha256 {', '.join(found) or 'none'}) than on "
                    f"{self.states[0].replica.name} ({self.expected_header}, sha256 "
                    f"{', '.join(self.expected) or 'none'}); give every replica the same delta "
                    "files",
                )
            change = "would switch" if payload.get("changed") else "already serves it"
            self.log(f"check    {state.replica.name}: ok, {change}: {self.expected_header}")

    def switch(self) -> None:
        for state in self.states:
            body = {"deltas": self.target, "canary": self.canary}
            state.attempted = True
            try:
                status, payload = self._request(
                    state.replica, "POST", ACTIVATE, body, self.activate_timeout_s
                )
                if status != 200:
                    raise _StepError(state.replica, f"activate: {_message(status, payload)}")
                with _reading(state.replica, "activate"):
                    header = str(payload["header"])
                    state.switched = bool(payload["changed"])
                    canary = payload.get("canary")
                    probe = (
                        f", canary passed in {float(canary['seconds']):.1f} s"
                        if canary
                        else (", canary skipped" if state.switched else "")
                    )
            except _StepError as error:
                if error.sent:
                    self._learn(state)
                else:  # never reached it: nothing to undo there
                    state.attempted = False
                if not error.reason.startswith("activate"):
                    error.reason = f"activate: {error.reason}"
                raise
            done = "switched" if state.switched else "already served it"
            self.log(f"switch   {state.replica.name}: {done}: {header}{probe}")

    def _learn(self, state: ReplicaState) -> None:
        """After an activation without a clear answer: what the replica serves once its
        switch ended (best effort: the rollback settles again and decides)."""
        try:
            listing = self._settle(state.replica)
            with _reading(state.replica, "listing"):
                header, found = _serving(listing)
        except _StepError as error:
            self.log(f"settle   {state.replica.name}: {error.reason}")
            state.switched = True  # unknown: the rollback must look again
            return
        state.switched = found == self.expected and header == self.expected_header
        self.log(f"settle   {state.replica.name}: serves {header} now")

    def verify(self) -> dict[str, str]:
        final = {}
        for state in self.states:
            listing = self._listing(state.replica)
            header, found = _serving(listing)
            final[state.replica.name] = header
            if found != self.expected or header != self.expected_header:
                raise _StepError(
                    state.replica,
                    f"verify: it serves {header} (sha256 {found}), not "
                    f"{self.expected_header} (sha256 {self.expected}): something else switched "
                    "it during the rollout",
                )
        return final

    def _serves_before(self, state: ReplicaState, listing: dict) -> bool:
        with _reading(state.replica, "listing"):
            return _serving(listing) == (state.before_header, state.before_sha256)

    def _switch_back(self, state: ReplicaState) -> bool:
        """Serve the replica's previous set again; False if it served it already."""
        replica = state.replica
        if self._serves_before(state, self._settle(replica)):
            return False
        body = {"deltas": state.before_names, "canary": False}
        try:
            status, payload = self._request(
                replica, "POST", ACTIVATE, body, self.activate_timeout_s
            )
            if status != 200:
                raise _StepError(replica, _message(status, payload))
        except _StepError as error:
            # Refused, or no clear answer: it may have switched back all the same.
            if not error.sent or not self._serves_before(state, self._settle(replica)):
                raise
        return True

    def rollback(self, result: RolloutResult) -> None:
        """Bring every replica an activation was sent to back to its own previous set."""
        for state in reversed(self.states):
            if not state.attempted:
                continue
            replica = state.replica
            try:
                if self._switch_back(state):
                    result.rolled_back.append(replica.name)
                    self.log(f"rollback {replica.name}: serves {state.before_header} again")
                state.switched = False
            except _StepError as error:
                result.rollback_failures.append(f"{replica.name}: {error.reason}")
                self.log(f"rollback {replica.name}: FAILED: {error.reason}")

    def run(self) -> RolloutResult:
        result = RolloutResult(ok=False, target=self.target)
        phase = "survey"
        try:
            try:
                self.survey()
                phase = "check"
                self.check()
                phase = "switch"
                self.switch()
                phase = "verify"
                result.final = self.verify()
            except _StepError:
                raise
            except Exception as error:  # a bug or a stand-in's surprise: still roll back
                replica = self.current or self.states[0].replica
                raise _StepError(replica, f"{phase}: {type(error).__name__}: {error}") from None
        except _StepError as error:
            result.failed_replica = error.replica.name
            result.reason = error.reason
            if phase in ("switch", "verify"):
                self.rollback(result)
            result.final = self._final_headers()
            result.before = {
                s.replica.name: s.before_header for s in self.states if s.before_header
            }
            return result
        result.ok = True
        result.header = self.expected_header
        return result

    def _final_headers(self) -> dict[str, str]:
        final = {}
        for state in self.states:
            try:
                final[state.replica.name] = str(self._listing(state.replica)["header"])
            except _StepError as error:
                final[state.replica.name] = f"unknown ({error.reason})"
        return final


def rollout(
    replicas: Sequence[Replica],
    target: Sequence[str],
    token: str | None,
    call: Call,
    log: Log = print,
    canary: bool | dict = True,
    **timeouts: float,
) -> RolloutResult:
    """Run one rollout; see the module docstring (``timeouts``: :class:`Rollout`'s)."""
    return Rollout(replicas, target, token, call, log, canary, **timeouts).run()


def summary(result: RolloutResult) -> str:
    """One line for the end of the log."""
    if result.ok:
        return f"rollout done: {len(result.final)} replica(s) serve {result.header}"
    where = f"rollout failed on {result.failed_replica}: {result.reason}"
    if result.rollback_failures:
        return (
            f"{where}; ROLLBACK FAILED on {'; '.join(result.rollback_failures)}: the fleet is "
            f"mixed ({_describe(result.final)}); activate the old set there by hand"
        )
    back = f" (rolled back: {', '.join(result.rolled_back)})" if result.rolled_back else ""
    moved = [name for name, header in result.before.items() if result.final.get(name) != header]
    if moved:
        changed = ", ".join(moved)
        return f"{where}{back}; CHANGED since the start: {changed} ({_describe(result.final)})"
    return f"{where}; no replica changed{back}: {_describe(result.final)}"


def _describe(final: dict[str, Any]) -> str:
    return ", ".join(f"{name} serves {header}" for name, header in final.items())
