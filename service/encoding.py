"""Score requests to model inputs, through the bundle's own encoder, with caches.

Every number comes from `FeatureEncoder.transform`, so the scorer cannot disagree with
training; the caches only avoid encoding the same thing twice:
- shared (user + context) fields: one encoded row per distinct set of values;
- item fields: encoded rows per item id (item_rows.py, bounded staleness);
- the position field: positions 1..max_candidates, encoded once.
A candidate that brings its own features is encoded whole, on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctrserve.features import FeatureEncoder
from ctrserve.features.columns import FeatureError
from ctrserve.service.errors import InvalidInput
from ctrserve.service.item_rows import ItemRows
from ctrserve.service.plan import FieldPlan
from ctrserve.service.settings import Settings

Feeds = dict[str, np.ndarray]


class RequestEncoder:
    def __init__(self, encoder: FeatureEncoder, plan: FieldPlan, settings: Settings):
        self.encoder, self.plan = encoder, plan
        self._shared_cols = {g.name: g.columns(plan.shared) for g in plan.groups}
        self._item_cols = {g.name: g.columns(plan.item) for g in plan.groups}
        pos = (plan.position,) if plan.position else ()
        pos_cols = {g.name: g.columns(pos) for g in plan.groups}
        # assemble's writes, by group: (columns, part) with the columns a slice where they
        # are contiguous (a third cheaper to write than a list of them)
        self._writes = {g.name: [(_span(cols[g.name]), part) for cols, part in (
            (self._shared_cols, "shared"), (self._item_cols, "items"), (pos_cols, "positions"))
            if len(cols[g.name])] for g in plan.groups}
        self._shared_cache: dict[tuple, Feeds] = {}
        self._shared_max = settings.shared_cache_max_rows
        self.positions = self.encode_part(
            [{plan.position: i} for i in range(1, settings.max_candidates + 1)], pos
        ) if pos else None
        shapes = {g.name: ((len(self._item_cols[g.name]), *g.tail), g.dtype)
                  for g in plan.groups if len(self._item_cols[g.name])}
        self.items = ItemRows(self.encode_items, shapes, settings.item_cache_ttl_s,
                              max(settings.item_cache_max_items, settings.max_candidates))

    # ---- parts -----------------------------------------------------------------------------
    def encode_part(self, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> Feeds:
        """Encode `fields` of these rows (every other field as missing); their columns only."""
        n = len(rows)
        columns = {f: [r.get(f) for r in rows] if f in fields else [None] * n
                   for f in self.plan.specs}
        encoded = self.encoder.transform(columns)
        out = {}
        for g in self.plan.groups:
            cols = g.columns(tuple(fields))
            if len(cols):
                out[g.name] = encoded[g.name][:, cols]
        return out

    def encode_items(self, ids: Sequence[str],
                     records: Sequence[dict[str, Any] | None]) -> Feeds:
        rows = [_item_row(self.plan.item_id, i, r) for i, r in zip(ids, records, strict=True)]
        try:
            return self.encode_part(rows, self.plan.item)
        except FeatureError as exc:
            raise InvalidInput(["feature_store", "items"], f"item record: {exc}") from None

    def shared(self, values: dict[str, Any]) -> Feeds:
        """The encoded shared row for these values, from the cache when seen before."""
        key = tuple(_frozen(values.get(f)) for f in self.plan.shared)
        hit = self._shared_cache.get(key)
        if hit is not None:
            return hit
        try:
            part = self.encode_part([values], self.plan.shared)
        except FeatureError as exc:
            where = next((f for f in self.plan.shared if f"'{f}'" in str(exc)), "user_features")
            raise InvalidInput(["body", where], str(exc)) from None
        if len(self._shared_cache) >= self._shared_max:
            self._shared_cache.clear()
        self._shared_cache[key] = part
        return part

    # ---- whole batches ---------------------------------------------------------------------
    def assemble(self, n: int, shared: Feeds, items: Feeds) -> Feeds:
        """Model inputs for n candidates: shared row broadcast, item rows, positions 1..n."""
        feeds, parts = {}, {"shared": shared, "items": items, "positions": self.positions}
        for g in self.plan.groups:
            out = np.empty((n, len(g.fields), *g.tail), dtype=g.dtype)
            for cols, part in self._writes[g.name]:
                values = parts[part][g.name]
                out[:, cols] = values[0] if values.shape[0] == 1 else values[:n]
            feeds[g.name] = out
        return feeds

    def full_rows(self, rows: Sequence[dict[str, Any]]) -> Feeds:
        """Encode complete rows (every field given or missing) for custom candidates."""
        columns = {f: [r.get(f) for r in rows] for f in self.plan.specs}
        return self.encoder.transform(columns)


def overwrite(feeds: Feeds, rows: np.ndarray, custom: Feeds) -> None:
    for name, values in custom.items():
        feeds[name][rows] = values


def _item_row(id_field: str | None, item_id: str,
              record: dict[str, Any] | None) -> dict[str, Any]:
    row = dict(record) if record else {}
    if id_field:
        row[id_field] = item_id
    return row


def _span(cols: np.ndarray) -> slice | np.ndarray:
    """Column indices as a slice when they are contiguous and ascending."""
    if len(cols) and np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
        return slice(int(cols[0]), int(cols[0]) + len(cols))
    return cols


def _frozen(value: Any) -> Any:
    # the type is part of the key: 1, 1.0 and True are equal in Python but encode differently
    return (list, tuple(value)) if isinstance(value, list) else (value.__class__, value)
