"""The serve log: what each scored request served, appended to its arm's stream.

One entry per scored request in `ctrserve:{E:A}:log:serve` (keys.py), field `r`: JSON
{request_id, ts, day, experiment, arm, model_version, user, holdout, items (returned ids in
order), features (the request's shared model inputs: user record, user_features, context,
clock, user id), item_features (candidates' own features, if any), client_ts (the request's own
`ts`, or null)}. The drainer moves it to
Parquet (event_log.py) and the retrain joins events to it by request id, so it trains on the
inputs as served. Nothing per request stays in Redis beyond the drain lag.

Concurrent requests share one write (a write in flight collects the next batch, which also
carries the next user reads: redis_rounds.py), and the score awaits its write. A write is one
script call per stream in one pipeline: it appends the
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
from redis.exceptions import NoScriptError

from ctrserve.common.keys import log_key
from ctrserve.service.attribution import utc_day
from ctrserve.service.redis_rounds import RoundTrips
from ctrserve.service.redis_scripts import Call, PipelinedScript

APPEND = """
-- KEYS[1]: an arm's serve-log stream; ARGV[1]: its bound; ARGV[2..]: records, appended in
-- order while the stream holds fewer entries than the bound. Returns how many were appended.
local n = math.min(#ARGV - 1, tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1]))
for i = 2, n + 1 do redis.call('XADD', KEYS[1], '*', 'r', ARGV[i]) end
return math.max(n, 0)
"""
APPEND_SCRIPT = PipelinedScript(APPEND)
Entry = tuple[str, bytes, asyncio.Future]  # (stream, record, the request's future)


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
    """Coalesces the serve-log appends of concurrent requests, one script call per stream in
    each round trip, which the user reads share (a redis_rounds.Part)."""

    def __init__(self, client: aioredis.Redis, max_entries: int, dropped: Counter,
                 rounds: RoundTrips | None = None):
        self.client, self.max_entries, self.dropped = client, max_entries, dropped
        self.rounds = rounds or RoundTrips(client)
        self._pending: list[Entry] = []
        self._calls: list[list[Entry]] = []  # the round trip's, one list per stream
        self._resends: set[asyncio.Future] = set()  # references keep the tasks alive

    async def record(self, served: Served) -> None:
        future = asyncio.get_running_loop().create_future()
        stream = log_key(served.experiment, served.arm, "serve")
        self._pending.append((stream, served.record(), future))
        self.rounds.want(self)
        await future

    def take(self, pipe: Any) -> int:
        streams: dict[str, list[Entry]] = {}
        for entry in self._pending:
            streams.setdefault(entry[0], []).append(entry)
        self._pending, self._calls = [], list(streams.values())
        for entries in self._calls:
            APPEND_SCRIPT.add(pipe, *self._call(entries))
        return len(self._calls)

    def settle(self, replies: list[Any]) -> None:
        results = list(zip(self._calls, replies, strict=True))
        refused = [entries for entries, reply in results if isinstance(reply, NoScriptError)]
        self._appended([(e, r) for e, r in results if not isinstance(r, NoScriptError)])
        if refused:  # a restarted or new Redis: the calls appended nothing
            resend = asyncio.ensure_future(self._resend(refused))
            self._resends.add(resend)
            resend.add_done_callback(self._resends.discard)

    def fail(self, exc: Exception) -> None:
        for entries in self._calls:
            _answer(entries, exc)

    def _call(self, entries: list[Entry]) -> Call:
        return [entries[0][0]], [self.max_entries, *(record for _, record, _ in entries)]

    def _appended(self, results: list[tuple[list[Entry], Any]]) -> None:
        """Answer each stream's requests with its script reply (how many were appended)."""
        dropped = 0
        for entries, appended in results:
            if isinstance(appended, Exception):
                _answer(entries, appended)
            else:
                dropped += len(entries) - appended
                _answer(entries, None)
        if dropped:
            self.dropped.inc(dropped)

    async def _resend(self, refused: list[list[Entry]]) -> None:
        """Calls refused with NOSCRIPT, in a round trip of their own: PipelinedScript loads
        the script and sends them again, once."""
        try:
            appended = await APPEND_SCRIPT.run(self.client, [self._call(e) for e in refused])
        except Exception as exc:
            for entries in refused:
                _answer(entries, exc)
            return
        self._appended(list(zip(refused, appended, strict=True)))


def _answer(entries: list[Entry], error: Exception | None) -> None:
    for _, _, future in entries:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
