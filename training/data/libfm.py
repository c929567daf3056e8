"""libFM and libSVM files: `label index:value ...` or field-aware `label field:index:value ...`.

How rows become fields (decided over all the files of a dataset together):
- field-aware pairs (`field:index:value`, libFFM style): one field per field id, `f<id>`;
- plain pairs where every row has the same number of pairs and the indices of each position
  lie in their own increasing range (one-hot libFM, as Frappe's files): one field per position,
  `f1`, `f2`, ...;
- other plain pairs (sparse libSVM): one multi-valued field `features`.
A field holding a single index whose values are not all 0/1 is numeric (its value; a row
without the pair holds 0, as in any sparse format); any other field is categorical (at most
one pair per row) or multi (several), its tokens the feature indices. A pair whose value is 0
is absent; other values of token fields are not used (the encoder has no feature weights) and
are counted in `LibfmData.weighted`. Labels: 1 or +1 is a click; 0 or -1 is none.
Parsing is vectorised with pyarrow: Frappe's 86k lines take well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrserve.training.data.source import DataError

SUFFIXES = (".libfm", ".libsvm", ".svm", ".ffm")
SPARSE_FIELD = "features"


@dataclass
class ParsedFile:
    """One file's rows: labels per row; per pair its row, field key, feature index, value."""

    path: Path
    lines: np.ndarray  # line number of each row
    labels: np.ndarray
    row: np.ndarray
    key: np.ndarray  # field id (field-aware), else 0 until keyed by position
    index: np.ndarray
    value: np.ndarray
    aware: bool | None  # None: no pairs at all

    @property
    def rows(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class LibfmField:
    name: str
    key: int  # field id (field-aware), 1-based position (one-hot plain) or 0 (sparse)
    kind: str
    max_len: int = 1


@dataclass
class LibfmData:
    """The fields found in a set of libFM files and each file as a table."""

    fields: list[LibfmField]
    tables: dict[Path, pa.Table]
    weighted: int = 0  # token-field pairs whose value was neither 0 nor 1


def read_libfm_files(paths: Sequence[Path], label: str = "label") -> LibfmData:
    """Parse every file, decide the fields over all of them, and build one table per file."""
    parsed = [parse_file(p) for p in dict.fromkeys(paths)]
    forms = {p.aware for p in parsed if p.aware is not None}
    if len(forms) > 1:
        raise DataError(f"{', '.join(str(p.path) for p in parsed)}: some files hold "
                        "field-aware pairs (field:index:value), others plain index:value pairs")
    aware = forms.pop() if forms else False
    if not aware:
        _key_by_position(parsed)
    fields, weighted = _fields(parsed, aware)
    tables = {p.path: _table(p, fields, label) for p in parsed}
    return LibfmData(fields, tables, weighted)


def parse_file(path: Path) -> ParsedFile:
    """Labels and pairs of each non-blank, non-comment line; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file ({exc})") from None
    tokens = pc.utf8_split_whitespace(pa.array(text, pa.string()))
    first = pc.list_element(pc.if_else(pc.greater(pc.list_value_length(tokens), 0), tokens,
                                       pa.scalar([""], pa.list_(pa.string()))), 0)
    keep = pc.and_(pc.not_equal(first, ""), pc.invert(pc.starts_with(first, "#")))
    lines = np.flatnonzero(keep.to_numpy(zero_copy_only=False)) + 1
    if not len(lines):
        raise DataError(f"{path}: holds no rows")
    tokens = tokens.filter(keep)
    labels = _labels(pc.list_element(tokens, 0), path, lines)
    pairs = pc.list_slice(tokens, 1)
    row = pc.list_parent_indices(pairs).to_numpy()
    flat = pc.list_flatten(pairs)
    pieces = pc.split_pattern(flat, ":")
    widths = np.unique(pc.list_value_length(pieces).to_numpy())
    if len(widths) > 1 or (len(widths) and widths[0] not in (2, 3)):
        _bad_pair(path, lines, row, flat, pieces)
    aware = bool(widths[0] == 3) if len(widths) else None
    ints = [_ints(pc.list_element(pieces, i), path, lines, row, flat)
            for i in range(2 if aware else 1)]
    value = _floats(pc.list_element(pieces, 2 if aware else 1), path, lines, row, flat)
    key = ints[0] if aware else np.zeros(len(row), dtype=np.int64)
    return ParsedFile(path, lines, labels, row, key, ints[-1], value, aware)


def _labels(tokens: pa.Array, path: Path, lines: np.ndarray) -> np.ndarray:
    try:
        values = pc.cast(tokens, pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~np.isin(values, (1.0, 0.0, -1.0))
    except pa.ArrowInvalid:
        bad = np.array([_not_float(t) for t in tokens.to_pylist()])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}:{lines[i]}: label {tokens[i].as_py()!r} is not 1/+1 (click) "
                        "or 0/-1 (none)")
    return (values == 1.0).astype(np.int64)


def _not_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


def _bad_pair(path: Path, lines: np.ndarray, row: np.ndarray, flat: pa.Array,
              pieces: pa.Array) -> None:
    widths = pc.list_value_length(pieces).to_numpy()
    first = widths[0]
    i = int(np.flatnonzero((widths != first) | ~np.isin(widths, (2, 3)))[0])
    problem = ("mixes plain and field-aware pairs" if widths[i] in (2, 3)
               else "is not INDEX:VALUE or FIELD:INDEX:VALUE")
    raise DataError(f"{path}:{lines[row[i]]}: {flat[i].as_py()!r} {problem}")


def _ints(text: pa.Array, path: Path, lines: np.ndarray, row: np.ndarray,
          flat: pa.Array) -> np.ndarray:
    digits = pc.utf8_is_digit(text).to_numpy(zero_copy_only=False)
    if not digits.all():
        i = int(np.flatnonzero(~digits)[0])
        raise DataError(f"{path}:{lines[row[i]]}: {flat[i].as_py()!r}: field and index must "
                        "be non-negative integers")
    return pc.cast(text, pa.int64()).to_numpy(zero_copy_only=False)


def _floats(text: pa.Array, path: Path, lines: np.ndarray, row: np.ndarray,
            flat: pa.Array) -> np.ndarray:
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        i = next(i for i, t in enumerate(text.to_pylist()) if _not_float(t))
        raise DataError(f"{path}:{lines[row[i]]}: {flat[i].as_py()!r}: the value is not a "
                        "number") from None


def _key_by_position(parsed: list[ParsedFile]) -> None:
    """Plain pairs: key each pair by its position when the rows are one-hot in field order."""
    lengths = [np.bincount(p.row, minlength=p.rows) for p in parsed]
    widths = np.unique(np.concatenate(lengths))
    if len(widths) != 1 or widths[0] == 0:
        return
    width = int(widths[0])
    positions = [np.tile(np.arange(width), p.rows) for p in parsed]
    index = np.concatenate([p.index for p in parsed])
    position = np.concatenate(positions)
    lo = np.full(width, np.iinfo(np.int64).max)
    hi = np.full(width, -1)
    np.minimum.at(lo, position, index)
    np.maximum.at(hi, position, index)
    if (hi[:-1] >= lo[1:]).any():
        return
    for p, pos in zip(parsed, positions, strict=True):
        p.key = pos + 1


def _fields(parsed: list[ParsedFile], aware: bool) -> tuple[list[LibfmField], int]:
    """Each field's kind: numeric, categorical or multi (see the module docstring)."""
    key = np.concatenate([p.key for p in parsed])
    index = np.concatenate([p.index for p in parsed])
    value = np.concatenate([p.value for p in parsed])
    # a global row id per pair, to count a field's present pairs per row
    starts = np.cumsum([0] + [p.rows for p in parsed])
    row = np.concatenate([p.row + s for p, s in zip(parsed, starts, strict=False)])
    non_binary = ~np.isin(value, (0.0, 1.0))
    fields, weighted = [], 0
    for k in np.unique(key).tolist():
        mine = key == k
        name = SPARSE_FIELD if k == 0 and not aware else f"f{k}"
        if name != SPARSE_FIELD and len(np.unique(index[mine])) == 1 and non_binary[mine].any():
            fields.append(LibfmField(name, k, "numeric"))
            continue
        weighted += int(non_binary[mine].sum())
        present = row[mine & (value != 0.0)]
        per_row = int(np.bincount(present).max()) if len(present) else 1
        kind = "multi" if per_row > 1 or name == SPARSE_FIELD else "categorical"
        fields.append(LibfmField(name, k, kind, per_row))
    return fields, weighted


def _table(parsed: ParsedFile, fields: list[LibfmField], label: str) -> pa.Table:
    columns = {f.name: _column(parsed, f) for f in fields}
    return pa.table({**columns, label: pa.array(parsed.labels, pa.int64())})


def _column(parsed: ParsedFile, f: LibfmField) -> pa.Array:
    mine = parsed.key == f.key
    if f.kind == "numeric":
        out = np.zeros(parsed.rows)
        out[parsed.row[mine]] = parsed.value[mine]
        return pa.array(out)
    mine &= parsed.value != 0.0
    rows, tokens = parsed.row[mine], parsed.index[mine].astype(str)
    if f.kind == "categorical":
        out = np.full(parsed.rows, None, dtype=object)
        out[rows] = tokens
        return pa.array(out, pa.string())
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=parsed.rows))])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(tokens, pa.string()))
