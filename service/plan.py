"""Where each of a model's fields comes from in a score request.

The bundle's encoder spec says which fields exist; the plan sorts them into
- item fields: per candidate, from `candidates[].features` or the item's feature-store record
  (the fields item records carry, per the store's meta record, plus the item id field);
- the position field (`slot` by default): the candidate's 1-based position unless given;
- shared fields: everything else, once per request, from `context`, `user_features`, the
  user's feature-store record, or for `hour` and `weekday` the UTC clock.
Id fields are named by settings, else found by convention (user_id/user, item_id/app_id/item).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ctrserve.features import FeatureEncoder, FieldSpec
from ctrserve.service.feature_store import ITEM_ID_NAMES, USER_ID_NAMES, pick_id_field
from ctrserve.service.settings import Settings

CLOCK_FIELDS = {"hour": 24, "weekday": 7}  # weekday: Monday = 0, as datetime.weekday()


@dataclass(frozen=True)
class Group:
    """One model input (cat_ids, multi_ids or numeric) and the fields of its columns."""

    name: str
    fields: tuple[str, ...]
    dtype: type
    tail: tuple[int, ...] = ()  # per-column shape after the field axis (multi: max_len)

    def columns(self, names: set[str] | tuple[str, ...]) -> np.ndarray:
        return np.array([j for j, f in enumerate(self.fields) if f in names], dtype=np.int64)


@dataclass(frozen=True)
class FieldPlan:
    specs: dict[str, FieldSpec]
    groups: tuple[Group, ...]
    user_id: str | None
    item_id: str | None
    position: str | None
    item: tuple[str, ...]
    shared: tuple[str, ...]
    user_record_fields: tuple[str, ...] = ()
    clock: tuple[str, ...] = field(default=())

    def describe(self) -> dict[str, list[str]]:
        """Field sources for /v1/models."""
        user = [f for f in self.shared if f in self.user_record_fields or f == self.user_id]
        context = [f for f in self.shared if f not in user]
        return {"item": list(self.item), "user": user, "context": context,
                "position": [self.position] if self.position else [],
                "clock": list(self.clock)}


def make_plan(encoder: FeatureEncoder, settings: Settings, meta: dict[str, Any]) -> FieldPlan:
    """Sort the encoder's fields by source, given the feature store's meta record."""
    names = encoder.spec.names
    user_id = pick_id_field(names, USER_ID_NAMES, settings.user_id_field)
    item_id = pick_id_field(names, ITEM_ID_NAMES, settings.item_id_field)
    position = settings.position_field if settings.position_field in names else None
    store_item = set(meta.get("items", {}).get("fields", []))
    item = tuple(f for f in names if (f in store_item or f == item_id) and f != position)
    shared = tuple(f for f in names if f not in item and f != position)
    clock = tuple(f for f in shared if settings.fill_clock and _clock_ok(encoder, f))
    return FieldPlan(
        specs={f.name: f for f in encoder.spec.fields},
        groups=groups_of(encoder),
        user_id=user_id, item_id=item_id, position=position, item=item, shared=shared,
        user_record_fields=tuple(meta.get("users", {}).get("fields", [])), clock=clock)


def groups_of(encoder: FeatureEncoder) -> tuple[Group, ...]:
    groups = [Group("cat_ids", tuple(f.name for f in encoder.categorical), np.int64),
              Group("multi_ids", tuple(f.name for f in encoder.multi), np.int64,
                    (encoder.multi_len,)),
              Group("numeric", tuple(f.name for f in encoder.numeric), np.float32)]
    return tuple(g for g in groups if g.fields)


def _clock_ok(encoder: FeatureEncoder, name: str) -> bool:
    """Fill from the clock only where the trained vocabulary holds the clock's tokens."""
    if name not in CLOCK_FIELDS:
        return False
    state = encoder.states[name]
    if state.spec.kind != "categorical" or state.vocab is None:
        return False
    tokens = {str(i) for i in range(CLOCK_FIELDS[name])}
    return len(state.vocab) > 0 and set(state.vocab.tolist()) <= tokens


def clock_values(fields: tuple[str, ...]) -> dict[str, int]:
    now = datetime.now(UTC)
    values = {"hour": now.hour, "weekday": now.weekday()}
    return {f: values[f] for f in fields}


def kind_error(spec: FieldSpec, value: Any) -> str | None:
    """Why a request value cannot feed this field, or None (the encoder's own rules)."""
    if value is None:
        return None
    if spec.kind == "categorical" and isinstance(value, list):
        return "expected a single token, got a list"
    if spec.kind == "multi" and not isinstance(value, list | str):
        return "expected a list of tokens (or a separated string)"
    if spec.kind == "numeric" and (isinstance(value, str | list)):
        return "expected a number"
    return None
