"""Shared by the serving benchmarks: models, server processes, prompts and the load driver.

Every benchmark runs its arms in one process on one machine and prints ratios, so the
figures of one run are comparable with each other (never with another machine's).

Two ways to name a model (``--model``):

- ``default``: the prepared default model, its shipped ``all`` delta;
- ``tiny``: a random-weight tiny Qwen2 with a random delta named ``all``, built in seconds,
  to smoke-test a script (its figures mean nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_safety_patch.settings import CPU_KV_CACHE_GIB

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VSP = str(Path(sys.executable).with_name("vsp"))
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
SERVED_NAME = "model"  # --served-model-name of every arm: the same request bodies fit all
MULTIJAIL_LANGS = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
MGSM_LANGS = ("en", "zh", "th", "bn", "sw", "ja", "de", "es", "fr", "ru", "te")
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef0123"
START_TIMEOUT_S = 600


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# `timeout` and schedulers stop a benchmark with SIGTERM, which by default ends Python
# without unwinding: the servers' `with` blocks would never stop them. Unwind instead.
signal.signal(signal.SIGTERM, _exit_on_sigterm)


# ---------------------------------------------------------------------------------------
# Models and deltas
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    model: Path  # base checkpoint
    delta_dir: Path  # holds all.safetensors
    work: Path  # scratch folder for logs, exports, token file
    tiny: bool

    @property
    def delta(self) -> Path:
        return self.delta_dir / "all.safetensors"

    def clip(self, text: str) -> str:
        # The tiny model's byte tokenizer and 512-token window: keep its prompts short.
        return text[:120] if self.tiny else text

    def flags(self) -> list[str]:
        """vLLM flags every arm gets (the arms differ only in what a script adds)."""
        # fp32 + eager: ~4x faster than bf16 on this CPU, and no minutes of compilation.
        # vsp serve adds the same two on CPU; giving them explicitly keeps the arms equal.
        flags = ["--enforce-eager", "--dtype", "float32", "--seed", "0"]
        flags += ["--served-model-name", SERVED_NAME]
        flags += ["--max-model-len", "512" if self.tiny else "2048"]
        return flags

    @property
    def token_file(self) -> Path:
        path = self.work / "admin-token"
        if not path.exists():
            path.write_text(ADMIN_TOKEN + "\n")
            path.chmod(0o600)  # the server refuses a token file others can read
        return path


def add_round_options(parser: Any) -> None:
    """The A/B round options shared by serve_throughput.py and lora_vs_merged.py."""
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a folder")
    parser.add_argument("--n", type=int, default=32, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=3, help="rounds per arm")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up requests per arm")


def prepare(model: str, name: str) -> Setup:
    """``model``: 'default', 'tiny' or a checkpoint folder (with deltas/<its name>/all)."""
    from vllm_safety_patch.config import default_model_dir
    from vllm_safety_patch.serve import delta_dir_for

    work = REPO / "build" / "bench" / name
    work.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        return _tiny_setup(work)
    model_dir = (default_model_dir() if model == "default" else Path(model)).resolve()
    return Setup(model_dir, delta_dir_for(model_dir), work, tiny=False)


def _tiny_setup(work: Path) -> Setup:
    from vllm_safety_patch.models.tiny import build_tiny_model

    # The tests' delta builder (random sparse low-rank edits of down_proj and up_proj).
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_delta

    model_dir = build_tiny_model(Path(tempfile.mkdtemp(dir=work)) / "tiny-qwen2", "qwen2")
    delta_dir = work / "tiny-deltas"
    delta_dir.mkdir(exist_ok=True)
    _, blob = make_delta(model_dir, group="all", layers=(0, 1, 2), k=16, rank=8)
    (delta_dir / "all.safetensors").write_bytes(blob)
    return Setup(model_dir, delta_dir, work, tiny=True)


def export(setup: Setup, fmt: str) -> Path:
    """``vsp export --format fmt`` of the ``all`` delta (the operator's command), cached."""
    out = setup.work / f"export-{fmt}-{setup.model.name}"
    stamp = out / ".bench-source"
    source = f"{setup.model} {setup.delta.stat().st_mtime_ns}"
    if stamp.is_file() and stamp.read_text() == source:
        return out
    command = [VSP, "export", str(setup.delta), "--format", fmt, "--out", str(out)]
    command += ["--model", str(setup.model)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(source)
    return out


# ---------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def engine_env(stock: bool) -> dict[str, str]:
    """The environment of a server; ``stock``: vLLM with none of our plugins loaded."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=str(CPU_KV_CACHE_GIB),  # GiB, what vsp serve sets
        VLLM_CPU_OMP_THREADS_BIND="0-1",  # both cores, for every arm
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",  # what vsp serve sets on CPU: same for stock
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for name in list(env):
        if name.startswith("VSP_") or name == "VLLM_PLUGINS":
            env.pop(name)
    if stock:
        # An allow-list naming nothing: no general plugin (our loader and worker methods)
        # and no endpoint plugin load in any process. check_stock() proves it.
        env["VLLM_PLUGINS"] = ""
    return env


def check_stock() -> None:
    """Fail unless the stock environment really loads none of our plugins."""
    code = (
        "from vllm.plugins import load_general_plugins, load_plugins_by_group\n"
        "load_general_plugins()\n"
        "from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER as loaders\n"
        "from vllm.v1.worker.worker_base import WorkerBase\n"
        "print('loader', 'vsp' in loaders)\n"
        "print('worker', hasattr(WorkerBase, 'vsp_reload_deltas'))\n"
        "print('plugins', sorted(load_plugins_by_group('vllm.general_plugins')))\n"
    )
    found = subprocess.run(
        [PYTHON, "-c", code], env=engine_env(stock=True), capture_output=True, text=True
    )
    wanted = ["loader False", "worker False", "plugins []"]
    if found.stdout.strip().splitlines()[-3:] != wanted:
        raise SystemExit(f"the stock environment loads plugins:\n{found.stdout}{found.stderr}")


class Server:
    """One API server and everything it starts (EngineCore, workers), in its own session."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.port = int(argv[argv.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start_seconds = 0.0

    @classmethod
    def stock(cls, setup: Setup, model: Path, extra: Sequence[str] = ()) -> Server:
        port = free_port()
        argv = [PYTHON, "-m", SERVER_MODULE, "--model", str(model), "--port", str(port)]
        argv += ["--host", "127.0.0.1", *setup.flags(), *extra]
        return cls("stock", argv, engine_env(stock=True), setup.work / f"stock-{port}.log")

    @classmethod
    def vsp(
        cls, setup: Setup, deltas: str, lora: str | None = None, extra: Sequence[str] = ()
    ) -> Server:
        """`vsp serve --deltas DELTAS` (merged at load); ``lora``: also `--lora LORA`."""
        port = free_port()
        argv = [VSP, "serve", "--model", str(setup.model), "--delta-dir", str(setup.delta_dir)]
        argv += ["--deltas", deltas, "--admin-token-file", str(setup.token_file)]
        argv += ["--lora", lora] if lora else []
        argv += ["--port", str(port), "--", *setup.flags(), *extra]
        name = f"vsp-{deltas}" + (f"+lora-{lora}" if lora else "")
        return cls(name, argv, engine_env(stock=False), setup.work / f"vsp-{port}.log")

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start and wait for ``/health``; returns (and keeps) the seconds it took."""
        import httpx

        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches the engine
            )
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{self.name} not healthy in {timeout_s} s:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - started
        return self.start_seconds

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def members(self) -> list[int]:
        """Live (non-zombie) processes of the server's group."""
        if self.process is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.process.pid and fields[0] != "Z":  # pgrp, state
                found.append(int(entry))
        return found

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server's processes so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.members():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def stop(self, timeout_s: float = 60) -> float:
        """SIGTERM the whole group, SIGKILL what is left; seconds until all are gone."""
        if self.process is None:
            return 0.0
        started = time.monotonic()
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader so it stops counting
                if not self.members():
                    break
                time.sleep(0.1)
            if not self.members():
                break
        self.process.poll()
        self.process = None
        return time.monotonic() - started

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# Prompts and requests
# ---------------------------------------------------------------------------------------


def prompts(n: int, suites: Sequence[str] = ("multijail", "mgsm")) -> list[tuple[str, str]]:
    """``n`` (language, text) pairs: the suites' languages in turn, rows from 160 on
    (MultiJail's held-out end), so every run of every arm sends the same list."""
    from vllm_safety_patch.data import load_prompts

    langs = {"multijail": MULTIJAIL_LANGS, "mgsm": MGSM_LANGS}
    pools = {
        suite: {lang: load_prompts(suite, lang, ids=range(160, 200)) for lang in langs[suite]}
        for suite in suites
    }
    chosen = []
    for i in range(n):
        suite = suites[i % len(suites)]
        turn = i // len(suites)
        lang = langs[suite][turn % len(langs[suite])]
        row = pools[suite][lang][(turn // len(langs[suite])) % 40]
        chosen.append((lang, row.text))
    return chosen


def chat_body(text: str, max_tokens: int, model: str = SERVED_NAME, **extra: Any) -> dict:
    """A streamed greedy chat request; ``ignore_eos`` (vLLM's extension, on by default)
    makes every request generate exactly ``max_tokens``, so the arms do equal work even
    where their answers differ."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    body.update(extra)
    return body


@dataclass
class Reply:
    ttft: float = 0.0  # seconds to the first generated text
    latency: float = 0.0  # seconds to the last byte
    tokens: int = 0  # completion tokens (the usage chunk)
    status: int = 0
    error: str | None = None
    request: bytes = b""
    chunks: list[bytes] = field(default_factory=list)  # the raw body as received
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Load:
    replies: list[Reply]
    wall: float

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.error is None]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall

    def ttft(self, q: float) -> float:
        return quantile([r.ttft for r in self.ok], q)

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(r.latency for r in self.ok)

    def served(self) -> str:
        """The X-Safety-Deltas values the answers carried ('-' for none: stock vLLM)."""
        return ", ".join(sorted({r.headers.get("x-safety-deltas", "-") for r in self.ok}))

    def summary(self) -> str:
        failed = len(self.replies) - len(self.ok)
        if not self.ok:
            return f"all {failed} requests FAILED"
        return (
            f"{self.tokens_per_s:6.1f} tok/s, TTFT p50 {self.ttft(0.5):6.3f} s "
            f"p95 {self.ttft(0.95):6.3f} s, mean latency {self.mean_latency:6.2f} s, "
            f"{len(self.ok)} ok" + (f", {failed} FAILED" if failed else "")
        )


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _events(buffer: bytes) -> tuple[list[dict], bytes]:
    """Complete SSE ``data:`` events in ``buffer`` and the unfinished rest."""
    events = []
    *complete, rest = buffer.split(b"\n\n")
    for block in complete:
        for line in block.split(b"\n"):
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                try:
                    events.append(json.loads(line[5:]))
                except ValueError:
                    pass
    return events, rest


async def _send(client: Any, url: str, body: dict) -> Reply:
    reply = Reply(request=json.dumps(body).encode())
    started = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, content=reply.request, headers={"Content-Type": "application/json"}
        ) as response:
            reply.status = response.status_code
            reply.headers = dict(response.headers)
            buffer = b""
            async for chunk in response.aiter_raw():
                reply.chunks.append(chunk)
                events, buffer = _events(buffer + chunk)
                for event in events:
                    if event.get("usage"):
                        reply.tokens = event["usage"].get("completion_tokens", 0)
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if text and not reply.ttft:
                            reply.ttft = time.perf_counter() - started
            if response.status_code != 200:
                reply.error = f"HTTP {response.status_code}: {b''.join(reply.chunks)[:300]!r}"
    except Exception as error:  # one failed request is reported, not fatal
        reply.error = f"{type(error).__name__}: {error}"
    reply.latency = time.perf_counter() - started
    if reply.error is None and not reply.tokens:
        reply.error = "no usage chunk (no tokens counted)"
    return reply


async def _drive(url: str, bodies: Sequence[dict], concurrency: int) -> Load:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def one(body: dict) -> Reply:
            async with gate:
                return await _send(client, url, body)

        started = time.perf_counter()
        replies = await asyncio.gather(*(one(body) for body in bodies))
        return Load(list(replies), time.perf_counter() - started)


def run_load(server: Server, bodies: Sequence[dict], concurrency: int) -> Load:
    """Send ``bodies`` to the server's chat endpoint, ``concurrency`` at a time."""
    url = server.url + "/v1/chat/completions"
    return asyncio.run(_drive(url, bodies, concurrency))


def probe(
    server: Server, text: str, max_tokens: int, timeout: float = 600
) -> tuple[float, str, str]:
    """(seconds, served set header, answer) of one greedy, non-streamed chat request."""
    import httpx

    body = {
        "model": "model",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    answer = reply.json()["choices"][0]["message"]["content"]
    return seconds, reply.headers.get("x-safety-deltas", "?"), answer


def post_json(url: str, body: dict, token: str | None = None, timeout: float = 900) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url, json=body, headers=headers, timeout=timeout)


def counted_requests(server: Server) -> float:
    """The sum of ``vsp_requests_total`` on the server's /metrics (our refusal metrics)."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vsp_requests_total{")
    )


# ---------------------------------------------------------------------------------------
# Alternating comparison of two live servers
# ---------------------------------------------------------------------------------------


@dataclass
class Arm:
    server: Server
    bodies: list[dict]
    loads: list[Load] = field(default_factory=list)
    idle_cpu: list[float] = field(default_factory=list)  # its CPU seconds during other rounds


def alternate(arms: Sequence[Arm], pairs: int, concurrency: int, warmup: int) -> None:
    """Warm both up, then ``pairs`` rounds of each, in A B, B A, A B ... order: a slow drift
    of the machine's background load then hits both arms alike. Prints every round."""
    for arm in arms:
        run_load(arm.server, arm.bodies[:warmup], min(concurrency, warmup))
        print(f"  {arm.server.name} warmed up; quiet after {settle(arm.server):.1f} s", flush=True)
    for pair in range(pairs):
        order = arms if pair % 2 == 0 else list(reversed(arms))
        for arm in order:
            others = [other for other in arms if other is not arm]
            before = [other.server.cpu_seconds() for other in others]
            load = run_load(arm.server, arm.bodies, concurrency)
            for other, cpu in zip(others, before, strict=True):
                other.idle_cpu.append(other.server.cpu_seconds() - cpu)
            arm.loads.append(load)
            quiet = settle(arm.server)
            print(
                f"  pair {pair + 1} {arm.server.name:>10}: {load.summary()}; quiet after "
                f"{quiet:.1f} s",
                flush=True,
            )
            if len(load.ok) < len(load.replies):
                # A round that lost requests did less work: its ratio would mean nothing.
                error = next(r.error for r in load.replies if r.error)
                raise SystemExit(
                    f"{arm.server.name}: requests failed ({error}); see {arm.server.log}"
                )


def settle(server: Server, limit_s: float = 30) -> float:
    """Wait until a server that just finished a round is idle (its engine's threads keep
    spinning for a while after the last request): seconds waited. Without this, the tail of
    one arm's round would run into the start of the other arm's."""
    started = time.monotonic()
    last = server.cpu_seconds()
    while time.monotonic() - started < limit_s:
        time.sleep(0.5)
        now = server.cpu_seconds()
        if now - last < 0.02:  # under 4% of one core
            break
        last = now
    return time.monotonic() - started


def pooled_tokens_per_s(loads: Sequence[Load]) -> float:
    """All rounds' tokens over all rounds' seconds."""
    return sum(sum(r.tokens for r in load.ok) for load in loads) / sum(load.wall for load in loads)


def ratio_line(label: str, values: Sequence[float], target: str) -> str:
    """'label: median (min-max over n pairs) target' for per-pair ratios."""
    return (
        f"{label}: {statistics.median(values):.3f} "
        f"(pairs: {', '.join(f'{v:.3f}' for v in values)}; min {min(values):.3f}, "
        f"max {max(values):.3f}) {target}"
    )


def machine_note() -> str:
    """Who else is using the CPU now (the lead's solver or tests make the figures noisy)."""
    out = subprocess.run(
        ["pgrep", "-af", "vsp solve|vsp measure|pytest"], capture_output=True, text=True
    )
    mine = str(os.getpid())
    others = [line for line in out.stdout.splitlines() if not line.startswith(mine + " ")]
    load = os.getloadavg()[0]
    return f"load average {load:.2f} on {os.cpu_count()} cores; " + (
        f"SHARED with: {'; '.join(o[:80] for o in others)}" if others else "no other jobs"
    )
