"""The feature store in Redis: one JSON record per user and per item, and a meta record.

Keys: `ctrserve:fs:user:<id>`, `ctrserve:fs:item:<id>`, `ctrserve:fs:meta` (which fields are
user and item fields, id fields, counts, source). Users are read per request; item records are
cached in process per model as encoded rows, refreshed after `item_cache_ttl_s` (item_rows.py).
Loaded by `ctrserve load-features` from parquet or CSV tables (a synth dir's users.parquet and
apps.parquet), with the blocking client; the scorer reads with the async one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis
import redis.asyncio as aioredis

from ctrserve.common.errors import UserError
from ctrserve.common.keys import FEATURES_META_KEY, item_key, user_key
from ctrserve.features.tables import csv_header, explain_csv_error, unnamed_columns
from ctrserve.service.redis_rounds import RoundTrips

USER_ID_NAMES = ("user_id", "user", "userid")
ITEM_ID_NAMES = ("item_id", "app_id", "item", "itemid", "movie_id")
LOAD_CHUNK = 2000


class FeatureStoreError(UserError):
    """A feature file or record that cannot be loaded; the message names it."""


def pick_id_field(names: Sequence[str], candidates: Sequence[str],
                  explicit: str | None = None) -> str | None:
    """The explicit id field if given, else the first conventional name present."""
    if explicit:
        return explicit
    return next((n for n in candidates if n in names), None)


class FeatureStore:
    """Async reads for the scorer.

    User reads of concurrent requests share round trips (UserReads): while one is in flight,
    the requests that arrive queue their ids for the next one, which the serve-log appends
    share too (redis_rounds.py). Each request still reads its user afresh; redis-py's cost per
    round trip (about 50 us of CPU) is paid once for all of them.
    """

    def __init__(self, client: aioredis.Redis, rounds: RoundTrips | None = None):
        self.client = client
        self._users = UserReads(client, rounds or RoundTrips(client))

    async def meta(self) -> dict[str, Any]:
        raw = await self.client.get(FEATURES_META_KEY)
        return json.loads(raw) if raw else {}

    async def user(self, user_id: str) -> dict[str, Any] | None:
        return await self._users.read(user_id)

    async def items(self, item_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        if not item_ids:
            return []
        raws = await mget(self.client, [item_key(i) for i in item_ids])
        return [json.loads(r) if r else None for r in raws]


class UserReads:
    """The user reads of concurrent requests, one batch per round trip (a redis_rounds.Part):
    one MGET, or on a Redis Cluster (keys of many slots) a GET per user."""

    def __init__(self, client: Any, rounds: RoundTrips):
        self.rounds = rounds
        self._cluster = hasattr(client, "mget_nonatomic")
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._taken: list[tuple[str, asyncio.Future]] = []

    async def read(self, user_id: str) -> dict[str, Any] | None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((user_id, future))
        self.rounds.want(self)
        return await future

    def take(self, pipe: Any) -> int:
        self._taken, self._pending = self._pending, []
        keys = [user_key(u) for u, _ in self._taken]
        if self._cluster or not keys:
            for key in keys:
                pipe.execute_command("GET", key)
            return len(keys)
        pipe.execute_command("MGET", *keys)
        return 1

    def settle(self, replies: list[Any]) -> None:
        raws = replies if self._cluster or not self._taken else replies[0]
        if isinstance(raws, Exception):
            return self.fail(raws)
        for (_, future), raw in zip(self._taken, raws, strict=True):
            if future.done():
                continue
            if isinstance(raw, Exception):
                future.set_exception(raw)
                continue
            try:
                future.set_result(json.loads(raw) if raw else None)
            except ValueError as exc:  # a record that is not JSON: this request's error
                future.set_exception(exc)

    def fail(self, exc: Exception) -> None:
        for _, future in self._taken:
            if not future.done():
                future.set_exception(exc)


async def mget(client: Any, keys: list[str]) -> list[bytes | None]:
    """MGET, or on a Redis Cluster (keys of many slots) one MGET per node."""
    if hasattr(client, "mget_nonatomic"):
        return await client.mget_nonatomic(keys)
    return await client.mget(keys)


def mget_sync(client: redis.Redis, keys: list[str]) -> list[bytes | None]:
    """The blocking `mget`, for CLI commands and the retrain."""
    if hasattr(client, "mget_nonatomic"):
        return client.mget_nonatomic(keys)
    return client.mget(keys)


# ---- loading (CLI, blocking) --------------------------------------------------------------
def read_table(path: Path) -> pa.Table:
    """A parquet or CSV file as a table."""
    if not path.is_file():
        raise FeatureStoreError(f"{path}: not found")
    try:
        if path.suffix == ".csv":
            table = _read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise FeatureStoreError(f"{path}: cannot be read ({exc})") from None
    unnamed = unnamed_columns(table.column_names)
    if unnamed:
        raise FeatureStoreError(f"{path}: column(s) {unnamed} have no name (a pandas index "
                                "written with the data?): write it without the index "
                                "(index=False) or name the column")
    return table


def _read_csv(path: Path) -> pa.Table:
    import pyarrow.csv as pacsv

    try:
        return pacsv.read_csv(path)
    except pa.ArrowInvalid as exc:  # the column's name and the row, not pyarrow's "#0"
        raise FeatureStoreError(explain_csv_error(path, str(exc), csv_header(path))) from None


def load_records(client: redis.Redis, table: pa.Table, kind: str, id_field: str | None,
                 origin: str) -> dict[str, Any]:
    """Write one record per row of `table` (kind "user" or "item"), keyed by its id field."""
    names = USER_ID_NAMES if kind == "user" else ITEM_ID_NAMES
    field = pick_id_field(table.column_names, names, id_field)
    if field is None or field not in table.column_names:
        raise FeatureStoreError(f"{origin}: no id column (looked for {field or list(names)}); "
                                f"columns are {table.column_names}")
    key = user_key if kind == "user" else item_key
    rows = table.to_pylist()
    for start in range(0, len(rows), LOAD_CHUNK):
        chunk = rows[start:start + LOAD_CHUNK]
        mapping = {key(str(r[field])): json.dumps(r, default=str) for r in chunk}
        if hasattr(client, "mset_nonatomic"):  # a Redis Cluster: keys of many slots
            client.mset_nonatomic(mapping)
        else:
            client.mset(mapping)
    return {"rows": len(rows), "id_field": field, "fields": table.column_names,
            "source": origin}


def load_tables(client: redis.Redis, users: Path | None, items: Path | None,
                user_id_field: str | None = None,
                item_id_field: str | None = None) -> dict[str, Any]:
    """Load user and item files and record what was loaded in the meta record."""
    meta: dict[str, Any] = json.loads(client.get(FEATURES_META_KEY) or b"{}")
    if users is not None:
        meta["users"] = load_records(client, read_table(users), "user", user_id_field, str(users))
    if items is not None:
        meta["items"] = load_records(client, read_table(items), "item", item_id_field, str(items))
    meta["loaded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set(FEATURES_META_KEY, json.dumps(meta))
    return meta


def synth_files(directory: Path) -> tuple[Path, Path]:
    """users.parquet and apps.parquet of a directory written by `ctrserve synth`."""
    users, apps = directory / "users.parquet", directory / "apps.parquet"
    missing = [str(p) for p in (users, apps) if not p.is_file()]
    if missing:
        raise FeatureStoreError(f"{directory}: not a synth directory, missing {missing}")
    return users, apps


def item_fields(meta: dict[str, Any]) -> list[str]:
    """The fields that item records carry, from the meta record (empty if none loaded)."""
    return list(meta.get("items", {}).get("fields", []))
