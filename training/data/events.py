"""A data source over the drained logs (`ctrserve drain-events`): what was served, labelled.

One row per shown impression item, joined to the serve log by (request id, user): the raw
shared feature values the scorer served the request with (user record, user features, context,
clock, user id), the candidate's own features if the request gave any, the item's feature-store
record (`item_records`, read when the source is built: as of now, not as served), the item id
and the 1-based position shown (the
position field, `slot` by default). The label is 1 when an accepted download of that item for
that request came within `attribution_window_s` of the impression (the scorer accepts
downloads for its own attribution window, 24 h by default; a retrain may count a shorter one),
else 0. Only accepted events are in the log; readers deduplicate by
`event_id` and by request (a drain can write a chunk twice). An impression whose request is not
in the serve log (its record was dropped while the serve stream was full) is left out and
counted in `describe()["unserved_impressions"]`.

The fields come from the champion bundle's encoder spec, so the rows hold exactly the fields
the champion was served with. Days come from the impression event's `ts` (UTC), not from the
clock of the machine that retrains: the last `window_days` days present in the log are used, the
most recent is the test split (held out), the one before it valid, the earlier ones train.
`min_days` is 3 on its own; a retrain that mixes in a base dataset (`MixedSource`) needs only
the valid and test days from the log.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrserve.features import DatasetSpec, SpecError
from ctrserve.training.data.source import SPLITS, Chunk, DataError, DataSource

ITEM_ID_NAMES = ("item_id", "app_id", "item", "itemid", "movie_id")  # as service.feature_store
ItemRecords = Mapping[str, dict[str, Any]] | Callable[[list[str]], Mapping[str, dict[str, Any]]]


def event_time(ts: Any) -> datetime:
    """An event timestamp (ISO 8601 text, or epoch seconds) as an aware UTC datetime."""
    text = str(ts).strip()
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"event timestamp {text!r}: not ISO 8601 or epoch seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def event_day(ts: Any) -> date:
    """The UTC day of an event timestamp."""
    return event_time(ts).date()


class EventLogSource(DataSource):
    """Impressions of the drained event log, labelled by attributed downloads, split by day."""

    name = "events"

    def __init__(self, path: str | Path, window_days: int,
                 champion_encoder_spec: DatasetSpec | dict[str, Any], *,
                 item_records: ItemRecords | None = None, experiment: str | None = None,
                 arms: Sequence[str] | None = None, position_field: str | None = "slot",
                 item_id_field: str | None = None, shuffle_labels: bool = False,
                 attribution_window_s: float | None = None, min_days: int = 3,
                 seed: int = 0):
        if window_days < min_days:
            raise DataError(f"window_days must be >= {min_days} (train, valid and test days), "
                            f"got {window_days}")
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such event log directory (write one with "
                            "`ctrserve drain-events --out DIR`)")
        self.spec = _as_spec(champion_encoder_spec)
        names = self.spec.names
        self.item_id = item_id_field or next((n for n in ITEM_ID_NAMES if n in names), None)
        self.position = position_field if position_field in names else None
        self.window_days, self.experiment = window_days, experiment
        self.arms = list(arms) if arms else None
        self.shuffle_labels = shuffle_labels
        self.attribution_window_s = attribution_window_s
        rows_by_day = self._rows(item_records)
        days = sorted(rows_by_day)
        if len(days) < min_days:
            raise DataError(f"{self.root}: impressions on {len(days)} day(s) "
                            f"{[d.isoformat() for d in days]}, need at least {min_days}; "
                            "drain more days of events")
        days = days[-window_days:]
        self.days = {"train": days[:-2], "valid": [days[-2]], "test": [days[-1]]}
        rng = np.random.default_rng(seed)
        self.tables: dict[date, pa.Table] = {}
        for day in days:
            table = self._table(rows_by_day[day])
            if shuffle_labels and day != days[-1]:  # the held-out day keeps its true labels
                labels = table.column(self.spec.label).to_numpy()
                table = table.set_column(table.schema.get_field_index(self.spec.label),
                                         self.spec.label, pa.array(rng.permutation(labels)))
            self.tables[day] = table

    @property
    def last_day(self) -> date:
        return self.days["test"][0]

    def chunks(self, split: str) -> Iterator[Chunk]:
        """One chunk per day of `split`, in day order."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        for day in self.days[split]:
            yield Chunk(origin=f"{self.root}/day={day.isoformat()}", table=self.tables[day])

    def describe(self) -> dict[str, Any]:
        def stats(days: list[date]) -> dict[str, Any]:
            if not days:
                return {"days": 0, "rows": 0, "positives": 0}
            labels = np.concatenate([self.tables[d].column(self.spec.label).to_numpy()
                                     for d in days])
            return {"first_day": days[0].isoformat(), "last_day": days[-1].isoformat(),
                    "days": len(days), "rows": int(len(labels)),
                    "positives": int(labels.sum())}

        return {"source": self.name, "path": str(self.root), "experiment": self.experiment,
                "arms": self.arms, "window_days": self.window_days,
                "shuffle_labels": self.shuffle_labels,
                "attribution_window_s": self.attribution_window_s,
                "unserved_impressions": self.unserved,
                "splits": {s: stats(d) for s, d in self.days.items()}}

    # ---- building the rows ----------------------------------------------------------------
    def _filtered(self, table: pa.Table) -> pa.Table:
        if self.experiment is not None:
            table = table.filter(pc.equal(table.column("experiment"), self.experiment))
        if self.arms is not None:
            table = table.filter(pc.is_in(table.column("arm"), value_set=pa.array(self.arms)))
        return table

    def _events(self) -> list[dict[str, Any]]:
        from ctrserve.service.state import read_log

        seen, events = set(), []
        for event in self._filtered(read_log(self.root)).to_pylist():
            if event["event_id"] not in seen:
                seen.add(event["event_id"])
                events.append(event)
        return events

    def _served(self) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
        """(request id, user) -> (shared feature values, candidates' own features)."""
        from ctrserve.service.state import read_serve_log

        table = self._filtered(read_serve_log(self.root)).select(
            ["request_id", "user_id", "features", "item_features"])
        served = {}
        for r in table.to_pylist():
            key = (r["request_id"], r["user_id"])
            if key not in served:
                served[key] = (r["features"], r["item_features"])
        return served

    def _rows(self, item_records: ItemRecords | None) -> dict[date, list[dict[str, Any]]]:
        events = self._events()
        served = self._served()
        self.unserved = 0
        downloads: dict[tuple[str, str], datetime] = {}
        for e in events:
            if e["type"] == "download":
                key, moment = (e["request_id"], e["item_id"]), event_time(e["ts"])
                downloads[key] = min(moment, downloads.get(key, moment))
        shown: dict[tuple[str, str], tuple[datetime, dict[str, Any], int]] = {}
        for e in events:
            if e["type"] != "impression":
                continue
            if (e["request_id"], e["user_id"]) not in served:
                self.unserved += 1
                continue
            moment = event_time(e["ts"])
            for item, position in zip(e["items"] or [], e["positions"] or [], strict=True):
                shown.setdefault((e["request_id"], item), (moment, e, position))
        if not shown:
            what = f" of experiment {self.experiment!r}" if self.experiment else ""
            raise DataError(f"{self.root}: no impressions{what} in the event log joined to "
                            f"the serve log ({self.unserved} impression(s) without a served "
                            "request)")
        records = _records(item_records, sorted({item for _, item in shown}))
        by_day: dict[date, list[dict[str, Any]]] = defaultdict(list)
        parsed: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        # in time order, not log order: concurrent clients log in an order that varies from run
        # to run, and the seeded shuffle of training would then see different data
        ordered = sorted(shown.items(), key=lambda kv: (kv[1][0], kv[1][1]["user_id"] or "",
                                                        kv[1][2], kv[0][0]))
        for (request_id, item), (moment, e, position) in ordered:
            key = (request_id, e["user_id"])
            if key not in parsed:
                features, own_features = served[key]
                parsed[key] = (json.loads(features or "{}"), json.loads(own_features or "{}"))
            shared, own = parsed[key]
            row = dict(shared)
            row.update(records.get(item) or {})
            if self.item_id:
                row[self.item_id] = item
            row.update(own.get(item) or {})
            if self.position:  # the position shown, even if it was scored at another slot
                row[self.position] = position
            row[self.spec.label] = self._label(moment, downloads.get((request_id, item)))
            by_day[moment.date()].append(row)
        return by_day

    def _label(self, shown: datetime, downloaded: datetime | None) -> int:
        if downloaded is None:
            return 0
        window = self.attribution_window_s
        return int(window is None or (downloaded - shown).total_seconds() <= window)

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        columns = {}
        for f in self.spec.fields:
            values = [r.get(f.name) for r in rows]
            columns[f.name] = _column(values, f.kind)
        columns[self.spec.label] = pa.array([r[self.spec.label] for r in rows], pa.int8())
        return pa.table(columns)


def _as_spec(spec: DatasetSpec | dict[str, Any]) -> DatasetSpec:
    if isinstance(spec, DatasetSpec):
        return spec
    try:
        return DatasetSpec.from_dict(spec)
    except (SpecError, TypeError, KeyError) as exc:
        raise DataError(f"champion encoder spec: {exc}") from None


def _records(item_records: ItemRecords | None, ids: list[str]) -> Mapping[str, dict[str, Any]]:
    if item_records is None:
        return {}
    if callable(item_records):
        return item_records(ids)
    return item_records


def _column(values: list[Any], kind: str) -> pa.Array:
    if kind == "numeric":
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if kind == "multi":
        return pa.array([v if v is None or isinstance(v, str) else [str(x) for x in v]
                         for v in values])
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds: the encoder reads text
        return pa.array([None if v is None else str(v) for v in values], pa.string())
