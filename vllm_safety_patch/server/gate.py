"""A readers-writer gate between inference requests and weight switches.

An inference request holds the gate as a reader from the moment its body has been read
(just before it is handed to the engine) to its last byte, streaming included; a switch
takes it as the writer: it closes the gate to new requests (they wait, they are not
refused), waits until the requests already inside have finished, swaps the weights, and
opens the gate again. So every request is computed by exactly one delta set from its first
token to its last, and the ``X-Safety-Deltas`` header it carries names that set.

A client that opened a request and never sends its body is not inside: it cannot hold up
a switch (``middleware.py`` enters the gate only when the body is complete).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class DrainTimeoutError(Exception):
    """In-flight requests did not finish in time; the gate was opened again unchanged."""

    def __init__(self, in_flight: int, timeout: float) -> None:
        super().__init__(f"{in_flight} requests still running after {timeout:g} s")
        self.in_flight = in_flight
        self.timeout = timeout


class SwitchGate:
    """Many requests or one switch at a time; a waiting switch blocks new requests."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._in_flight = 0
        self._closed = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def enter(self) -> None:
        """Count one more running request, after any switch in progress has finished."""
        async with self._condition:
            await self._condition.wait_for(lambda: not self._closed)
            self._in_flight += 1

    async def leave(self) -> None:
        """The request counted by :meth:`enter` has finished (call exactly once)."""
        async with self._condition:
            self._in_flight -= 1
            self._condition.notify_all()

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        await self.enter()
        try:
            yield
        finally:
            await self.leave()

    @asynccontextmanager
    async def switch(self, drain_timeout: float) -> AsyncIterator[float]:
        """Close, drain (yields the seconds it took), then reopen, whatever happens inside."""
        loop = asyncio.get_running_loop()
        async with self._condition:
            await self._condition.wait_for(lambda: not self._closed)
            self._closed = True
            started = loop.time()
            try:
                await asyncio.wait_for(
                    self._condition.wait_for(lambda: self._in_flight == 0), drain_timeout
                )
            except TimeoutError:
                self._closed = False
                self._condition.notify_all()
                raise DrainTimeoutError(self._in_flight, drain_timeout) from None
            except BaseException:
                self._closed = False
                self._condition.notify_all()
                raise
        try:
            yield loop.time() - started
        finally:
            async with self._condition:
                self._closed = False
                self._condition.notify_all()
