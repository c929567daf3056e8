"""The data-source contract: a dataset spec plus train/valid/test splits streamed as chunks."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctrserve.common.errors import UserError
from ctrserve.features import DatasetSpec

SPLITS = ("train", "valid", "test")
DATA_DIR_ENV = "CTR_DATA_DIR"


class DataError(UserError):
    """Data that cannot be used; the message names the file, the field and the problem."""


@dataclass(frozen=True)
class Chunk:
    """A slice of one split: raw feature columns plus the label, and where it came from."""

    origin: str
    table: pa.Table


class DataSource(ABC):
    """A dataset: its fields and label (`spec`) and its three splits as streams of chunks.

    Chunks are pyarrow tables holding every field of `spec` (categorical as string or int,
    multi-valued as list<string> or separated strings, numeric as float with nulls) and the
    label as 0/1 integers. Sources that fit in memory may yield a whole split as one chunk;
    large ones stream (for instance one chunk per day-partitioned file).
    """

    name: str
    spec: DatasetSpec

    @abstractmethod
    def chunks(self, split: str) -> Iterator[Chunk]:
        """The rows of `split` (one of SPLITS), in a deterministic order."""

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in run manifests (source, files, data window)."""
        return {"source": self.name}

    def warnings(self) -> list[str]:
        """Problems noticed in the files read so far (unnamed columns, ...), for `inspect`."""
        return []


def checked_chunks(source: DataSource, split: str) -> Iterator[Chunk]:
    """The chunks of a split, validated: columns present, label 0/1, split not empty."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    rows = 0
    for chunk in source.chunks(split):
        check_chunk(chunk, source.spec)
        rows += chunk.table.num_rows
        yield chunk
    if rows == 0:
        raise DataError(f"{source.name}: the {split} split is empty")


def check_chunk(chunk: Chunk, spec: DatasetSpec) -> None:
    names = set(chunk.table.column_names)
    missing = [n for n in [*spec.names, spec.label] if n not in names]
    if missing:
        raise DataError(f"{chunk.origin}: missing column(s) {missing}")
    label = chunk.table.column(spec.label)
    if label.null_count:
        raise DataError(
            f"{chunk.origin}: label {spec.label!r} has {label.null_count} missing values"
        )
    values = np.unique(label.to_numpy(zero_copy_only=False))
    bad = [v for v in values.tolist() if v not in (0, 1)]
    if bad:
        raise DataError(f"{chunk.origin}: label {spec.label!r} must be 0/1, found {bad[:5]}")


def data_root(path: str | None, default_subdir: str) -> Path:
    """A reader's directory: the explicit path, else $CTR_DATA_DIR/default_subdir."""
    if path:
        root = Path(path)
    elif os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV]) / default_subdir
    else:
        raise DataError(f"no path given for {default_subdir} and {DATA_DIR_ENV} is not set")
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    return root.absolute()  # run records name the data wherever they are read from


def temporal_split(table: pa.Table, time_column: str, fractions=(0.8, 0.1)) -> dict[str, pa.Table]:
    """Sort by time and cut into train/valid/test by row fractions (no future leaks)."""
    order = np.argsort(table.column(time_column).to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    n = table.num_rows
    a = int(n * fractions[0])
    b = int(n * (fractions[0] + fractions[1]))
    return {"train": table.slice(0, a), "valid": table.slice(a, b - a), "test": table.slice(b)}


def random_split(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split rows at random into (1 - fraction, fraction) parts, reproducibly."""
    rng = np.random.default_rng(seed)
    mask = rng.random(table.num_rows) < fraction
    idx = np.arange(table.num_rows)
    return table.take(pa.array(idx[~mask])), table.take(pa.array(idx[mask]))
