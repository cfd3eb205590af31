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

If any step fails on any replica, the replicas already switched are switched back to what
each served before (``"canary": false``: that set was serving), and so is the failing one if
it reports the new set; the result names the replica and the reason. So at the end every
replica reports the same set and fingerprints, or none changed (unless a rollback itself
fails, which the result says: ``consistent`` is then false).

The HTTP calls go through a ``call(method, url, body, token, timeout)`` function (the CLI's),
so the logic is tested against real servers and against stand-ins alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_safety_patch.errors import VSPError

Call = Callable[..., tuple[int, dict]]
Log = Callable[[str], None]

LISTING = "/v1/safety/deltas"
CHECK = "/v1/safety/deltas/check"
ACTIVATE = "/v1/safety/deltas/activate"
# An activation runs a canary; on a CPU with a many-language set that takes a minute or two.
ACTIVATE_TIMEOUT_S = 900.0
CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Replica:
    name: str  # what the log and the result call it (a pod name, or host:port)
    url: str  # the server root (http://host:port)


@dataclass
class ReplicaState:
    replica: Replica
    before_names: list[str] = field(default_factory=list)
    before_header: str = ""
    switched: bool = False  # its activation answered 200 with a change


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
    def __init__(self, replica: Replica, reason: str) -> None:
        super().__init__(f"{replica.name}: {reason}")
        self.replica = replica
        self.reason = reason


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


class Rollout:
    """One rollout of ``target`` (delta names; [] = base weights) over ``replicas``."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        target: Sequence[str],
        token: str | None,
        call: Call,
        log: Log = print,
        canary: bool = True,
    ) -> None:
        self.states = [ReplicaState(replica) for replica in replicas]
        self.target = list(target)
        self.token = token
        self.call = call
        self.log = log
        self.canary = canary
        self.expected: list[str] | None = None  # sha256 (12) of the requested files
        self.expected_header: str | None = None

    def _request(
        self, replica: Replica, method: str, path: str, body: dict | None, timeout: float
    ) -> tuple[int, dict]:
        try:
            return self.call(method, replica.url + path, body, self.token, timeout=timeout)
        except VSPError as error:  # unreachable
            raise _StepError(replica, error.problem) from None

    def _listing(self, replica: Replica) -> dict:
        status, payload = self._request(replica, "GET", LISTING, None, CALL_TIMEOUT_S)
        if status != 200:
            raise _StepError(replica, f"listing: {_message(status, payload)}")
        return payload

    # -- the phases ------------------------------------------------------------------

    def survey(self) -> None:
        for state in self.states:
            listing = self._listing(state.replica)
            if not listing.get("hot_patch", False):
                problem = listing.get("hot_patch_problem") or "unknown"
                raise _StepError(state.replica, f"hot patching is unavailable: {problem}")
            active = listing.get("active") or []
            unnamed = [entry.get("group") for entry in active if not entry.get("name")]
            if unnamed:
                raise _StepError(
                    state.replica,
                    f"it serves {listing.get('header')}, loaded from outside its delta folder "
                    f"({', '.join(map(str, unnamed))}): a rollback could not name it; restart "
                    "it with deltas from its folder first",
                )
            state.before_names = [entry["name"] for entry in active]
            state.before_header = listing.get("header", "")
            self.log(f"survey   {state.replica.name}: serves {state.before_header}")

    def check(self) -> None:
        for state in self.states:
            status, payload = self._request(
                state.replica, "POST", CHECK, {"deltas": self.target}, CALL_TIMEOUT_S
            )
            if status != 200:
                raise _StepError(state.replica, f"check: {_message(status, payload)}")
            found = sorted(entry["sha256"] for entry in payload.get("requested", []))
            if self.expected is None:
                self.expected, self.expected_header = found, payload.get("requested_header")
            elif found != self.expected or payload.get("requested_header") != self.expected_header:
                here = payload.get("requested_header")
                raise _StepError(
                    state.replica,
                    f"check: the names resolve to other files here ({here}"
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
            status, payload = self._request(
                state.replica, "POST", ACTIVATE, body, ACTIVATE_TIMEOUT_S
            )
            if status != 200:
                raise _StepError(state.replica, f"activate: {_message(status, payload)}")
            state.switched = bool(payload.get("changed"))
            canary = payload.get("canary")
            probe = (
                f", canary passed in {canary['seconds']:.1f} s"
                if canary
                else (", canary skipped" if state.switched else "")
            )
            done = "switched" if state.switched else "already served it"
            self.log(f"switch   {state.replica.name}: {done}: {payload.get('header')}{probe}")

    def verify(self) -> dict[str, str]:
        final = {}
        for state in self.states:
            listing = self._listing(state.replica)
            found = sorted(entry["sha256"] for entry in listing.get("active", []))
            final[state.replica.name] = listing.get("header", "")
            if found != self.expected or listing.get("header") != self.expected_header:
                raise _StepError(
                    state.replica,
                    f"verify: it serves {listing.get('header')} (sha256 {found}), not "
                    f"{self.expected_header} (sha256 {self.expected}): something else switched "
                    "it during the rollout",
                )
        return final

    def rollback(self, failed: Replica, result: RolloutResult) -> None:
        """Switch back every replica that may serve the new set, to its own previous set."""
        for state in reversed(self.states):
            if not state.switched and state.replica != failed:
                continue
            replica = state.replica
            try:
                if not state.switched:  # the failing one: did it keep the new set?
                    header = self._listing(replica).get("header")
                    if header == state.before_header:
                        continue
                body = {"deltas": state.before_names, "canary": False}
                status, payload = self._request(replica, "POST", ACTIVATE, body, ACTIVATE_TIMEOUT_S)
                if status != 200:
                    raise _StepError(replica, _message(status, payload))
                state.switched = False
                result.rolled_back.append(replica.name)
                self.log(f"rollback {replica.name}: serves {payload.get('header')} again")
            except _StepError as error:
                result.rollback_failures.append(f"{replica.name}: {error.reason}")
                self.log(f"rollback {replica.name}: FAILED: {error.reason}")

    def run(self) -> RolloutResult:
        result = RolloutResult(ok=False, target=self.target)
        phase = "survey"
        try:
            self.survey()
            phase = "check"
            self.check()
            phase = "switch"
            self.switch()
            phase = "verify"
            result.final = self.verify()
        except _StepError as error:
            result.failed_replica = error.replica.name
            result.reason = error.reason
            if phase in ("switch", "verify"):
                self.rollback(error.replica, result)
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
                final[state.replica.name] = self._listing(state.replica).get("header", "?")
            except _StepError as error:
                final[state.replica.name] = f"unknown ({error.reason})"
        return final


def rollout(
    replicas: Sequence[Replica],
    target: Sequence[str],
    token: str | None,
    call: Call,
    log: Log = print,
    canary: bool = True,
) -> RolloutResult:
    """Run one rollout; see the module docstring."""
    return Rollout(replicas, target, token, call, log, canary).run()


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
