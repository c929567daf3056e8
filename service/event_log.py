"""The logs: Redis streams per arm, drained into day-partitioned Parquet files.

Two streams per (experiment, arm), listed in `ctrserve:logs` (keys.py):

- `...:log:events`: one entry per accepted event, appended by the event script in the same
  atomic step that counts it: `event` (the event as accepted, JSON) and `claims` (what its
  attribution token proved: request id, experiment, arm, model version, user, day, request
  ts, holdout);
- `...:log:serve`: one entry per scored request (serve_log.py): `r`, what it served and the
  model inputs it was served with.

`drain` moves entries, oldest first, into `OUT/day=YYYY-MM-DD/{events,serve}-<E>-<A>-<first
stream id>.parquet` (the request's `day`), fsyncs each file, and only then trims exactly the
entries it wrote (XTRIM MINID: every entry up to the last one read). A crash between the two
leaves the entries in the stream; the next drain writes them again under the same file name
when the chunk starts at the same entry, and readers deduplicate by event or request id in any
case. An entry that cannot be read or written (a bug, or a hand-made entry) goes with its
reason to `OUT/dead-letter/<kind>-<E>-<A>.jsonl` and the drain moves on: one bad entry never
stops the log. A per-stream lock keeps two drainers off the same stream.

`follow` drains in a loop until SIGTERM/SIGINT (`ctrserve drain-events --follow`): what the
streams hold is bounded by the drain lag, which the scorer exports (log_lag.py).

After writing, `drain` recomputes the list metrics (personalization@L, coverage@L,
popularity@L: experiments/list_metrics.py) of every experiment whose serve or event log got
rows, over every file under OUT (every day drained so far: the period's total and popularity
need them all), and stores them in Redis (`ctrserve:exp:E:lists`) for the report and the
dashboard. The event log counts too: popularity rests on its downloads. This needs DuckDB, an
optional dependency: without it the drain is complete all the same and says once, on stderr,
that the list metrics were not computed and why. `follow` recomputes at most every
LISTS_EVERY_S, and at most LISTS_TIME_SHARE of its time (each recompute reads every file, and
draining waits meanwhile), and once more when it stops.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from ctrserve.common.keys import LOG_KINDS, LOGS_KEY, log_parts
from ctrserve.service.settings import Settings

log = logging.getLogger("ctrserve.event_log")

EVENTS_SCHEMA = pa.schema([
    ("stream_id", pa.string()), ("event_id", pa.string()), ("type", pa.string()),
    ("request_id", pa.string()), ("user_id", pa.string()), ("ts", pa.string()),
    ("item_id", pa.string()), ("items", pa.list_(pa.string())),
    ("positions", pa.list_(pa.int32())), ("experiment", pa.string()), ("arm", pa.string()),
    ("model_version", pa.string()), ("day", pa.string()), ("holdout", pa.bool_()),
    ("request_ts", pa.float64()),
])
SERVE_SCHEMA = pa.schema([
    ("stream_id", pa.string()), ("request_id", pa.string()), ("ts", pa.float64()),
    ("day", pa.string()), ("experiment", pa.string()), ("arm", pa.string()),
    ("model_version", pa.string()), ("user_id", pa.string()), ("holdout", pa.bool_()),
    ("items", pa.list_(pa.string())), ("features", pa.string()),
    ("item_features", pa.string()), ("client_ts", pa.float64()),
])
SCHEMAS = {"events": EVENTS_SCHEMA, "serve": SERVE_SCHEMA}
LOCK_MS = 120_000
RETENTION_DAYS: int = Settings.model_fields["counts_retention_days"].default
LISTS_EVERY_S = 60.0  # follow: the least time between two recomputes of the list metrics
LISTS_TIME_SHARE = 0.1  # follow: the most of the drainer's time the recomputes take
NO_DUCKDB = "DuckDB is not installed (pip install 'ctrserve[analysis]')"
_told: set[str] = set()  # the reasons already logged by this process


def event_row(stream_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One event entry as a flat Parquet row."""
    event, claims = json.loads(fields[b"event"]), json.loads(fields[b"claims"])
    shown = event.get("items") or []
    return {
        "stream_id": stream_id, "event_id": event["event_id"], "type": event["type"],
        "request_id": claims["request_id"], "user_id": event["user_id"], "ts": event["ts"],
        "item_id": event.get("item_id"),
        "items": [i["item_id"] for i in shown] if shown else None,
        "positions": [i["position"] for i in shown] if shown else None,
        "experiment": claims["experiment"], "arm": claims["arm"],
        "model_version": claims["model_version"], "day": claims["day"],
        "holdout": claims["holdout"], "request_ts": claims["ts"],
    }


def serve_row(stream_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One serve entry as a flat Parquet row (features stay JSON text)."""
    r = json.loads(fields[b"r"])
    return {
        "stream_id": stream_id, "request_id": r["request_id"], "ts": r["ts"], "day": r["day"],
        "experiment": r["experiment"], "arm": r["arm"], "model_version": r["model_version"],
        "user_id": r["user"], "holdout": r["holdout"], "items": r["items"],
        "features": json.dumps(r["features"]), "item_features": json.dumps(r["item_features"]),
        "client_ts": r.get("client_ts"),
    }


ROWS: dict[str, Callable[[str, dict[bytes, bytes]], dict[str, Any]]] = {
    "events": event_row, "serve": serve_row}


class DeadLetters:
    """Entries that could not be drained, one JSON line each with the reason."""

    def __init__(self, out: Path):
        self.dir, self.count = out / "dead-letter", 0

    def add(self, name: str, stream_id: str, fields: dict[bytes, bytes], reason: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = {"stream_id": stream_id, "reason": reason,
                "fields": {k.decode(errors="replace"): v.decode(errors="replace")
                           for k, v in fields.items()}}
        with (self.dir / f"{name}.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.count += 1


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def _table(rows: list[dict[str, Any]], schema: pa.Schema, dead: DeadLetters, name: str,
           entries: dict[str, dict[bytes, bytes]]) -> pa.Table | None:
    """The rows as a table; a row Arrow refuses goes to the dead letters alone."""
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        good = []
        for r in rows:
            try:
                pa.Table.from_pylist([r], schema=schema)
                good.append(r)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                dead.add(name, r["stream_id"], entries[r["stream_id"]], f"arrow: {exc}")
        return pa.Table.from_pylist(good, schema=schema) if good else None


def _next_id(stream_id: str) -> str:
    ms, seq = stream_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def drain_stream(client: redis.Redis, stream: str, out: Path, chunk: int, limit: int | None,
                 dead: DeadLetters) -> tuple[int, list[str], set[str]]:
    """(entries moved, files written, days) for one stream."""
    experiment, arm, kind = log_parts(stream)
    name = f"{kind}-{experiment}-{arm}"
    moved, files, days = 0, [], set()
    while limit is None or moved < limit:
        count = chunk if limit is None else min(chunk, limit - moved)
        entries = client.xrange(stream, "-", "+", count=count)
        if not entries:
            break
        fields_by_id = {sid.decode(): fields for sid, fields in entries}
        by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for sid, fields in fields_by_id.items():
            try:
                r = ROWS[kind](sid, fields)
            except (KeyError, TypeError, ValueError) as exc:
                dead.add(name, sid, fields, f"unreadable entry: {exc!r}")
                continue
            by_day[r["day"]].append(r)
        for day, rows in by_day.items():
            table = _table(rows, SCHEMAS[kind], dead, name, fields_by_id)
            if table is None:
                continue
            path = out / f"day={day}" / f"{name}-{rows[0]['stream_id']}.parquet"
            _write(path, table)
            files.append(str(path))
            days.add(day)
        client.xtrim(stream, minid=_next_id(entries[-1][0].decode()), approximate=False)
        moved += len(entries)
    return moved, files, days


def streams(client: redis.Redis) -> list[str]:
    return sorted(s.decode() for s in client.smembers(LOGS_KEY))


def drain(client: redis.Redis, out: Path, chunk: int = 10_000, limit: int | None = None,
          lists: bool = True, retention_days: int = RETENTION_DAYS) -> dict[str, Any]:
    """Move every log stream's entries into Parquet files, then (`lists`) recompute the list
    metrics of the experiments that got rows.

    Returns {"events", "served", "files", "days", "dead_letters", "left": {kind: entries},
    "experiments": those that got rows, "list_metrics": update_list_metrics's result (with
    `lists` and rows)}; `limit` bounds the entries moved per stream. The list metrics expire
    `retention_days` after their last day or the recompute (counts_retention_days).
    """
    moved = dict.fromkeys(LOG_KINDS, 0)
    left = dict.fromkeys(LOG_KINDS, 0)
    files: list[str] = []
    days: set[str] = set()
    touched: set[str] = set()
    dead = DeadLetters(out)
    owner = uuid.uuid4().hex
    for stream in streams(client):
        experiment, _, kind = log_parts(stream)
        lock = stream + ":drain-lock"
        if not client.set(lock, owner, nx=True, px=LOCK_MS):
            left[kind] += client.xlen(stream)  # another drainer has it
            continue
        try:
            n, written, on = drain_stream(client, stream, out, chunk, limit, dead)
        finally:
            if client.get(lock) == owner.encode():
                client.delete(lock)
        moved[kind] += n
        files += written
        days |= on
        left[kind] += client.xlen(stream)
        if written:
            touched.add(experiment)
    result = {"events": moved["events"], "served": moved["serve"], "files": files,
              "days": sorted(days), "dead_letters": dead.count, "left": left,
              "experiments": sorted(touched)}
    if lists and touched:
        result["list_metrics"] = update_list_metrics(client, out, touched, retention_days)
    return result


def update_list_metrics(client: redis.Redis, out: Path, experiments: set[str],
                        retention_days: int = RETENTION_DAYS) -> dict[str, Any]:
    """list_metrics.refresh over every file under `out`: {"experiments": stored, "failed",
    "seconds"}; without DuckDB {"experiments": [], "not_computed": why}, said once per
    process on stderr (the log line), the drain being complete all the same."""
    try:
        from ctrserve.service.experiments.list_metrics import refresh

        return refresh(client, out, experiments, retention_days)
    except ModuleNotFoundError as exc:
        if exc.name != "duckdb":
            raise
    if NO_DUCKDB not in _told:
        _told.add(NO_DUCKDB)
        log.warning("list metrics not computed for %s: %s; the logs are drained all the same "
                    "(ctrserve list-metrics computes them where DuckDB is)",
                    ", ".join(sorted(experiments)), NO_DUCKDB)
    return {"experiments": [], "not_computed": NO_DUCKDB}


class ListsDue:
    """follow's recomputes: the experiments drained since the last one, recomputed (the first
    drained at once) when `every_s` and LISTS_TIME_SHARE⁻¹ times the last recompute's duration
    have passed since it, so that they never take more than that share of the drainer's time
    (a recompute reads every file: it grows with the folder); and by `flush` at the end."""

    def __init__(self, client: redis.Redis, out: Path, every_s: float, retention_days: int):
        self.client, self.out, self.every_s = client, out, every_s
        self.retention_days = retention_days
        self.pending: set[str] = set()
        self.next_at = -float("inf")

    def add(self, experiments: list[str]) -> dict[str, Any] | None:
        """Note the experiments drained; the recompute's result when one is due."""
        self.pending.update(experiments)
        if not self.pending or time.monotonic() < self.next_at:
            return None
        return self.flush()

    def flush(self) -> dict[str, Any] | None:
        if not self.pending:
            return None
        start = time.monotonic()
        done = update_list_metrics(self.client, self.out, self.pending, self.retention_days)
        now = time.monotonic()
        self.pending = set()
        self.next_at = now + max(self.every_s, (now - start) / LISTS_TIME_SHARE)
        return done


def follow(client: redis.Redis, out: Path, interval_s: float, chunk: int,
           stop: Callable[[], bool], report: Callable[[dict[str, Any]], None],
           lists_every_s: float = LISTS_EVERY_S, retention_days: int = RETENTION_DAYS
           ) -> dict[str, Any] | None:
    """Drain until `stop()`; sleeps `interval_s` only when a pass moved nothing. The list
    metrics of what was drained are recomputed at most every `lists_every_s` (and at most
    LISTS_TIME_SHARE of the time: ListsDue), in the pass's result as "list_metrics", and at the
    end: that last recompute's result is returned."""
    lists = ListsDue(client, out, lists_every_s, retention_days)
    while not stop():
        result = drain(client, out, chunk, lists=False)
        done = lists.add(result["experiments"])
        if done is not None:
            result["list_metrics"] = done
        report(result)
        if not result["events"] and not result["served"]:
            deadline = time.monotonic() + interval_s
            while not stop() and time.monotonic() < deadline:
                time.sleep(min(0.1, interval_s))
    return lists.flush()


def _read(directory: Path, kind: str) -> pa.Table:
    paths = sorted(directory.glob(f"day=*/{kind}-*.parquet"))
    if not paths:
        return SCHEMAS[kind].empty_table()
    return pa.concat_tables([pq.read_table(p, schema=SCHEMAS[kind]) for p in paths])


def read_log(directory: Path) -> pa.Table:
    """Every drained event under `directory` (all days)."""
    return _read(directory, "events")


def read_serve_log(directory: Path) -> pa.Table:
    """Every drained served request under `directory` (all days)."""
    return _read(directory, "serve")
