"""Frappe (context-aware app usage) from the libFM files of the public Frappe_x1 parts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctrserve.features import DatasetSpec, FieldSpec
from ctrserve.training.data.source import (
    SPLITS,
    Chunk,
    DataError,
    DataSource,
    data_root,
    random_split,
)

NAME = "frappe"
DEFAULT_SUBDIR = "frappe"
TRAIN_FILE = "frappe.validation.libfm"
TEST_FILE = "frappe.test.libfm"
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 2026
FIELDS = (
    "user",
    "item",
    "daytime",
    "weekday",
    "isweekend",
    "homework",
    "cost",
    "weather",
    "country",
    "city",
)
LABELS = {"1": 1, "+1": 1, "-1": 0, "0": 0}

SPEC = DatasetSpec(fields=tuple(FieldSpec(f, "categorical") for f in FIELDS), label="label")


class FrappeSource(DataSource):
    """Frappe: train on the validation file less a random 10% (valid), test on the test file.

    The large train part of Frappe_x1 is not public, hence this protocol (see the datasets
    README). Each field's token is its global libFM index as a string.
    """

    name = NAME
    spec = SPEC

    def __init__(self, path: str | None):
        self.root = data_root(path, DEFAULT_SUBDIR)
        self.files = {"train": self.root / TRAIN_FILE, "test": self.root / TEST_FILE}
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise DataError(f"{self.root}: Frappe libFM file(s) not found: {missing}")
        self._splits: dict[str, pa.Table] | None = None

    def chunks(self, split: str) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        file = self.files["test" if split == "test" else "train"]
        yield Chunk(f"{file} ({split} split)", self.splits()[split])

    def splits(self) -> dict[str, pa.Table]:
        """The three split tables, parsed once."""
        if self._splits is None:
            train, valid = random_split(
                read_libfm(self.files["train"]), HOLDOUT_FRACTION, HOLDOUT_SEED
            )
            self._splits = {"train": train, "valid": valid, "test": read_libfm(self.files["test"])}
        return self._splits

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "path": str(self.root),
            "files": {"train": TRAIN_FILE, "valid": TRAIN_FILE, "test": TEST_FILE},
            "split": f"valid = random {HOLDOUT_FRACTION:.0%} of {TRAIN_FILE} (seed {HOLDOUT_SEED})",
            "rows": {s: t.num_rows for s, t in self.splits().items()},
        }


def read_libfm(path: Path) -> pa.Table:
    """A one-hot libFM file with one index per field of FIELDS, label -1/1 mapped to 0/1."""
    labels: list[int] = []
    columns: list[list[str]] = [[] for _ in FIELDS]
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            labels.append(_label(parts[0], path, lineno))
            for column, index in zip(columns, _indices(parts[1:], path, lineno), strict=True):
                column.append(index)
    table = {name: pa.array(col, pa.string()) for name, col in zip(FIELDS, columns, strict=True)}
    return pa.table({**table, "label": pa.array(labels, pa.int64())})


def _label(token: str, path: Path, lineno: int) -> int:
    label = LABELS.get(token)
    if label is None:
        raise DataError(f"{path}:{lineno}: label {token!r} is not -1 or 1")
    return label


def _indices(pairs: list[str], path: Path, lineno: int) -> list[str]:
    if len(pairs) != len(FIELDS):
        raise DataError(
            f"{path}:{lineno}: expected {len(FIELDS)} index:value pairs "
            f"({', '.join(FIELDS)}), got {len(pairs)}"
        )
    indices = []
    for pair in pairs:
        index, _, value = pair.partition(":")
        if not index.isdigit() or value not in ("1", "1.0"):
            raise DataError(f"{path}:{lineno}: {pair!r} is not a one-hot INDEX:1 pair")
        indices.append(index)
    return indices
