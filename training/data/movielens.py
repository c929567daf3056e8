"""MovieLens-100K in RecBole atomic format: ratings joined with user and movie attributes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctrserve.features import DatasetSpec, FieldSpec
from ctrserve.training.data.source import (
    SPLITS,
    Chunk,
    DataError,
    DataSource,
    data_root,
    temporal_split,
)

NAME = "movielens-100k"
DEFAULT_SUBDIR = "movielens-100k"
PREFIX = "ml-100k"
POSITIVE_RATING = 4.0
FRACTIONS = (0.8, 0.1)
# MovieLens-1M's age groups: seven buckets instead of 61 distinct ages.
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
AGE_BUCKETS = np.array(["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"])
# About 110 regions for 943 users; the whole zip code would nearly repeat user_id.
ZIP_PREFIX = 2

SPEC = DatasetSpec(
    fields=(
        FieldSpec("user_id", "categorical"),
        FieldSpec("item_id", "categorical"),
        FieldSpec("age", "categorical"),
        FieldSpec("gender", "categorical"),
        FieldSpec("occupation", "categorical"),
        FieldSpec("zip_code", "categorical"),
        FieldSpec("release_year", "categorical"),
        FieldSpec("genres", "multi", max_len=6),
        FieldSpec("hour", "categorical"),
        FieldSpec("weekday", "categorical"),
    ),
    label="label",
)

# Columns read from each atomic file (names without RecBole's ":type" suffix) and their types.
INTER_COLUMNS = {
    "user_id": pa.string(),
    "item_id": pa.string(),
    "rating": pa.float64(),
    "timestamp": pa.float64(),
}
USER_COLUMNS = {
    "user_id": pa.string(),
    "age": pa.float64(),
    "gender": pa.string(),
    "occupation": pa.string(),
    "zip_code": pa.string(),
}
ITEM_COLUMNS = {"item_id": pa.string(), "release_year": pa.string(), "class": pa.string()}


class MovieLensSource(DataSource):
    """MovieLens-100K, label = rating >= 4, split 80/10/10 by timestamp (no future leaks)."""

    name = NAME
    spec = SPEC

    def __init__(self, path: str | None):
        self.root = data_root(path, DEFAULT_SUBDIR)
        self.files = {kind: self.root / f"{PREFIX}.{kind}" for kind in ("inter", "user", "item")}
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise DataError(f"{self.root}: MovieLens atomic file(s) not found: {missing}")
        self._splits: dict[str, pa.Table] | None = None

    def chunks(self, split: str) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        yield Chunk(f"{self.files['inter']} ({split} split)", self.splits()[split])

    def splits(self) -> dict[str, pa.Table]:
        """The three split tables, loaded and joined once."""
        if self._splits is None:
            self._splits = temporal_split(self._load(), "timestamp", FRACTIONS)
        return self._splits

    def describe(self) -> dict[str, Any]:
        splits = self.splits()
        return {
            "source": self.name,
            "path": str(self.root),
            "split": "temporal by timestamp, 80/10/10",
            "rows": {s: t.num_rows for s, t in splits.items()},
            "window": {s: _window(t.column("timestamp")) for s, t in splits.items()},
        }

    def _load(self) -> pa.Table:
        inter = read_atomic(self.files["inter"], INTER_COLUMNS)
        for name in ("user_id", "item_id", "rating", "timestamp"):
            if inter.column(name).null_count:
                raise DataError(f"{self.files['inter']}: {name} is missing in some rows")
        users = _lookup(
            inter.column("user_id"),
            read_atomic(self.files["user"], USER_COLUMNS),
            "user_id",
            self.files["user"],
        )
        items = _lookup(
            inter.column("item_id"),
            read_atomic(self.files["item"], ITEM_COLUMNS),
            "item_id",
            self.files["item"],
        )
        ts = inter.column("timestamp").to_numpy().astype(np.int64)
        rating = inter.column("rating").to_numpy()
        return pa.table(
            {
                "user_id": inter.column("user_id"),
                "item_id": inter.column("item_id"),
                "age": _age_buckets(users.column("age")),
                "gender": users.column("gender"),
                "occupation": users.column("occupation"),
                "zip_code": pc.utf8_upper(
                    pc.utf8_slice_codeunits(users.column("zip_code"), 0, ZIP_PREFIX)
                ),
                "release_year": items.column("release_year"),
                "genres": _genres(items.column("class")),
                "hour": pa.array((ts // 3600) % 24),
                # 1970-01-01 was a Thursday; 0 is Monday as in datetime.weekday().
                "weekday": pa.array((ts // 86400 + 3) % 7),
                "label": pa.array((rating >= POSITIVE_RATING).astype(np.int64)),
                "timestamp": pa.array(ts),
            }
        )


def read_atomic(path: Path, columns: dict[str, pa.DataType]) -> pa.Table:
    """A RecBole atomic file (tab-separated, header `name:type`), only `columns`, typed."""
    with path.open(encoding="utf-8") as f:
        header = [h.split(":", 1)[0] for h in f.readline().rstrip("\r\n").split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (header has {header})")
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            # Titles hold quotes and apostrophes that are not CSV quoting.
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types=columns, include_columns=list(columns)
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: {exc}") from None


def _lookup(keys: pa.ChunkedArray, table: pa.Table, key: str, path: Path) -> pa.Table:
    """Rows of `table` matching `keys` one for one, in the order of `keys` (unlike a join)."""
    idx = pc.index_in(keys, value_set=table.column(key))
    if idx.null_count:
        unknown = pc.filter(keys, pc.is_null(idx))[0].as_py()
        raise DataError(
            f"{path}: {idx.null_count} ratings name a {key} not in this file, "
            f"for instance {unknown!r}"
        )
    return table.take(idx)


def _age_buckets(age: pa.ChunkedArray) -> pa.Array:
    years = age.to_numpy(zero_copy_only=False).astype(np.float64)
    buckets = AGE_BUCKETS[np.searchsorted(AGE_EDGES, np.nan_to_num(years), side="right")]
    return pa.array(np.where(np.isnan(years), "", buckets))


def _genres(classes: pa.ChunkedArray) -> pa.ChunkedArray:
    """Space-separated genres as list<string>; an empty class becomes an empty (null) list."""
    trimmed = pc.utf8_trim_whitespace(classes)
    blank = pc.equal(trimmed, "")
    return pc.utf8_split_whitespace(pc.if_else(blank, pa.scalar(None, pa.string()), trimmed))


def _window(ts: pa.ChunkedArray) -> dict[str, str | None]:
    if len(ts) == 0:
        return {"start": None, "end": None}
    lo, hi = pc.min_max(ts).values()
    return {"start": _iso(lo.as_py()), "end": _iso(hi.as_py())}


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")
