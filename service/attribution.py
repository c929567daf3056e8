"""What served each request, written at score time for the events that follow.

Per scored request, in one pipeline shared by the requests of the same moment:

    ctrserve:req:<request id>  JSON {experiment, arm, model_version, user, items (served ids in
                               order), day, holdout, ts, features (the request's shared model
                               inputs: user record, user_features, context, clock, user id),
                               item_features (candidates' own features, if any), client_ts
                               (the request's own `ts`, only when it gave one)}, TTL = the
                               attribution window
    HSETNX ab:E:D:A:x user 0   the user counts once per arm and day (not for holdout users)
    SADD ab:E:days D

`ts` and its UTC day `D` are the server's clock at the write (`clock="server"`, production), or
with `clock="client"` (simulation and backfill) the request's own `ts` where it gave one. The
event script counts into `D` and the event log is partitioned by it, so under the client clock
a replayed week lands day by day.

The score awaits its write, so an event sent as soon as the reply arrives finds its request;
concurrent requests share one round trip (a write in flight collects the next batch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from pydantic_core import to_json

from service.counts import PREFIX, arm_key, days_key


def request_key(request_id: str) -> str:
    return f"{PREFIX}req:{request_id}"


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


@dataclass
class Served:
    request_id: str
    experiment: str
    arm: str
    model_version: str
    user: str
    items: list[str]
    holdout: bool
    features: dict[str, Any]
    item_features: dict[str, Any] = field(default_factory=dict)
    client_ts: float | None = None  # the request's own time (epoch seconds), if it gave one


class Recorder:
    """Coalesces the score-time writes of concurrent requests into one pipeline.

    `client_clock`: date a request by its `client_ts` where it has one (simulation, backfill).
    """

    def __init__(self, client: aioredis.Redis, ttl_s: int, users_total: Counter,
                 clock: Callable[[], float] = time.time, client_clock: bool = False):
        self.client, self.ttl_s, self.users_total, self.clock = client, ttl_s, users_total, clock
        self.client_clock = client_clock
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
                    new_users = await self._flush([s for s, _ in batch])
                except Exception as exc:  # every waiting request gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (experiment, arm), n in new_users.items():
                    self.users_total.labels(experiment, arm).inc(n)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._writer = None

    def _when(self, s: Served, now: float, today: str) -> tuple[float, str]:
        """The time and UTC day a request is recorded and counted under."""
        if self.client_clock and s.client_ts is not None:
            return s.client_ts, utc_day(s.client_ts)
        return now, today

    async def _flush(self, batch: list[Served]) -> dict[tuple[str, str], int]:
        now = self.clock()
        today = utc_day(now)
        pipe = self.client.pipeline(transaction=False)
        counted: list[tuple[int, str, str]] = []  # (reply index, experiment, arm)
        days: set[tuple[str, str]] = set()
        for s in batch:
            ts, day = self._when(s, now, today)
            record = {"experiment": s.experiment, "arm": s.arm, "model_version": s.model_version,
                      "user": s.user, "items": s.items, "day": day, "holdout": s.holdout,
                      "ts": ts, "features": s.features, "item_features": s.item_features}
            if s.client_ts is not None:
                record["client_ts"] = s.client_ts
            pipe.set(request_key(s.request_id), to_json(record), ex=self.ttl_s)
            days.add((s.experiment, day))
            if not s.holdout:
                counted.append((len(pipe), s.experiment, s.arm))
                pipe.hsetnx(arm_key(s.experiment, day, s.arm, "x"), s.user, 0)
        for experiment, day in days:
            pipe.sadd(days_key(experiment), day)
        replies = await pipe.execute()
        new_users: dict[tuple[str, str], int] = {}
        for index, experiment, arm in counted:
            if replies[index]:
                new_users[experiment, arm] = new_users.get((experiment, arm), 0) + 1
        return new_users
