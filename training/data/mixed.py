"""A retrain's data mixed with a base dataset: the base rows ahead of the logged training days.

Validation and test come from the event log alone (the days the challenger is judged on);
training reads the base dataset's rows (all its splits, in order, or only the most recent
`max_rows`) and then the log's training days. The base must hold every field of the log's spec;
its own label column is renamed to the log's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from ctrserve.training.data.events import EventLogSource
from ctrserve.training.data.source import SPLITS, Chunk, DataError, DataSource


class MixedSource(DataSource):
    name = "mixed"

    def __init__(self, events: EventLogSource, base: DataSource, max_rows: int | None = None):
        if max_rows is not None and max_rows < 1:
            raise DataError(f"base rows must be >= 1, got {max_rows}")
        missing = [n for n in events.spec.names if n not in base.spec.names]
        if missing:
            raise DataError(f"base data {base.name}: lacks the fields {missing} that the "
                            "champion was served with")
        self.events, self.base, self.spec = events, base, events.spec
        # a tail is held in memory; the whole base streams on every pass
        self._tail = _tail(self._base_chunks(), max_rows) if max_rows else None

    @property
    def last_day(self) -> Any:
        return self.events.last_day

    def chunks(self, split: str) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split == "train":
            yield from self._tail if self._tail is not None else self._base_chunks()
        yield from self.events.chunks(split)

    def describe(self) -> dict[str, Any]:
        described = self.events.describe()
        chunks = self._tail if self._tail is not None else self._base_chunks()
        base_rows = sum(c.table.num_rows for c in chunks)
        described["base"] = {**self.base.describe(), "rows": base_rows}
        train = described["splits"]["train"]
        train["event_rows"], train["rows"] = train["rows"], train["rows"] + base_rows
        return described

    def _base_chunks(self) -> Iterator[Chunk]:
        names, label = self.spec.names, self.spec.label
        for split in SPLITS:
            for chunk in self.base.chunks(split):
                columns = [chunk.table.column(n) for n in names]
                columns.append(chunk.table.column(self.base.spec.label))
                yield Chunk(chunk.origin, pa.table(columns, names=[*names, label]))


def _tail(chunks: Iterator[Chunk], max_rows: int | None) -> list[Chunk]:
    """All chunks, or the last `max_rows` rows of them (the most recent, in order)."""
    kept = list(chunks)
    if max_rows is None:
        return kept
    out, rows = [], 0
    for chunk in reversed(kept):
        need = max_rows - rows
        if need <= 0:
            break
        table = chunk.table.slice(max(chunk.table.num_rows - need, 0))
        out.append(Chunk(chunk.origin, table))
        rows += table.num_rows
    return out[::-1]
