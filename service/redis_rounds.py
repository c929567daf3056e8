"""Shared Redis round trips for the scorer's coalesced calls.

The user reads (feature_store.UserReads) and the serve-log appends (serve_log.ServeLog) each
gather the calls of concurrent requests into one batch; here their batches also share the
round trip. One pipeline is in flight at a time, and whatever either part queued meanwhile goes
into the next one, together. redis-py's fixed cost per pipeline (tens of µs of the event
loop's CPU) is then paid once per round trip instead of once per part.

A pipeline that fails as a whole (connection lost, socket timeout) fails every call in it; a
command's own error reaches only the part that sent it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

log = logging.getLogger("ctrserve.redis")


class Part(Protocol):
    def take(self, pipe: Any) -> int:
        """Queue the pending calls on `pipe`; returns how many commands were added."""

    def settle(self, replies: list[Any]) -> None:
        """The replies to those commands, in order (an exception object for one that failed)."""

    def fail(self, exc: Exception) -> None:
        """The round trip failed as a whole."""


class RoundTrips:
    def __init__(self, client: Any):
        self.client = client
        self._waiting: list[Part] = []
        self._runner: asyncio.Future | None = None  # a reference keeps the task alive

    def want(self, part: Part) -> None:
        """`part` has calls pending: they go in the next round trip."""
        if part not in self._waiting:
            self._waiting.append(part)
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while self._waiting:
                parts, self._waiting = self._waiting, []
                await self._round(parts)
        finally:
            self._runner = None

    async def _round(self, parts: list[Part]) -> None:
        pipe = self.client.pipeline(transaction=False)
        counts = [part.take(pipe) for part in parts]
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # every call of the round gets the error
            for part in parts:
                part.fail(exc)
            return
        start = 0
        for part, n in zip(parts, counts, strict=True):
            try:
                part.settle(replies[start:start + n])
            except Exception as exc:  # a part's own fault leaves no other part's callers waiting
                log.exception("Redis replies not handed back")
                part.fail(exc)
            start += n
