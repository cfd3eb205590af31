"""A small asynchronous client for any OpenAI-compatible chat endpoint (``vsp serve``, stock
vLLM, a hosted API): concurrent requests, retries with exponential back-off on overload and
transport errors, and a clear error for everything that retrying cannot fix.

httpx rather than the ``openai`` SDK: it is what the SDK is built on, it is all this needs
(one POST, one GET), and its errors map directly onto the messages users should see.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from vllm_safety_patch.errors import VSPError

# Worth another try: the server is overloaded, restarting or briefly unreachable.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class EndpointError(VSPError):
    """An OpenAI-compatible endpoint is unreachable, refuses the request or keeps failing."""


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given
    (hosted APIs put the version elsewhere, e.g. ``.../openai/v1``)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointError(
            f"'{url}' is not an http(s) URL", "pass e.g. --base-url http://127.0.0.1:8000/v1"
        )
    base = url.strip().rstrip("/")
    return base if parts.path.strip("/") else base + "/v1"


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; waits double from ``first_wait_s`` up to ``max_wait_s``,
    with jitter so that concurrent clients do not retry in lockstep."""

    attempts: int = 6
    first_wait_s: float = 0.5
    max_wait_s: float = 30.0

    def wait_s(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_wait_s, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        wait = min(self.max_wait_s, self.first_wait_s * 2**attempt)
        return wait * (0.5 + random.random() / 2)


@dataclass
class ChatEndpoint:
    """One model behind one OpenAI-compatible base URL."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        self.base_url = normalize_base_url(self.base_url)
        if self.api_key is None:
            self.api_key = os.environ.get("OPENAI_API_KEY")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, concurrency: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout_s, limits=limits
        )

    async def check(self, client: httpx.AsyncClient) -> None:
        """Fail early, with the fix, if the server is not there or does not serve the model."""
        try:
            response = await client.get("/models", timeout=30)
        except httpx.TransportError as error:
            raise EndpointError(
                f"cannot reach {self.base_url} ({type(error).__name__}: {error})",
                "start the server (vsp serve, or vLLM's api_server) or fix --base-url",
            ) from error
        if response.status_code in (401, 403):
            raise EndpointError(
                f"{self.base_url} refused the API key (HTTP {response.status_code})",
                "pass --api-key or set OPENAI_API_KEY",
            )
        if response.status_code != 200:
            return  # some hosted APIs have no model list: the first request will tell
        try:
            served = [entry["id"] for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return
        if served and self.model not in served:
            raise EndpointError(
                f"{self.base_url} does not serve model '{self.model}'",
                f"use --model with one of: {', '.join(served)}",
            )

    async def chat(
        self,
        client: httpx.AsyncClient,
        messages: Sequence[dict[str, str]],
        max_tokens: int,
        temperature: float = 0.0,
    ) -> str:
        """The reply text of one chat completion, retried while retrying can help."""
        body = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        problem = ""
        for attempt in range(self.retry.attempts):
            retry_after = None
            try:
                response = await client.post("/chat/completions", json=body)
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return _reply_text(response, self.base_url)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUSES:
                    raise EndpointError(
                        f"{self.base_url} rejected a chat request ({problem})",
                        _fix_for(response.status_code),
                    )
                retry_after = response.headers.get("retry-after")
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(self.retry.wait_s(attempt, retry_after))
        raise EndpointError(
            f"{self.base_url} kept failing: {self.retry.attempts} tries, last {problem}",
            "check the server's log; lower --concurrency or raise --retries",
        )


def _reply_text(response: httpx.Response, base_url: str) -> str:
    try:
        message = response.json()["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise EndpointError(
            f"{base_url} answered 200 with no chat completion ({response.text[:200]!r})",
            "point --base-url at an OpenAI-compatible /v1 endpoint",
        ) from error
    return message.get("content") or ""  # None when a reasoning model only thought


def _fix_for(status: int) -> str:
    if status in (401, 403):
        return "pass --api-key or set OPENAI_API_KEY"
    if status == 404:
        return "check --base-url (it should end in /v1) and --model"
    return "check --model and the token limits against what the server accepts"


async def chat_many(
    endpoint: ChatEndpoint,
    conversations: Sequence[tuple[Sequence[dict[str, str]], int]],
    on_reply: Callable[[int, str], None],
    concurrency: int = 8,
) -> None:
    """Send ``(messages, max_tokens)`` chats, at most ``concurrency`` at a time; call
    ``on_reply(index, text)`` as each reply arrives (in completion order)."""
    semaphore = asyncio.Semaphore(concurrency)
    async with endpoint.client(concurrency) as client:
        await endpoint.check(client)

        async def one(index: int, messages: Sequence[dict[str, str]], max_tokens: int) -> None:
            async with semaphore:
                text = await endpoint.chat(client, messages, max_tokens)
            on_reply(index, text)

        tasks = [
            asyncio.create_task(one(index, messages, max_tokens))
            for index, (messages, max_tokens) in enumerate(conversations)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # first failure: stop the rest (their replies are cached)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
