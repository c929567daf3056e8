"""Reading CSV and Parquet tables the way a user can act on: pyarrow's CSV errors explained
with the column's name and the row, and columns without a name (a pandas index) spotted.
Shared by the trainer's readers (training/data/tabular.py) and `ctrserve load-features`."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# Names pandas gives an index column written with the data (to_csv, to_parquet).
UNNAMED = re.compile(r"^(|Unnamed: \d+|__index_level_\d+__)$")
CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+): "
                        r"invalid value '(.*)'$", re.S)
CELL_COUNT = re.compile(r"Expected (\d+) columns, got (\d+): (.*)$", re.S)


def unnamed_columns(names: list[str]) -> list[str]:
    return [n for n in names if UNNAMED.match(n)]


def explain_csv_error(path: Path, message: str, header: list[str],
                      options: dict[str, Any] | None = None, has_header: bool = True) -> str:
    """pyarrow's CSV error, with the column's name and the row when they can be found."""
    conversion = CONVERSION.search(message)
    if conversion:
        index, to, value = int(conversion[1]), conversion[2], conversion[3]
        name = header[index] if index < len(header) else f"#{index}"
        row = _row_of(path, name, value, options or {})
        where = f"row {row} (line {row + has_header})" if row else "a row"
        what = "a number" if to in ("double", "float") else "an integer"
        return f"{path}: column {name!r}, {where}: {value!r} is not {what}"
    cells = CELL_COUNT.search(message)
    if cells:
        line = _line_of(path, cells[3].rstrip("\r\n"))
        at = f"line {line}" if line else "a line"
        return (f"{path}: {at} has {cells[2]} cell(s), the header {cells[1]}: "
                f"{cells[3].strip()!r}")
    return f"{path}: {message}"


def csv_header(path: Path, delimiter: str = ",") -> list[str]:
    """The first line's cells (raises OSError, UnicodeDecodeError or csv.Error)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def _row_of(path: Path, name: str, value: str, options: dict[str, Any]) -> int | None:
    """The 1-based data row where `name` first holds `value`, read again as text."""
    convert = pacsv.ConvertOptions(column_types={name: pa.string()}, include_columns=[name],
                                   strings_can_be_null=False)
    offset = 0
    try:
        for batch in pacsv.open_csv(path, convert_options=convert, **options):
            hit = pc.index(batch.column(0), value).as_py()
            if hit >= 0:
                return offset + hit + 1
            offset += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        return None
    return None


def _line_of(path: Path, text: str) -> int | None:
    with path.open(encoding="utf-8", errors="replace") as f:
        return next((n for n, line in enumerate(f, 1) if line.rstrip("\r\n") == text), None)
