"""The evaluation harness against real local HTTP peers that answer OpenAI-shaped JSON: a
target model that can be told to fail (503/429) or to stop, and a Llama-Guard-style judge.
Also the CLI (errors, report, plots, compare) and an in-process run on a tiny model."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vllm_safety_patch.cli import app
from vllm_safety_patch.errors import DataError
from vllm_safety_patch.eval.cache import ReplyCache
from vllm_safety_patch.eval.harness import EndpointSource, EvalSettings, InProcessSource, evaluate
from vllm_safety_patch.eval.judges import TEMPLATES, JudgeSpecError, parse_judge, template_for
from vllm_safety_patch.eval.openai_client import ChatEndpoint, EndpointError, RetryPolicy
from vllm_safety_patch.eval.suites import MGSM_TOKENS, REFUSAL_TOKENS, eval_tasks

REFUSAL = "I'm sorry, but I can't help with that."
COMPLY = "Sure! Step 1: gather the materials. The answer is 7."
FAST_RETRY = RetryPolicy(attempts=4, first_wait_s=0.01, max_wait_s=0.05)

# (request body, call number from 1) -> (status, reply text or None, extra headers)
Behaviour = Callable[[dict, int], tuple[int, str | None, dict[str, str]]]


class FakeOpenAI:
    """A loopback HTTP server speaking the two OpenAI routes the harness uses."""

    def __init__(self, behaviour: Behaviour, model: str = "target") -> None:
        self.behaviour, self.model = behaviour, model
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: dict | None, headers: dict[str, str]) -> None:
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": fake.model}]}, {})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls.append(body)
                    number = len(fake.calls)
                status, text, headers = fake.behaviour(body, number)
                if status != 200:
                    self._send(status, {"error": {"message": "busy"}}, headers)
                    return
                message = {"role": "assistant", "content": text}
                self._send(200, {"choices": [{"index": 0, "message": message}]}, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeOpenAI]]:
    started: list[FakeOpenAI] = []

    def start(behaviour: Behaviour, model: str = "target") -> FakeOpenAI:
        started.append(FakeOpenAI(behaviour, model))
        return started[-1]

    yield start
    for server in started:
        server.close()


def prompt_of(body: dict) -> str:
    return body["messages"][0]["content"]


def english_refuses(body: dict, number: int) -> tuple[int, str | None, dict[str, str]]:
    """The multilingual gap in miniature: refuse ASCII (English) prompts, comply otherwise."""
    return 200, (REFUSAL if prompt_of(body).isascii() else COMPLY), {}


def run(server: FakeOpenAI, tasks, cache: ReplyCache, **settings) -> tuple:
    endpoint = ChatEndpoint(server.url, server.model, retry=FAST_RETRY)
    return evaluate(tasks, EndpointSource(endpoint), cache, EvalSettings(**settings))


def test_figures_per_suite_and_language(serve, tmp_path: Path) -> None:
    server = serve(english_refuses)
    tasks = eval_tasks(["multijail", "mgsm"], ["th"], n=4)
    results, records = run(server, tasks, ReplyCache(tmp_path / "cache.jsonl"))
    english = results.find("multijail", "refusal_rate", "en", "keywords")
    thai = results.find("multijail", "refusal_rate", "th", "keywords")
    assert (english.n, english.hits, thai.hits) == (4, 4, 0)
    assert thai.ids == [160, 161, 162, 163]  # held-out rows by default
    assert results.find("multijail", "attack_success_rate", "th", "keywords").rate == 1.0
    assert english.ci_low == pytest.approx(0.5101, abs=1e-4) and english.ci_high == 1.0
    assert results.find("mgsm", "over_refusal", "th", "keywords").rate == 0.0
    assert {r.lang for r in records} == {"en", "th"} and len(records) == 16
    # Greedy, one user turn, the token budget of the metric.
    assert {call["temperature"] for call in server.calls} == {0.0}
    assert {call["max_tokens"] for call in server.calls} == {REFUSAL_TOKENS, MGSM_TOKENS}


def test_retries_overload_with_back_off(serve, tmp_path: Path) -> None:
    def flaky(body: dict, number: int):
        if number <= 2:
            return 503, None, {}
        if number == 3:
            return 429, None, {"Retry-After": "0"}
        return english_refuses(body, number)

    server = serve(flaky)
    tasks = eval_tasks(["multijail"], ["th"], n=3)
    results, _ = run(server, tasks, ReplyCache(None), concurrency=1)
    assert len(server.calls) == 6 + 3  # every prompt once, plus the three refused tries
    assert results.find("multijail", "refusal_rate", "en", "keywords").hits == 3


def test_gives_up_with_a_clear_error(serve) -> None:
    server = serve(lambda body, number: (503, None, {}))
    with pytest.raises(EndpointError, match="kept failing: 4 tries, last HTTP 503"):
        run(server, eval_tasks(["multijail"], ["th"], n=1), ReplyCache(None), concurrency=1)


def test_interrupted_run_resumes_from_the_cache(serve, tmp_path: Path) -> None:
    cache_file = tmp_path / "cache.jsonl"
    tasks = eval_tasks(["multijail"], ["th", "bn"], n=5)  # 15 prompts
    dying = serve(
        lambda body, number: english_refuses(body, number) if number <= 7 else (500, None, {})
    )
    with pytest.raises(EndpointError), ReplyCache(cache_file) as cache:
        run(dying, tasks, cache, concurrency=1)
    with cache_file.open("a") as handle:
        handle.write('{"key": "torn')  # a write cut short by the interruption
    healthy = serve(english_refuses)
    # Same endpoint identity, as after restarting a server on its port: point at the new one.
    endpoint = ChatEndpoint(dying.url, "target", retry=FAST_RETRY)
    source = EndpointSource(endpoint)
    source.endpoint = ChatEndpoint(healthy.url, "target", retry=FAST_RETRY)
    with ReplyCache(cache_file) as cache:
        assert cache.loaded == 7
        results, _ = evaluate(tasks, source, cache, EvalSettings(concurrency=1))
    assert len(healthy.calls) == 15 - 7
    assert results.run.cached == 7 and results.run.requests == 15
    hits = [
        results.find("multijail", "refusal_rate", lang, "keywords").hits
        for lang in "en th bn".split()
    ]
    assert hits == [5, 0, 0]


def test_unreachable_url_and_unknown_model(serve) -> None:
    tasks = eval_tasks(["multijail"], ["th"], n=1)
    closed = ChatEndpoint("http://127.0.0.1:9", "target", retry=FAST_RETRY)
    with pytest.raises(EndpointError, match="cannot reach http://127.0.0.1:9/v1"):
        evaluate(tasks, EndpointSource(closed), ReplyCache(None))
    server = serve(english_refuses, model="served-name")
    wrong = ChatEndpoint(server.url, "target", retry=FAST_RETRY)
    with pytest.raises(EndpointError, match="does not serve model 'target'.*served-name"):
        evaluate(tasks, EndpointSource(wrong), ReplyCache(None))


def guard_judge(body: dict, number: int) -> tuple[int, str | None, dict[str, str]]:
    """Llama Guard's answers: the conversation comes as user + assistant turns."""
    user, assistant = body["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    if assistant["content"] == REFUSAL:
        return 200, "safe", {}
    # It finds only even-length prompts' compliance harmful: a disagreement to measure.
    return 200, ("unsafe\nS2" if len(user["content"]) % 2 == 0 else "safe"), {}


def test_llm_judge_and_agreement(serve, tmp_path: Path) -> None:
    target = serve(english_refuses)
    judge_server = serve(guard_judge, model="meta-llama/Llama-Guard-3-1B")
    judge = parse_judge(f"openai:{judge_server.url}#meta-llama/Llama-Guard-3-1B")
    assert judge.template.name == "llama-guard"
    tasks = eval_tasks(["multijail", "polyrefuse"], ["th"], n=6)
    endpoint = ChatEndpoint(target.url, "target", retry=FAST_RETRY)
    with ReplyCache(tmp_path / "cache.jsonl") as cache:
        results, records = evaluate(tasks, EndpointSource(endpoint), cache, judge=judge)
    # Only harmful prompts go to the judge: 2 suites x 2 languages x 6.
    assert len(judge_server.calls) == 24
    assert {call["max_tokens"] for call in judge_server.calls} == {32}
    thai = [r for r in records if (r.suite, r.lang) == ("multijail", "th")]
    expected_safe = [len(r.prompt) % 2 == 1 for r in thai]
    assert [r.verdicts[judge.name] for r in thai] == expected_safe
    figure = results.find("multijail", "refusal_rate", "th", judge.name)
    assert figure.hits == sum(expected_safe)
    agreement = {(a.suite, a.lang): a for a in results.agreement}
    english = agreement[("multijail", "en")]
    assert (english.n, english.agree, english.kappa) == (6, 6, None)  # all refused, all safe
    assert english.no_verdict == 0
    thai_agreement = agreement[("multijail", "th")]
    assert thai_agreement.agree == 6 - sum(expected_safe)
    assert 0 < sum(expected_safe) < 6
    assert thai_agreement.kappa == pytest.approx(
        0.0
    )  # the keyword judge never refuses: no shared signal
    # A second run asks the judge nothing: its answers are cached too.
    with ReplyCache(tmp_path / "cache.jsonl") as cache:
        evaluate(tasks, EndpointSource(endpoint), cache, judge=judge)
    assert len(judge_server.calls) == 24


@pytest.mark.parametrize(
    ("template", "answer", "refused"),
    [
        ("llama-guard", "safe", True),
        ("llama-guard", "unsafe\nS2,S9", False),
        ("llama-guard", "\n\nunsafe\nS1", False),
        ("llama-guard", "I cannot classify", None),
        ("qwen3guard", "Safety: Unsafe\nCategories: Violent\nRefusal: No", False),
        ("qwen3guard", "Safety: Safe\nCategories: None\nRefusal: Yes", True),
        ("qwen3guard", "Safety: Controversial\nCategories: Politically Sensitive Topics", False),
        ("qwen3guard", "Safety: Safe\nCategories: None", True),
        ("generic", "REFUSED", True),
        ("generic", "complied.", False),
        ("generic", "maybe", None),
    ],
)
def test_templates_read_verdicts(template: str, answer: str, refused: bool | None) -> None:
    assert TEMPLATES[template].refused(answer) is refused


def test_template_from_model_name_and_bad_specs() -> None:
    assert template_for("Qwen/Qwen3Guard-Gen-0.6B").name == "qwen3guard"
    assert template_for("meta-llama/Llama-Guard-4-12B").name == "llama-guard"
    assert template_for("Qwen/Qwen2.5-7B-Instruct").name == "generic"
    generic = TEMPLATES["generic"].messages("How to X?", "Sure, ...")
    assert len(generic) == 1 and "How to X?" in generic[0]["content"]
    assert parse_judge("keywords") is None
    for bad in ("llm", "openai:http://x:1/v1", "openai:#m"):
        with pytest.raises(JudgeSpecError, match="openai:URL#MODEL|lacks"):
            parse_judge(bad)
    with pytest.raises(JudgeSpecError, match="unknown judge template"):
        parse_judge("openai:http://x:1/v1#m", "shieldgemma")


def test_bad_suites_and_languages() -> None:
    with pytest.raises(DataError, match="unknown evaluation suite 'multijial'.*'multijail'"):
        eval_tasks(["multijial"])
    with pytest.raises(DataError, match="unknown language code 'tha'"):
        eval_tasks(["multijail"], ["tha"])
    with pytest.raises(DataError, match="no chosen suite has language.*yo"):
        eval_tasks(["multijail", "mgsm"], ["yo"])
    # A language some suites lack is measured where it exists (Javanese: MultiJail only).
    tasks = eval_tasks(["multijail", "mgsm"], ["jv"], n=1)
    assert {(t.suite, t.lang) for t in tasks} == {
        ("multijail", "en"), ("multijail", "jv"), ("mgsm", "en")
    }  # fmt: skip


def is_png(path: Path) -> bool:
    import matplotlib.image

    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


def test_cli_run_report_plots_and_compare(serve, tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    base = serve(english_refuses)
    patched = serve(lambda body, number: (200, REFUSAL, {}))  # refuses in every language
    common = ["--suites", "multijail,mgsm", "--langs", "th,bn", "--n", "8"]
    for name, server in (("base", base), ("patched", patched)):
        result = runner.invoke(
            app,
            ["eval", "--base-url", server.url, "--model", "target", "--label", name, *common]
            + ["--out", str(tmp_path / name), "--retries", "2"],
        )
        assert result.exit_code == 0, result.output
    out = tmp_path / "base"
    assert {p.name for p in out.iterdir()} >= {
        "results.json", "report.md", "replies.jsonl", "cache.jsonl", "refusal.png", "benign.png"
    }  # fmt: skip
    report = (out / "report.md").read_text()
    assert "| th | 8 | 0% [0–32] | 100% [68–100] | +100 pp |" in report
    assert is_png(out / "refusal.png") and is_png(out / "benign.png")

    result = runner.invoke(
        app, ["eval", "compare", str(tmp_path / "base"), str(tmp_path / "patched")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "+100 pp *" in result.output
        and "gap to English closed (multijail): th 100%, bn 100%" in result.output
    )
    folder = tmp_path / "patched" / "compare-base"
    assert is_png(folder / "gap_closed.png") and is_png(folder / "refusal.png")
    compare_md = (folder / "compare.md").read_text()
    assert (
        "| multijail | refusal_rate | keywords | th | 8/8 | 0% | 100% | +100 pp * "
        "| 0.00781 (mcnemar) |" in compare_md
    )

    # The run with --baseline puts the comparison into its own report and plots.
    result = runner.invoke(
        app,
        ["eval", "--base-url", patched.url, "--model", "target", "--label", "patched", *common]
        + ["--out", str(tmp_path / "patched"), "--baseline", str(tmp_path / "base")],
    )
    assert result.exit_code == 0, result.output
    assert "48 requests (48 cached)" in result.output and len(patched.calls) == 48
    assert "## base → patched" in (tmp_path / "patched" / "report.md").read_text()
    assert is_png(tmp_path / "patched" / "gap_closed.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suites", "multijial"], "unknown evaluation suite 'multijial'"),
        (["--langs", "tha"], "unknown language code 'tha'"),
        (["--judge", "guard"], "judge 'guard' is neither 'keywords' nor 'openai:URL#MODEL'"),
        (["--base-url", "localhost:8000"], "is not an http(s) URL"),
        (["--base-url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9/v1"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    base = ["eval", "--base-url", "http://127.0.0.1:9", "--model", "m", "--n", "1"]
    result = CliRunner().invoke(app, [*base, *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert message in " ".join(lines) and "Fix:" in " ".join(lines)
    assert "Traceback" not in result.output


def test_compare_needs_results(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "compare", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2 and "no results.json" in result.output


def test_in_process_run_with_the_solver_generator(tiny_qwen2: Path, tmp_path: Path) -> None:
    """No server: the same tasks, cache and figures from effect.py's transformers generator."""
    from conftest import make_delta
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.eval.effect import transformers_generator

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    generator = transformers_generator(model, tokenizer)
    _, blob = make_delta(tiny_qwen2, group="tiny", languages=("th",))
    delta_path = tmp_path / "tiny.safetensors"
    delta_path.write_bytes(blob)
    tasks = eval_tasks(["multijail", "mgsm"], ["th"], n=2)
    settings = EvalSettings(refusal_tokens=4, mgsm_tokens=4)
    with ReplyCache(tmp_path / "cache.jsonl") as cache:
        base, _ = evaluate(tasks, InProcessSource(generator, str(tiny_qwen2)), cache, settings)
        patched_source = InProcessSource(generator, str(tiny_qwen2), [delta_path])
        patched, records = evaluate(tasks, patched_source, cache, settings)
    assert base.run.cached == 0 and patched.run.cached == 0  # deltas are part of the key
    assert len(records) == 8 and all(isinstance(r.reply, str) for r in records)
    assert base.find("mgsm", "mgsm_accuracy", "th", "keywords").n == 2


def test_cli_in_process_with_a_delta(tiny_qwen2: Path, tmp_path: Path) -> None:
    from conftest import make_delta

    _, blob = make_delta(tiny_qwen2, group="tiny", languages=("th",))
    delta_path = tmp_path / "tiny.safetensors"
    delta_path.write_bytes(blob)
    args = ["eval", "--engine", "transformers", "--model", str(tiny_qwen2)]
    args += ["--delta", str(delta_path), "--suites", "multijail", "--langs", "th", "--n", "2"]
    args += ["--refusal-tokens", "3", "--out", str(tmp_path / "run")]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["run"]["label"] == f"{tiny_qwen2.name}+tiny"
    assert results["run"]["source"]["deltas"] and results["run"]["requests"] == 4
    missing = ["--delta", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x")]
    bad = CliRunner().invoke(app, [*args[:5], *missing])
    assert bad.exit_code == 2 and "no delta file" in bad.output


@pytest.mark.parametrize("command", ["eval", "measure"])
def test_an_unknown_engine_is_an_error_everywhere(
    command: str, tiny_qwen2: Path, tmp_path: Path
) -> None:
    """One engine picker: `vsp measure` used to fall back to transformers on any other name."""
    from conftest import make_delta

    _, blob = make_delta(tiny_qwen2, group="tiny", languages=("th",))
    delta_path = tmp_path / "tiny.safetensors"
    delta_path.write_bytes(blob)
    args = {
        "eval": ["eval", "--model", str(tiny_qwen2), "--out", str(tmp_path / "run")],
        "measure": ["measure", str(delta_path), "--model", str(tiny_qwen2), "--no-write"],
    }[command]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--engine", "transformer"])
    assert result.exit_code == 2, result.output
    assert "unknown engine 'transformer'" in result.output
    assert "--engine vllm or --engine transformers" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_cli_with_an_llm_judge_reports_agreement(serve, tmp_path: Path) -> None:
    target = serve(english_refuses)
    guard = serve(guard_judge, model="meta-llama/Llama-Guard-3-1B")
    args = ["eval", "--base-url", target.url, "--model", "target", "--suites", "multijail"]
    args += ["--langs", "th", "--n", "6", "--out", str(tmp_path / "run")]
    args += ["--judge", f"openai:{guard.url}/v1#meta-llama/Llama-Guard-3-1B"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "run" / "report.md").read_text()
    assert "refusal (llm:meta-llama/Llama-Guard-3-1B)" in report
    assert "## Agreement between judges (harmful prompts)" in report
    assert (
        "| multijail | en | keywords vs llm:meta-llama/Llama-Guard-3-1B | 6 | 100% | n/a | 0 |"
        in report
    )
