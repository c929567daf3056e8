"""Reader for the synthetic app-store logs written by `loadtest.synth_logs` (`synth:DIR`).

Days split in time order: the last `test_days` are test, the `valid_days` before them are
valid, everything earlier is train. One chunk per day file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrserve.features import DatasetSpec, SpecError
from ctrserve.training.data.source import SPLITS, Chunk, DataError, DataSource, data_root

WORLD_FILE = "world.json"
IMPRESSIONS_DIR = "impressions"
DAY_PREFIX = "day="
MAKE_HINT = "write one with `python -m ctrserve.loadtest.synth_logs DIR`"


class SyntheticSource(DataSource):
    """Day-partitioned impression logs of the synthetic world, split by day."""

    name = "synth"

    def __init__(self, path: str, valid_days: int = 1, test_days: int = 1):
        if valid_days < 1 or test_days < 1:
            raise DataError(f"valid_days and test_days must be >= 1, got {valid_days}, {test_days}")
        self.root = data_root(path or None, "synth")
        self.meta = _read_meta(self.root / WORLD_FILE)
        self.spec = _spec(self.meta, self.root / WORLD_FILE)
        days = _day_files(self.root / IMPRESSIONS_DIR)
        needed = valid_days + test_days + 1
        if len(days) < needed:
            raise DataError(
                f"{self.root / IMPRESSIONS_DIR}: {len(days)} day file(s), need at least {needed} "
                f"(train, {valid_days} valid, {test_days} test day(s)); {MAKE_HINT}"
            )
        cut_valid, cut_test = len(days) - valid_days - test_days, len(days) - test_days
        self.days: dict[str, list[tuple[dt.date, Path]]] = {
            "train": days[:cut_valid],
            "valid": days[cut_valid:cut_test],
            "test": days[cut_test:],
        }

    def chunks(self, split: str) -> Iterator[Chunk]:
        """One chunk per day file of `split`, in day order: the spec's fields and the label."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        columns = [*self.spec.names, self.spec.label]
        for _, path in self.days[split]:
            yield Chunk(origin=str(path), table=_read_day(path, columns))

    def true_probabilities(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Labels and the hidden true download probabilities of a split: the oracle."""
        tables = [_read_day(path, [self.spec.label, "true_probability"])
                  for _, path in self.days[split]]
        table = pa.concat_tables(tables)
        return (table.column(self.spec.label).to_numpy(),
                table.column("true_probability").to_numpy())

    def describe(self) -> dict[str, Any]:
        """Source, directory, world seed and, per split, its first and last day and files."""
        splits = {
            split: {
                "first_day": days[0][0].isoformat(),
                "last_day": days[-1][0].isoformat(),
                "days": len(days),
                "files": [path.name for _, path in days],
            }
            for split, days in self.days.items()
        }
        config = self.meta.get("config", {})
        return {"source": self.name, "path": str(self.root), "seed": config.get("seed"),
                "splits": splits}  # fmt: skip


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing; not a synthetic log directory ({MAKE_HINT})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _spec(meta: dict[str, Any], path: Path) -> DatasetSpec:
    if "spec" not in meta:
        raise DataError(f"{path}: no 'spec' entry (the dataset's fields)")
    try:
        return DatasetSpec.from_dict(meta["spec"])
    except (SpecError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: invalid 'spec': {exc}") from None


def _day_files(folder: Path) -> list[tuple[dt.date, Path]]:
    """(day, path) of every `day=YYYY-MM-DD.parquet` in `folder`, sorted by day."""
    if not folder.is_dir():
        raise DataError(f"{folder}: missing; no impression day files ({MAKE_HINT})")
    days = []
    for path in folder.glob(f"{DAY_PREFIX}*.parquet"):
        stem = path.name[len(DAY_PREFIX) : -len(".parquet")]
        try:
            days.append((dt.date.fromisoformat(stem), path))
        except ValueError:
            raise DataError(f"{path}: expected a name like day=2026-11-01.parquet") from None
    return sorted(days)


def _read_day(path: Path, columns: list[str]) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read as parquet ({exc})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read as parquet ({exc})") from None
