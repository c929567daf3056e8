"""Criteo Display Advertising Challenge format: label, I1-I13 numeric, C1-C26 categorical.

Files are streamed one block (about 16 MB) at a time, so a file larger than memory works.
Either a directory with train.csv, dev.csv (or valid.csv) and test.csv, tab-separated without
header, or one file (tab or comma separated, with or without header) cut 80/10/10 in file
order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctrserve.features import DatasetSpec, FieldSpec
from ctrserve.training.data.source import SPLITS, Chunk, DataError, DataSource, data_root

NAME = "criteo"
DEFAULT_SUBDIR = "criteo-sample/first-8k"
NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label", *NUMERIC, *CATEGORICAL)
SPLIT_FILES = {"train": ("train.csv",), "valid": ("dev.csv", "valid.csv"), "test": ("test.csv",)}
FRACTIONS = (0.8, 0.1)
BLOCK_SIZE = 16 << 20
# Lines are read whole and split by us: a unit separator never occurs in Criteo text.
LINE_DELIMITER = "\x1f"

SPEC = DatasetSpec(
    fields=(
        *(FieldSpec(name, "numeric", transform="log_standard") for name in NUMERIC),
        # min_count 2 drops the long tail of hashed values seen once (most of the vocabulary).
        *(FieldSpec(name, "categorical", min_count=2) for name in CATEGORICAL),
    ),
    label="label",
)


@dataclass(frozen=True)
class Layout:
    """How one file is laid out: delimiter, header, and where each Criteo column sits."""

    delimiter: str
    header: bool
    width: int
    positions: dict[str, int]


class CriteoSource(DataSource):
    """Criteo-format click logs: a train/dev/test directory or one file cut 80/10/10."""

    name = NAME
    spec = SPEC

    def __init__(self, path: str | None):
        self.root = data_root(path, DEFAULT_SUBDIR)
        if self.root.is_dir():
            self.files = {split: _split_file(self.root, split) for split in SPLITS}
        else:
            self.files = {split: self.root for split in SPLITS}
        self.layouts = {p: sniff(p) for p in set(self.files.values())}
        self._rows: dict[Path, int] = {}

    @property
    def single_file(self) -> bool:
        return not self.root.is_dir()

    def chunks(self, split: str) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        path = self.files[split]
        layout = self.layouts[path]
        # A directory's split is its whole file; only a single file needs its row count first.
        start, stop = self._range(split) if self.single_file else (0, None)
        offset = 0
        for lines in read_lines(path, layout):
            end = offset + len(lines)
            lo, hi = max(start, offset), end if stop is None else min(stop, end)
            if lo < hi:
                where = f"{path} ({split} split, rows {lo + 1}-{hi})"
                yield Chunk(where, parse_block(lines.slice(lo - offset, hi - lo), layout, where))
            offset = end
            if stop is not None and offset >= stop:
                break

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.name, "path": str(self.root)}
        if self.single_file:
            out["split"] = "80/10/10 in file order"
        else:
            out["files"] = {split: p.name for split, p in self.files.items()}
        ranges = {split: self._range(split) for split in SPLITS}
        out["rows"] = {split: stop - start for split, (start, stop) in ranges.items()}
        return out

    def _range(self, split: str) -> tuple[int, int]:
        """Rows [start, stop) of the split's file that belong to the split."""
        total = self._count(self.files[split])
        if not self.single_file:
            return 0, total
        a, b = int(total * FRACTIONS[0]), int(total * (FRACTIONS[0] + FRACTIONS[1]))
        return {"train": (0, a), "valid": (a, b), "test": (b, total)}[split]

    def _count(self, path: Path) -> int:
        if path not in self._rows:
            self._rows[path] = sum(len(lines) for lines in read_lines(path, self.layouts[path]))
        return self._rows[path]


def _split_file(root: Path, split: str) -> Path:
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {' or '.join(SPLIT_FILES[split])} for the {split} split")


def sniff(path: Path) -> Layout:
    """Delimiter (tab if the first line has one, else comma) and header (first cell not 0/1)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().rstrip("\r\n")
    if not first:
        raise DataError(f"{path}: the file is empty or starts with a blank line")
    delimiter = "\t" if "\t" in first else ","
    cells = [c.strip() for c in first.split(delimiter)]
    if cells[0] in ("0", "1"):
        return Layout(delimiter, False, len(COLUMNS), {c: i for i, c in enumerate(COLUMNS)})
    found = {c.lower(): i for i, c in enumerate(cells)}
    missing = [c for c in COLUMNS if c.lower() not in found]
    if missing:
        raise DataError(f"{path}: the header lacks Criteo column(s) {missing}")
    return Layout(delimiter, True, len(cells), {c: found[c.lower()] for c in COLUMNS})


def read_lines(path: Path, layout: Layout) -> Iterator[pa.Array]:
    """The file's data lines, one string array per block (blank lines skipped)."""
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=["line"], skip_rows=int(layout.header), block_size=BLOCK_SIZE
            ),
            parse_options=pacsv.ParseOptions(delimiter=LINE_DELIMITER, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}),
        )
        for batch in reader:
            yield batch.column(0)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: {exc}") from None


def parse_block(lines: pa.Array, layout: Layout, where: str) -> pa.Table:
    """Split lines into the typed Criteo columns: label int64, I* float64, C* string."""
    n, width, delim = len(lines), layout.width, layout.delimiter
    # Some published samples strip trailing empty fields. Appending width - 1 delimiters to
    # every line and splitting at most width - 1 times gives exactly `width` cells per line;
    # the surplus delimiters all land in the last cell and are trimmed off.
    padded = pc.binary_join_element_wise(lines, delim * (width - 1), "")
    cells = pc.list_flatten(pc.split_pattern(padded, delim, max_splits=width - 1))
    last = pc.utf8_rtrim(cells.take(np.arange(width - 1, n * width, width)), characters=delim)
    too_long = np.flatnonzero(pc.match_substring(last, delim).to_numpy(zero_copy_only=False))
    if len(too_long):
        raise DataError(
            f"{where}: row {int(too_long[0]) + 1} of this block has more than {width} fields"
        )

    def column(name: str) -> pa.Array:
        pos = layout.positions[name]
        return last if pos == width - 1 else cells.take(np.arange(pos, n * width, width))

    return pa.table(
        {
            "label": _cast(column("label"), pa.int64(), where, "label"),
            **{c: _cast(_blank_to_null(column(c)), pa.float64(), where, c) for c in NUMERIC},
            **{c: column(c) for c in CATEGORICAL},
        }
    )


def _blank_to_null(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def _cast(values: pa.Array, to: pa.DataType, where: str, name: str) -> pa.Array:
    try:
        return pc.cast(values, to)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{where}: column {name!r}: {exc}") from None
