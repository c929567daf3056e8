"""Impressions and downloads: validation, proof, dedup, counting and logging.

An event carries back the `attribution` token of the score response that served it
(attribution.py). In Python, per event: the token verifies (else `bad_token` /
`bad_signature`), it names the event's request and user (`request_mismatch`, `user_mismatch`),
it was issued within the attribution window (`expired`), the event's `ts` lies within the
window around the request (`bad_ts`), and every item is proven served (`item_not_served`), an
impression's positions within the returned list (`bad_position`: a client may show the items
in another order than returned, so the slot is not tied to the item). Nothing is read from
Redis for that.

Then one Lua script per event, all of a batch in one pipeline, on keys that all carry the
arm's hash tag (keys.py; one cluster slot):

1. the event id's digest is in the current or previous dedup bucket: `duplicate`;
2. the arm's event stream holds `max_log_entries`: `log_full` (the drainer is behind; the
   batch answers 503 and the client sends it again: what was accepted comes back duplicate);
3. accepted: the id enters the dedup bucket; the user's x or y and the sums move, for the
   day and for the whole experiment (counts.py; holdout users are logged, not counted; a user
   enters the counts with their first proven event); the expiries move (a day's per-user
   hashes once its events can no longer come, its sums and the totals `retention` after); the
   event is appended to the arm's stream with its claims. All or nothing: a 2xx means it is
   in Redis.

Rejected events do not consume their id: a corrected event may be sent again. A download of a
served item is accepted without an impression of it: the retrain's join (training/data/
events.py) labels only items an impression showed.
"""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import to_json

from ctrserve.common.keys import TOTAL, arm_key, days_key, log_key, seen_key
from ctrserve.service.attribution import TAG_BYTES, Claims, Signer, TokenError
from ctrserve.service.errors import InvalidBody, validation_items
from ctrserve.service.metrics import Metrics
from ctrserve.service.redis_scripts import PipelinedScript
from ctrserve.service.schemas import Id

STRICT = ConfigDict(extra="forbid")
MAX_TOKEN = 8192  # a 1,000-item response's token is about 5,500 characters
DAY_S = 86_400

SCRIPT = """
local cur, prev, dk, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local digest, kind, user, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HEXISTS', cur, digest) == 1 or redis.call('HEXISTS', prev, digest) == 1 then
  return {'duplicate'}
end
if redis.call('XLEN', log) >= tonumber(ARGV[5]) then return {'log_full'} end
redis.call('HSET', cur, digest, 1)
redis.call('EXPIREAT', cur, ARGV[6])
-- one user's x (impressions) or y (downloads) moves by n in hashes xk, yk; the sums in sk
-- move by what that adds to each user-level sum; returns 1 when the user is new there
local function count(xk, yk, sk, expire_xy, expire_sums)
  local new_user = redis.call('HSETNX', xk, user, 0)
  if new_user == 1 then redis.call('HINCRBY', sk, 'users', 1) end
  if kind == 'impression' then
    local x = redis.call('HINCRBY', xk, user, n)
    local a = x - n
    local y = tonumber(redis.call('HGET', yk, user) or '0')
    redis.call('HINCRBY', sk, 'impressions', n)
    redis.call('HINCRBY', sk, 'sum_x2', string.format('%d', x * x - a * a))
    redis.call('HINCRBY', sk, 'sum_xy', string.format('%d', n * y))
  else
    local y = redis.call('HINCRBY', yk, user, 1)
    local x = tonumber(redis.call('HGET', xk, user) or '0')
    redis.call('HINCRBY', sk, 'downloads', 1)
    redis.call('HINCRBY', sk, 'sum_y2', string.format('%d', 2 * y - 1))
    redis.call('HINCRBY', sk, 'sum_xy', string.format('%d', x))
    redis.call('EXPIREAT', yk, expire_xy)
  end
  redis.call('EXPIREAT', xk, expire_xy)
  redis.call('EXPIREAT', sk, expire_sums)
  return new_user
end
local counted, new_user = 0, 0
if ARGV[7] == '1' then
  counted = 1
  new_user = count(KEYS[5], KEYS[6], KEYS[7], ARGV[8], ARGV[9])
  count(KEYS[8], KEYS[9], KEYS[10], ARGV[10], ARGV[10])
  if new_user == 1 then redis.call('SADD', dk, ARGV[11]) end
end
redis.call('XADD', log, '*', 'event', ARGV[12], 'claims', ARGV[13])
return {'accepted', counted, new_user}
"""


class Shown(BaseModel):
    model_config = STRICT

    item_id: Id
    position: int = Field(ge=1, le=100_000, description="1-based slot of the item in the "
                                                        "score response's item_ids")


Token = Annotated[str, Field(min_length=1, max_length=MAX_TOKEN,
                             description="the score response's `attribution`, as given")]


class Impression(BaseModel):
    model_config = STRICT

    event_id: Id
    type: Literal["impression"]
    attribution: Token
    request_id: Id | None = Field(None, description="optional; must be the token's request")
    user_id: Id
    items: list[Shown] = Field(min_length=1, max_length=100_000)
    ts: datetime

    @field_validator("items")
    @classmethod
    def _distinct(cls, items: list[Shown]) -> list[Shown]:
        ids = [i.item_id for i in items]
        if len(set(ids)) != len(ids):
            raise ValueError("an item appears twice in one impression")
        return items


class Download(BaseModel):
    model_config = STRICT

    event_id: Id
    type: Literal["download"]
    attribution: Token
    request_id: Id | None = Field(None, description="optional; must be the token's request")
    user_id: Id
    item_id: Id
    ts: datetime


KINDS = ("impression", "download")
Event = Annotated[Impression | Download, Field(discriminator="type")]
EVENT = TypeAdapter(Event)


class EventBatch(BaseModel):
    """The body of POST /v1/events; each event is validated on its own."""

    model_config = STRICT

    events: list[Any] = Field(min_length=1)


def parse_batch(body: bytes, max_events: int) -> list[Any]:
    try:
        events = EventBatch.model_validate_json(body).events
    except ValidationError as exc:
        raise InvalidBody(validation_items(exc)) from None
    if len(events) > max_events:
        raise InvalidBody([{"loc": ["body", "events"], "msg": f"{len(events)} events, at most "
                            f"{max_events} per batch", "type": "too_long"}])
    return events


def _malformed(raw: Any, exc: ValidationError) -> dict[str, Any]:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = err["loc"][1:] if err["loc"] and err["loc"][0] in KINDS else err["loc"]
    field = ".".join(str(p) for p in loc) or "event"
    return _rejected(raw, "malformed", f"{field}: {err['msg']}")


def _rejected(raw: Any, reason: str, detail: str) -> dict[str, Any]:
    event_id = raw.get("event_id") if isinstance(raw, dict) else getattr(raw, "event_id", None)
    return {"event_id": event_id if isinstance(event_id, str) else None, "status": "rejected",
            "reason": reason, "detail": detail}


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class EventRules:
    """The checks an event passes before it reaches Redis (module docstring)."""

    def __init__(self, signer: Signer, window_s: int, skew_s: int, client_clock: bool,
                 clock: Callable[[], float] = time.time):
        self.signer, self.window_s, self.skew_s = signer, window_s, skew_s
        self.client_clock, self.clock = client_clock, clock

    def check(self, event: Impression | Download) -> Claims:
        try:
            kid, claims = self.signer.verify(event.attribution)
        except TokenError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        if event.request_id is not None and event.request_id != claims.request_id:
            raise Rejected("request_mismatch", "request_id is not the request the attribution "
                           "token was issued for")
        if event.user_id != claims.user:
            raise Rejected("user_mismatch", "the request was scored for another user")
        self._check_time(event, claims)
        if isinstance(event, Impression):
            self._check_shown(kid, claims, event.items)
        elif not claims.has_tag(self.signer.tags(kid, claims.request_id, [event.item_id],
                                                 claims.version)):
            raise Rejected("item_not_served", f"item {event.item_id} was not served in this "
                           "request")
        return claims

    def _check_time(self, event: Impression | Download, claims: Claims) -> None:
        now, ts = self.clock(), event.ts.timestamp()
        if not self.client_clock and now - claims.ts > self.window_s:
            raise Rejected("expired", f"the request is {now - claims.ts:.0f} s old; events are "
                           f"accepted for {self.window_s} s (attribution_window_s)")
        latest = claims.ts + self.window_s if self.client_clock else now
        if not claims.ts - self.skew_s <= ts <= latest + self.skew_s:
            raise Rejected("bad_ts", f"ts {event.ts.isoformat()} is outside the request's "
                           f"attribution window (from {claims.ts - self.skew_s:.0f} to "
                           f"{latest + self.skew_s:.0f}, epoch seconds, with "
                           f"event_clock_skew_s={self.skew_s})")

    def _check_shown(self, kid: str, claims: Claims, items: list[Shown]) -> None:
        tags = self.signer.tags(kid, claims.request_id, [s.item_id for s in items],
                                claims.version)
        for i, shown in enumerate(items):
            if shown.position > claims.served:
                raise Rejected("bad_position", f"items.{i}.position {shown.position}: the "
                               f"request returned {claims.served} item(s)")
            if not claims.has_tag(tags[i * TAG_BYTES : (i + 1) * TAG_BYTES]):
                raise Rejected("item_not_served", f"item {shown.item_id} was not served in this "
                               "request")


class EventIngest:
    def __init__(self, client: aioredis.Redis, metrics: Metrics, rules: EventRules,
                 max_events: int, dedup_window_s: int, retention_days: int,
                 max_log_entries: int):
        self.client, self.metrics, self.rules = client, metrics, rules
        self.max_events, self.dedup_window_s = max_events, dedup_window_s
        self.retention_s, self.max_log_entries = retention_days * DAY_S, max_log_entries
        self.script = PipelinedScript(SCRIPT)

    async def ingest(self, body: bytes) -> dict[str, Any]:
        """Per-event results in the order given, and how many of each status."""
        raws = parse_batch(body, self.max_events)
        results: list[dict[str, Any] | None] = [None] * len(raws)
        queued: list[tuple[int, Impression | Download, Claims, tuple[list[str], list[Any]]]] = []
        for i, raw in enumerate(raws):
            try:
                event = EVENT.validate_python(raw)
            except ValidationError as exc:
                results[i] = _malformed(raw, exc)
                kind = raw.get("type") if isinstance(raw, dict) else None
                self.metrics.events.labels(kind if kind in KINDS else "other", "rejected").inc()
                continue
            try:
                claims = self.rules.check(event)
            except Rejected as exc:
                results[i] = _rejected(event, exc.reason, exc.detail)
                self.metrics.events.labels(event.type, "rejected").inc()
                continue
            queued.append((i, event, claims, self._script_call(event, claims)))
        replies = await self._run(queued)
        for (i, event, claims, _), reply in zip(queued, replies, strict=True):
            results[i] = self._result(event, claims, [_text(v) for v in reply])
        counts = {s: sum(r["status"] == s for r in results)
                  for s in ("accepted", "duplicate", "rejected")}
        full = any(r.get("reason") == "log_full" for r in results)
        return {**counts, "results": results, "log_full": full}

    async def _run(self, queued: list[tuple[Any, ...]]) -> list[Any]:
        """The event script for each queued event, in one pipeline."""
        return await self.script.run(self.client, [call for *_, call in queued])

    def _script_call(self, event: Impression | Download, claims: Claims
                     ) -> tuple[list[str], list[Any]]:
        e, a, day = claims.experiment, claims.arm, claims.day
        now = int(self.rules.clock())
        bucket = now // self.dedup_window_s
        keys = [seen_key(e, a, bucket), seen_key(e, a, bucket - 1), days_key(e, a),
                log_key(e, a, "events"),
                *(arm_key(e, day, a, part) for part in ("x", "y", "sums")),
                *(arm_key(e, TOTAL, a, part) for part in ("x", "y", "sums"))]
        day_end = calendar.timegm(time.strptime(day, "%Y-%m-%d")) + DAY_S
        # a day's per-user hashes live while its events can still come; its sums and the
        # experiment's per-user totals for the retention
        last_event = max(day_end + self.rules.window_s, now) + self.rules.skew_s + DAY_S
        n = len(event.items) if isinstance(event, Impression) else 1
        digest = hashlib.blake2b(event.event_id.encode(), digest_size=12).digest()
        logged = event.model_dump_json(exclude={"attribution"})
        claims_json = to_json({k: v for k, v in asdict(claims).items() if k != "tags"})
        args = [digest, event.type, event.user_id, n, self.max_log_entries,
                (bucket + 2) * self.dedup_window_s, "0" if claims.holdout else "1",
                last_event, max(day_end, now) + self.retention_s, now + self.retention_s, day,
                logged, claims_json]
        return keys, args

    def _result(self, event: Impression | Download, claims: Claims,
                reply: list[Any]) -> dict[str, Any]:
        status = reply[0]
        if status == "log_full":
            self.metrics.events.labels(event.type, "rejected").inc()
            return _rejected(event, "log_full", "the event log is full (the drainer is "
                             "behind): send the batch again after Retry-After")
        self.metrics.events.labels(event.type, status).inc()
        out: dict[str, Any] = {"event_id": event.event_id, "status": status}
        if status == "accepted":
            _, counted, new_user = reply
            e, a = claims.experiment, claims.arm
            out.update(experiment=e, arm=a, counted=bool(counted))
            if counted:
                if isinstance(event, Impression):
                    self.metrics.impressions.labels(e, a).inc(len(event.items))
                else:
                    self.metrics.downloads.labels(e, a).inc()
                if new_user:
                    self.metrics.users.labels(e, a).inc()
        return out


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
