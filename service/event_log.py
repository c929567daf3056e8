"""The event log: a Redis stream, drained into day-partitioned Parquet files.

`ctrserve:events` holds one entry per accepted event, appended by the event script in the same
atomic step that counts it, with two fields: `event` (the event as accepted, JSON) and
`request` (the request record it was attributed to, JSON: experiment, arm, model_version, day,
holdout, served items in order, the request's shared model inputs and candidates' own
features), which is what the retrain needs to rebuild the exact inputs that were served.

`drain` moves entries, oldest first, into `OUT/day=YYYY-MM-DD/events-<first stream id>.parquet`
(the request record's `day`: the scored request's UTC day, by the clock `CTRSERVE_CLOCK`
names, see attribution.py), fsyncs each file, and only then deletes exactly the entries it
wrote (XDEL). A crash between the two leaves the entries in the stream; the next drain writes
them again under the same file name when the chunk starts at the same entry, and readers
deduplicate by `event_id` in any case.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis

STREAM = "ctrserve:events"
SCHEMA = pa.schema([
    ("stream_id", pa.string()), ("event_id", pa.string()), ("type", pa.string()),
    ("request_id", pa.string()), ("user_id", pa.string()), ("ts", pa.string()),
    ("item_id", pa.string()), ("items", pa.list_(pa.string())),
    ("positions", pa.list_(pa.int32())), ("experiment", pa.string()), ("arm", pa.string()),
    ("model_version", pa.string()), ("day", pa.string()), ("holdout", pa.bool_()),
    ("served_items", pa.list_(pa.string())), ("features", pa.string()),
    ("item_features", pa.string()),
])


def row(stream_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One stream entry as a flat Parquet row (features stay JSON text)."""
    event, req = json.loads(fields[b"event"]), json.loads(fields[b"request"])
    shown = event.get("items") or []
    return {
        "stream_id": stream_id, "event_id": event["event_id"], "type": event["type"],
        "request_id": event["request_id"], "user_id": event["user_id"], "ts": event["ts"],
        "item_id": event.get("item_id"),
        "items": [i["item_id"] for i in shown] if shown else None,
        "positions": [i["position"] for i in shown] if shown else None,
        "experiment": req["experiment"], "arm": req["arm"],
        "model_version": req["model_version"], "day": req["day"], "holdout": req["holdout"],
        "served_items": req["items"], "features": json.dumps(req["features"]),
        "item_features": json.dumps(req.get("item_features") or {}),
    }


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def drain(client: redis.Redis, out: Path, chunk: int = 10_000,
          limit: int | None = None) -> dict[str, Any]:
    """Move stream entries into Parquet files; returns {"events", "files", "days", "left"}."""
    moved, files, days = 0, [], set()
    while limit is None or moved < limit:
        count = chunk if limit is None else min(chunk, limit - moved)
        entries = client.xrange(STREAM, "-", "+", count=count)
        if not entries:
            break
        by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for sid, fields in entries:
            r = row(sid.decode(), fields)
            by_day[r["day"]].append(r)
        for day, rows in by_day.items():
            path = out / f"day={day}" / f"events-{rows[0]['stream_id']}.parquet"
            _write(path, rows)
            files.append(str(path))
            days.add(day)
        client.xdel(STREAM, *[sid for sid, _ in entries])
        moved += len(entries)
    return {"events": moved, "files": files, "days": sorted(days),
            "left": client.xlen(STREAM)}


def read_log(directory: Path) -> pa.Table:
    """Every drained event under `directory` (all days)."""
    paths = sorted(directory.glob("day=*/events-*.parquet"))
    if not paths:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths])
