"""Normalise raw columns (lists, numpy arrays, pyarrow arrays) into the encoder's numpy forms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctrserve.common.errors import UserError


class FeatureError(UserError):
    """Raw input that cannot be encoded; the message names the field."""


@dataclass(frozen=True)
class Ragged:
    """A multi-valued column: row i holds values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _to_numpy(column: Any) -> np.ndarray:
    if hasattr(column, "to_numpy") and not isinstance(column, np.ndarray):
        return column.to_numpy(zero_copy_only=False)  # pyarrow Array / ChunkedArray
    return np.asarray(column, dtype=object) if isinstance(column, list) else np.asarray(column)


def tokens(column: Any, name: str) -> np.ndarray:
    """A categorical column as an array of str; None and NaN become the empty token."""
    arr = _to_numpy(column)
    if arr.ndim != 1:
        raise FeatureError(f"field {name!r}: expected one value per row, got shape {arr.shape}")
    if arr.dtype.kind in "US":
        return arr.astype(str)
    if arr.dtype.kind in "iub":
        return arr.astype(str)
    out = arr.astype(object)
    missing = np.array([v is None or (isinstance(v, float) and v != v) for v in out], dtype=bool)
    if missing.any():
        out = out.copy()
        out[missing] = ""
    bad = [v for v in out if isinstance(v, list | tuple | dict)]
    if bad:
        raise FeatureError(f"field {name!r}: expected a single token per row, got {bad[0]!r}")
    return out.astype(str)


def numbers(column: Any, name: str) -> np.ndarray:
    """A numeric column as float64, missing values as NaN."""
    arr = _to_numpy(column)
    if arr.dtype.kind == "O":
        arr = np.array([np.nan if v is None else v for v in arr], dtype=object)
    try:
        out = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"field {name!r}: expected numbers ({exc})") from None
    if out.ndim != 1:
        raise FeatureError(f"field {name!r}: expected one number per row, got shape {out.shape}")
    return out


def ragged(column: Any, name: str, separator: str | None) -> Ragged:
    """A multi-valued column from a Ragged, a pyarrow list array, lists, or separated strings."""
    if isinstance(column, Ragged):
        return column
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    if hasattr(column, "offsets") and hasattr(column, "flatten"):
        offsets = np.asarray(column.offsets, dtype=np.int64)
        values = tokens(column.values, name)[offsets[0] : offsets[-1]]
        return Ragged(values, offsets - offsets[0])
    if hasattr(column, "to_pylist"):  # pyarrow array of separated strings
        column = column.to_pylist()
    rows: Sequence[Any] = list(column) if not isinstance(column, list) else column
    lists = [_split(row, name, separator) for row in rows]
    lengths = np.fromiter((len(r) for r in lists), dtype=np.int64, count=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = [tok for r in lists for tok in r]
    values = np.asarray(flat, dtype=object).astype(str) if flat else np.zeros(0, dtype=str)
    return Ragged(values, offsets)


def _split(row: Any, name: str, separator: str | None) -> list[str]:
    if row is None:
        return []
    if isinstance(row, str):
        return [t for t in row.split(separator)] if row else []
    if isinstance(row, list | tuple | np.ndarray):
        return [str(t) for t in row]
    raise FeatureError(f"field {name!r}: expected a list of tokens per row, got {row!r}")
