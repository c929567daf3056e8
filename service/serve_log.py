"""The serve log: what each scored request served, appended to its arm's stream.

One entry per scored request in `ctrserve:{E:A}:log:serve` (keys.py), field `r`: JSON
{request_id, ts, day, experiment, arm, model_version, user, holdout, items (returned ids in
order), features (the request's shared model inputs: user record, user_features, context,
clock, user id), item_features (candidates' own features, if any), client_ts (the request's own
`ts`, or null)}. The drainer moves it to
Parquet (event_log.py) and the retrain joins events to it by request id, so it trains on the
inputs as served. Nothing per request stays in Redis beyond the drain lag.

Concurrent requests share one write (a write in flight collects the next batch), and the
score awaits its write. A write is one script call per stream in one pipeline: it appends the
stream's records while the stream holds fewer than `max_entries` and drops the rest (the
drainer is behind or stopped), so the bound is exact; dropped records are counted
(`ctrserve_serve_log_dropped_total`) rather than growing Redis without bound, and scoring goes
on. One call for a batch, not an XADD per record and an XLEN per stream, costs the scorer
about 8 µs less per request (redis-py's per-command cost). The event stream has its own bound
(events.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from pydantic_core import to_json

from ctrserve.common.keys import log_key
from ctrserve.service.attribution import utc_day
from ctrserve.service.redis_scripts import PipelinedScript

APPEND = """
-- KEYS[1]: an arm's serve-log stream; ARGV[1]: its bound; ARGV[2..]: records, appended in
-- order while the stream holds fewer entries than the bound. Returns how many were appended.
local n = math.min(#ARGV - 1, tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1]))
for i = 2, n + 1 do redis.call('XADD', KEYS[1], '*', 'r', ARGV[i]) end
return math.max(n, 0)
"""
APPEND_SCRIPT = PipelinedScript(APPEND)


@dataclass
class Served:
    request_id: str
    experiment: str
    arm: str
    model_version: str
    user: str
    items: list[str]
    holdout: bool
    ts: float
    features: dict[str, Any]
    item_features: dict[str, Any] = field(default_factory=dict)
    client_ts: float | None = None  # the request's own `ts`, when it gave one

    def record(self) -> bytes:
        return to_json({"request_id": self.request_id, "ts": self.ts, "day": utc_day(self.ts),
                        "client_ts": self.client_ts, "experiment": self.experiment, "arm": self.arm,
                        "model_version": self.model_version, "user": self.user,
                        "holdout": self.holdout, "items": self.items,
                        "features": self.features, "item_features": self.item_features})


class ServeLog:
    """Coalesces the serve-log appends of concurrent requests into one pipeline."""

    def __init__(self, client: aioredis.Redis, max_entries: int, dropped: Counter):
        self.client, self.max_entries, self.dropped = client, max_entries, dropped
        self._pending: list[tuple[Served, asyncio.Future]] = []
        self._writer: asyncio.Future | None = None

    async def record(self, served: Served) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((served, future))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())
        await future

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._flush([s for s, _ in batch])
                except Exception as exc:  # every waiting request gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._writer = None

    async def _flush(self, batch: list[Served]) -> None:
        streams: dict[str, list[bytes]] = {}
        for s in batch:
            streams.setdefault(log_key(s.experiment, s.arm, "serve"), []).append(s.record())
        calls = [([stream], [self.max_entries, *records]) for stream, records in streams.items()]
        appended = await APPEND_SCRIPT.run(self.client, calls)
        dropped = sum(len(args) - 1 - n for (_, args), n in zip(calls, appended, strict=True))
        if dropped:
            self.dropped.inc(dropped)
