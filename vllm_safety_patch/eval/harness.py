"""Run an evaluation: generate every task's replies (from a server or in-process), judge
them, and turn the verdicts into figures with intervals.

Replies come from a :class:`ReplySource`: :class:`EndpointSource` for any OpenAI-compatible
server, :class:`InProcessSource` for the solver's in-process generators (vLLM's offline
engine or transformers, see ``eval/effect.py``). Either way they go through the same
cache, judges and figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from vllm_safety_patch.eval.cache import ReplyCache, request_key
from vllm_safety_patch.eval.judges import JUDGE_MAX_TOKENS, KEYWORDS, LLMJudge
from vllm_safety_patch.eval.openai_client import ChatEndpoint, RetryPolicy, chat_many
from vllm_safety_patch.eval.results import (
    ATTACK_SUCCESS,
    Agreement,
    EvalResults,
    Figure,
    RunInfo,
)
from vllm_safety_patch.eval.scoring import (
    MGSM_ACCURACY,
    OVER_REFUSAL,
    REFUSAL_RATE,
    keyword_hits,
)
from vllm_safety_patch.eval.suites import MGSM_TOKENS, REFUSAL_TOKENS, Task

# (stage, done, total): "generate" then "judge"
Progress = Callable[[str, int, int], None]
OnReply = Callable[[int, str], None]


class EvalSettings(BaseModel):
    """Generation lengths and request pacing of one evaluation run."""

    model_config = ConfigDict(extra="forbid")

    refusal_tokens: int = Field(REFUSAL_TOKENS, gt=0, description="tokens per harmful/benign reply")
    mgsm_tokens: int = Field(MGSM_TOKENS, gt=0, description="tokens per MGSM reply")
    concurrency: int = Field(8, gt=0, description="requests in flight at once")
    retries: int = Field(6, gt=0, description="tries per request, with back-off")

    def max_tokens(self, task: Task) -> int:
        return self.mgsm_tokens if task.metric == MGSM_ACCURACY else self.refusal_tokens


class ReplySource(Protocol):
    """Where replies come from. ``identity`` decides a reply besides the request itself
    (endpoint and model, or model folder and deltas): it keys the cache."""

    identity: dict[str, Any]

    def generate(
        self, requests: Sequence[tuple[str, int]], on_reply: OnReply, concurrency: int
    ) -> None: ...


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class EndpointSource:
    """Greedy chat replies from an OpenAI-compatible server."""

    endpoint: ChatEndpoint
    identity: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.identity = {"endpoint": self.endpoint.base_url, "model": self.endpoint.model}

    def generate(
        self, requests: Sequence[tuple[str, int]], on_reply: OnReply, concurrency: int
    ) -> None:
        conversations = [(user_turn(text), tokens) for text, tokens in requests]
        asyncio.run(chat_many(self.endpoint, conversations, on_reply, concurrency))


@dataclass
class InProcessSource:
    """Greedy replies from an in-process generator of ``eval/effect.py`` (vLLM offline or
    transformers), under the base weights plus ``delta_paths``: no server needed."""

    generator: Callable[[Sequence[Path], Sequence[tuple[str, int]]], list[str]]
    model: str
    delta_paths: Sequence[Path] = ()
    identity: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in self.delta_paths]
        self.identity = {"in_process": self.model, "deltas": digests}

    def generate(
        self, requests: Sequence[tuple[str, int]], on_reply: OnReply, concurrency: int
    ) -> None:
        for index, reply in enumerate(self.generator(list(self.delta_paths), list(requests))):
            on_reply(index, reply)


def _fetch(
    keys: Sequence[str],
    requests: Sequence[tuple[str, int]],
    cache: ReplyCache,
    produce: Callable[[Sequence[tuple[str, int]], OnReply], None],
    stage: str,
    progress: Progress | None,
) -> list[str]:
    """Replies for ``keys``: from the cache, the rest produced (and cached as they come)."""
    missing = [i for i, key in enumerate(keys) if cache.get(key) is None]
    done = len(keys) - len(missing)
    if progress:
        progress(stage, done, len(keys))

    def on_reply(position: int, text: str) -> None:
        nonlocal done
        cache.put(keys[missing[position]], text)
        done += 1
        if progress:
            progress(stage, done, len(keys))

    if missing:
        produce([requests[i] for i in missing], on_reply)
    return [cache.replies[key] for key in keys]


def _judge_with_llm(
    judge: LLMJudge,
    conversations: Sequence[tuple[str, str]],
    cache: ReplyCache,
    settings: EvalSettings,
    api_key: str | None,
    progress: Progress | None,
) -> list[bool | None]:
    """The LLM judge's refusal verdict on each (prompt, reply)."""
    endpoint = ChatEndpoint(
        judge.base_url, judge.model, api_key=api_key, retry=RetryPolicy(settings.retries)
    )
    messages = [judge.template.messages(prompt, reply) for prompt, reply in conversations]
    keys = [
        request_key(
            judge=judge.base_url,
            model=judge.model,
            template=judge.template.name,
            messages=m,
            max_tokens=JUDGE_MAX_TOKENS,
        )
        for m in messages
    ]
    # The cache holds the judge's raw answer; the template reads it (so a fixed parser
    # re-reads old answers without asking again).
    requests = [(json.dumps(m, ensure_ascii=False), JUDGE_MAX_TOKENS) for m in messages]

    def produce(wanted: Sequence[tuple[str, int]], on_reply: OnReply) -> None:
        chats = [(json.loads(text), tokens) for text, tokens in wanted]
        asyncio.run(chat_many(endpoint, chats, on_reply, settings.concurrency))

    answers = _fetch(keys, requests, cache, produce, "judge", progress)
    return [judge.template.refused(answer) for answer in answers]


@dataclass
class ReplyRecord:
    """One prompt, its reply and every judge's verdict (a line of ``replies.jsonl``)."""

    suite: str
    lang: str
    index: int
    prompt: str
    reply: str
    verdicts: dict[str, bool | None]


def evaluate(
    tasks: Sequence[Task],
    source: ReplySource,
    cache: ReplyCache,
    settings: EvalSettings | None = None,
    judge: LLMJudge | None = None,
    judge_api_key: str | None = None,
    label: str = "",
    progress: Progress | None = None,
) -> tuple[EvalResults, list[ReplyRecord]]:
    """Generate, judge and score ``tasks``; figures per (suite, metric, language, judge)."""
    settings = settings or EvalSettings()
    started = datetime.now(UTC)
    clock = time.monotonic()
    requests = [(text, settings.max_tokens(task)) for task in tasks for text in task.texts]
    keys = [
        request_key(**source.identity, messages=user_turn(text), max_tokens=tokens, temperature=0)
        for text, tokens in requests
    ]
    cached = sum(cache.get(key) is not None for key in keys)

    def produce(wanted: Sequence[tuple[str, int]], on_reply: OnReply) -> None:
        source.generate(wanted, on_reply, settings.concurrency)

    replies = _fetch(keys, requests, cache, produce, "generate", progress)

    per_task: list[list[str]] = []
    position = 0
    for task in tasks:
        per_task.append(replies[position : position + len(task.prompts)])
        position += len(task.prompts)

    llm_verdicts: dict[int, list[bool | None]] = {}
    if judge is not None:
        harmful = [i for i, task in enumerate(tasks) if task.harmful]
        conversations = [
            (prompt.text, reply)
            for i in harmful
            for prompt, reply in zip(tasks[i].prompts, per_task[i], strict=True)
        ]
        verdicts = _judge_with_llm(judge, conversations, cache, settings, judge_api_key, progress)
        position = 0
        for i in harmful:
            size = len(tasks[i].prompts)
            llm_verdicts[i] = verdicts[position : position + size]
            position += size

    figures: list[Figure] = []
    agreement: list[Agreement] = []
    records: list[ReplyRecord] = []
    for i, (task, task_replies) in enumerate(zip(tasks, per_task, strict=True)):
        ids = [prompt.index for prompt in task.prompts]
        hits = keyword_hits(task.metric, task_replies, task.lang, task.answers)
        figure = Figure.build(task.suite, task.metric, task.lang, KEYWORDS, task.split, ids, hits)
        figures.append(figure)
        verdicts: dict[str, list[bool | None]] = {KEYWORDS: list(hits)}
        if task.metric == REFUSAL_RATE:
            figures.append(figure.inverted(ATTACK_SUCCESS))
        if task.metric == MGSM_ACCURACY:
            # Maths problems are benign prompts too: their refusals are over-refusal.
            refusals = keyword_hits(OVER_REFUSAL, task_replies, task.lang, task.answers)
            figures.append(
                Figure.build(
                    task.suite, OVER_REFUSAL, task.lang, KEYWORDS, task.split, ids, refusals
                )
            )
            verdicts["keywords:refusal"] = list(refusals)
        if i in llm_verdicts and judge is not None:
            judged = Figure.build(
                task.suite, task.metric, task.lang, judge.name, task.split, ids, llm_verdicts[i]
            )
            figures += [judged, judged.inverted(ATTACK_SUCCESS)]
            agreement.append(
                Agreement.build(
                    task.suite, task.lang, (KEYWORDS, judge.name), hits, llm_verdicts[i]
                )
            )
            verdicts[judge.name] = llm_verdicts[i]
        for j, (prompt, reply) in enumerate(zip(task.prompts, task_replies, strict=True)):
            records.append(
                ReplyRecord(
                    task.suite,
                    task.lang,
                    prompt.index,
                    prompt.text,
                    reply,
                    {name: values[j] for name, values in verdicts.items()},
                )
            )

    info = RunInfo(
        label=label,
        source=source.identity,
        suites=list(dict.fromkeys(task.suite for task in tasks)),
        languages=list(dict.fromkeys(task.lang for task in tasks)),
        n=max((len(task.prompts) for task in tasks), default=0),
        judges=[KEYWORDS, *([judge.name] if judge else [])],
        refusal_tokens=settings.refusal_tokens,
        mgsm_tokens=settings.mgsm_tokens,
        started=started.isoformat(timespec="seconds"),
        seconds=round(time.monotonic() - clock, 1),
        requests=len(keys),
        cached=cached,
    )
    return EvalResults(run=info, figures=figures, agreement=agreement), records


def write_records(records: Sequence[ReplyRecord], path: Path) -> Path:
    """Every prompt, reply and verdict, one JSON line each, to read by eye."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.__dict__, ensure_ascii=False) + "\n")
    return path
