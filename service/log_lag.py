"""How far the drainer is behind: each log's fullest stream and oldest entry, for /metrics.

Every `log_sample_s` the scorer reads XLEN and the first entry id (its milliseconds are the
time it was appended) of every stream in `ctrserve:logs`, and sets `ctrserve_log_entries` and
`ctrserve_log_lag_seconds` per log kind to the worst stream. The alerts `CtrserveDrainerBehind`
and `CtrserveLogFilling` (deploy/prometheus/alert_rules.yml) read them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis
import redis.asyncio as aioredis

from ctrserve.common.keys import LOG_KINDS, LOGS_KEY, log_parts
from ctrserve.service.metrics import Metrics
from ctrserve.service.tasks import stop_task

log = logging.getLogger("ctrserve.logs")


async def sample(client: aioredis.Redis, metrics: Metrics) -> dict[str, tuple[int, float]]:
    """{kind: (entries of the fullest stream, age in seconds of the oldest entry)}."""
    names = sorted(s.decode() for s in await client.smembers(LOGS_KEY))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xlen(name)
        pipe.xrange(name, "-", "+", count=1)
    replies = await pipe.execute() if names else []
    now_ms = time.time() * 1000
    worst = {kind: (0, 0.0) for kind in LOG_KINDS}
    for i, name in enumerate(names):
        kind = log_parts(name)[2]
        length, first = replies[2 * i], replies[2 * i + 1]
        age = (now_ms - int(first[0][0].split(b"-")[0])) / 1000 if first else 0.0
        entries, lag = worst[kind]
        worst[kind] = (max(entries, length), max(lag, age))
    for kind, (entries, lag) in worst.items():
        metrics.log_entries.labels(kind).set(entries)
        metrics.log_lag.labels(kind).set(max(lag, 0.0))
    return worst


class LagSampler:
    def __init__(self, client: aioredis.Redis, metrics: Metrics, every_s: float):
        self.client, self.metrics, self.every_s = client, metrics, every_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-lag")

    async def stop(self) -> None:
        await stop_task(self._task, log)

    async def _run(self) -> None:
        while True:
            try:
                await sample(self.client, self.metrics)
            except redis.RedisError as exc:
                log.warning("log lag not read: %s", exc)
            await asyncio.sleep(self.every_s)
