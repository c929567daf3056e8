"""Impressions and downloads: validation, dedup, attribution, counting and logging.

Each well-formed event runs one Lua script (atomic in Redis), all of a batch in one pipeline:

1. `seen:<event id>` exists: duplicate (a repeat of an accepted event, on any replica).
2. The request record (attribution.py) is gone: rejected, unknown or expired request; another
   user id than the request's: rejected, user mismatch; an impression of an item the request
   did not serve, or a download of an item no accepted impression of the request showed:
   rejected, naming the item.
3. Accepted: `seen:<event id>` is set for the attribution window (later events of the request
   are refused anyway), the impression's items join `shown:<request id>`, the user's x or y
   and the arm-day sums move (counts.py), and the event is appended to the event log stream
   with its request record (event_log.py). All or nothing: a 2xx means it is in Redis.

The script derives its keys from the request record, so it needs a single Redis (not a
cluster). Rejected events do not consume their id: a corrected event may be sent again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import to_json

from service.counts import PREFIX
from service.errors import InvalidBody, validation_items
from service.event_log import STREAM
from service.metrics import Metrics
from service.schemas import Id

STRICT = ConfigDict(extra="forbid")

SCRIPT = """
local p, event_id, kind, rid, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local seen = p .. 'seen:' .. event_id
if redis.call('EXISTS', seen) == 1 then return {'duplicate'} end
local req_key = p .. 'req:' .. rid
local raw = redis.call('GET', req_key)
if not raw then return {'rejected', 'unknown_request'} end
local r = cjson.decode(raw)
if r.user ~= user then return {'rejected', 'user_mismatch'} end
local shown = p .. 'shown:' .. rid
local items, n_imp, n_down = {}, 0, 0
if kind == 'impression' then
  items = cjson.decode(ARGV[6])
  local served = {}
  for _, id in ipairs(r.items) do served[id] = true end
  for _, id in ipairs(items) do
    if not served[id] then return {'rejected', 'item_not_served', id} end
  end
  n_imp = #items
elseif redis.call('SISMEMBER', shown, ARGV[6]) == 0 then
  return {'rejected', 'item_not_shown', ARGV[6]}
else
  n_down = 1
end
redis.call('SET', seen, '1', 'EX', ARGV[7])
if n_imp > 0 then
  redis.call('SADD', shown, unpack(items))
  redis.call('PEXPIRE', shown, math.max(redis.call('PTTL', req_key), 1))
end
local counted = 0
if r.holdout ~= true then
  counted = 1
  local base = p .. 'ab:' .. r.experiment .. ':' .. r.day .. ':' .. r.arm
  local xk, yk, sk = base .. ':x', base .. ':y', base .. ':sums'
  if n_imp > 0 then
    local x = redis.call('HINCRBY', xk, user, n_imp)
    local a = x - n_imp
    local y = tonumber(redis.call('HGET', yk, user) or '0')
    redis.call('HINCRBY', sk, 'impressions', n_imp)
    redis.call('HINCRBY', sk, 'sum_x2', string.format('%d', x * x - a * a))
    redis.call('HINCRBY', sk, 'sum_xy', string.format('%d', n_imp * y))
  else
    local y = redis.call('HINCRBY', yk, user, 1)
    local x = tonumber(redis.call('HGET', xk, user) or '0')
    redis.call('HINCRBY', sk, 'downloads', 1)
    redis.call('HINCRBY', sk, 'sum_y2', string.format('%d', 2 * y - 1))
    redis.call('HINCRBY', sk, 'sum_xy', string.format('%d', x))
  end
end
redis.call('XADD', p .. ARGV[9], '*', 'event', ARGV[8], 'request', raw)
return {'accepted', r.experiment, r.arm, counted, n_imp, n_down}
"""


class Shown(BaseModel):
    model_config = STRICT

    item_id: Id
    position: int = Field(ge=1, description="1-based slot the item was shown in")


class Impression(BaseModel):
    model_config = STRICT

    event_id: Id
    type: Literal["impression"]
    request_id: Id
    user_id: Id
    items: list[Shown] = Field(min_length=1)
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
    request_id: Id
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
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    return {"event_id": event_id if isinstance(event_id, str) else None, "status": "rejected",
            "reason": "malformed", "detail": f"{field}: {err['msg']}"}


def _script_args(event: Impression | Download, window_s: int) -> list[Any]:
    if isinstance(event, Impression):
        items = to_json([i.item_id for i in event.items]).decode()
    else:
        items = event.item_id
    logged = event.model_dump_json()
    return [PREFIX, event.event_id, event.type, event.request_id, event.user_id, items,
            window_s, logged, STREAM.removeprefix(PREFIX)]


REASONS = {"unknown_request": "unknown request id, or its attribution window has passed",
           "user_mismatch": "the request was scored for another user",
           "item_not_served": "item {} was not served in this request",
           "item_not_shown": "item {} was not shown by an accepted impression of this request"}


class EventIngest:
    def __init__(self, client: aioredis.Redis, metrics: Metrics, window_s: int,
                 max_events: int):
        self.client, self.metrics = client, metrics
        self.window_s, self.max_events = window_s, max_events
        self.script = client.register_script(SCRIPT)

    async def ingest(self, body: bytes) -> dict[str, Any]:
        """Per-event results in the order given, and how many of each status."""
        raws = parse_batch(body, self.max_events)
        results: list[dict[str, Any] | None] = [None] * len(raws)
        pipe = self.client.pipeline(transaction=False)
        queued: list[tuple[int, Impression | Download]] = []
        for i, raw in enumerate(raws):
            try:
                event = EVENT.validate_python(raw)
            except ValidationError as exc:
                results[i] = _malformed(raw, exc)
                kind = raw.get("type") if isinstance(raw, dict) else None
                self.metrics.events.labels(kind if kind in KINDS else "other", "rejected").inc()
                continue
            await self.script(args=_script_args(event, self.window_s), client=pipe)
            queued.append((i, event))
        replies = await pipe.execute() if queued else []
        for (i, event), reply in zip(queued, replies, strict=True):
            results[i] = self._result(event, [_text(v) for v in reply])
        counts = {s: sum(r["status"] == s for r in results)
                  for s in ("accepted", "duplicate", "rejected")}
        return {**counts, "results": results}

    def _result(self, event: Impression | Download, reply: list[Any]) -> dict[str, Any]:
        status = reply[0]
        self.metrics.events.labels(event.type, status).inc()
        out: dict[str, Any] = {"event_id": event.event_id, "status": status}
        if status == "rejected":
            out["reason"] = reply[1]
            out["detail"] = REASONS[reply[1]].format(*reply[2:])
        elif status == "accepted":
            _, experiment, arm, counted, n_imp, n_down = reply
            out.update(experiment=experiment, arm=arm, counted=bool(counted))
            if counted:
                if n_imp:
                    self.metrics.impressions.labels(experiment, arm).inc(n_imp)
                if n_down:
                    self.metrics.downloads.labels(experiment, arm).inc(n_down)
        return out


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
