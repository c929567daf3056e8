"""A CSV, Parquet or libFM dataset described by a YAML or JSON spec file.

    name: clicks                      # optional, default: the spec file's stem
    label: clicked                    # optional, default: label
    fields:                           # FieldSpec options: kind, min_count, separator, ...
      - {name: user, kind: categorical}
      - {name: tags, kind: multi, separator: "|", max_len: 4}
      - {name: price, kind: numeric, transform: log_standard}
    files: {train: "train/*.parquet", valid: valid.csv, test: test.csv}
    # or a given test file, validation carved out of train:
    # files: {train: train.csv, test: test.csv}
    # split: {kind: random, seed: 7, valid_fraction: 0.1}
    # or one file cut into splits:
    # file: all.csv
    # split: {kind: temporal, time_column: ts, fractions: [0.8, 0.1]}

Every key, its type and default is in training/data/spec.py (and the JSON Schema made from
it). Paths and globs are relative to the spec file. Files of a split stream (Parquet in record
batches, CSV in blocks); a table that is cut (one `file`, or train when valid is carved out of
it) is loaded once. libFM files are parsed whole (training/data/libfm.py). `libfm:PATH`
(libfm_source) is a spec with defaults for one libFM file or a folder of them.
"""

from __future__ import annotations

import csv
import glob
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ctrserve.features import DatasetSpec, FieldSpec
from ctrserve.features.tables import UNNAMED, csv_header, explain_csv_error
from ctrserve.training.data import libfm
from ctrserve.training.data.source import (
    SPLITS,
    Chunk,
    DataError,
    DataSource,
    random_split,
    temporal_split,
)
from ctrserve.training.data.spec import DatasetSpecFile, SplitFiles, SplitRule, load_spec_file

PARQUET_SUFFIXES = (".parquet", ".pq")
BLOCK_SIZE = 16 << 20
PARQUET_BATCH_ROWS = 256 * 1024
SPLIT_WORDS = {"train": {"train", "training"}, "valid": {"valid", "validation", "val", "dev"},
               "test": {"test", "testing"}}


class TabularSource(DataSource):
    """CSV, Parquet or libFM files: files per split, a test file and a train file that valid
    is carved from, or one table cut by a SplitRule."""

    def __init__(
        self,
        name: str,
        spec: DatasetSpec,
        *,
        files: Mapping[str, Sequence[Path]] | None = None,
        file: Sequence[Path] | None = None,
        split: SplitRule | None = None,
        file_format: str | None = None,
        delimiter: str | None = None,
        columns: Sequence[str] | None = None,
        spec_file: Path | None = None,
        tables: Mapping[Path, pa.Table] | None = None,
        notes: Sequence[str] = (),
    ):
        self.name, self.spec, self.spec_file = name, spec, spec_file
        self.files = {s: list(p) for s, p in files.items()} if files is not None else None
        self.file = list(file) if file is not None else None
        self.split_rule = split
        self.file_format, self.delimiter = file_format, delimiter
        self.columns = list(columns) if columns else None
        self.tables = dict(tables or {})  # libFM files, parsed up front
        self.notes = list(notes)
        self._splits: dict[str, pa.Table] | None = None
        self._unnamed: dict[Path, list[str]] = {}

    @classmethod
    def from_spec_file(cls, path: str | Path) -> TabularSource:
        """Parse a YAML or JSON spec file; a DataError names the file and the key path."""
        path = Path(path).absolute()
        return from_spec(load_spec_file(path), path.parent, str(path), path.stem, path)

    @property
    def carved(self) -> bool:
        """Valid is carved out of train (files give train and test only)."""
        return self.files is not None and self.split_rule is not None

    # ---- reading -----------------------------------------------------------------------
    def chunks(self, split: str) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self.file is not None or (self.carved and split != "test"):
            given = self.file if self.file is not None else self.files["train"]
            origin = f"{', '.join(map(str, given))} ({split} split)"
            yield Chunk(origin, self.splits()[split])
            return
        for path in self.files[split]:
            for where, table in self._stream(path):
                yield Chunk(f"{where} ({split} split)", table)

    def splits(self) -> dict[str, pa.Table]:
        """The tables that are cut by the split rule, loaded and cut once: all three splits
        of one `file`, or train and valid when valid is carved out of train."""
        if self.split_rule is None:
            raise DataError(f"{self.name}: splits() needs a split rule")
        if self._splits is None:
            rule = self.split_rule
            paths = self.file if self.file is not None else self.files["train"]
            extra = [rule.time_column] if rule.time_column else []
            parts = [t for p in paths for _, t in self._stream(p, extra)]
            table = pa.concat_tables(parts)
            if table.num_rows == 0:
                raise DataError(f"{self.name}: {', '.join(map(str, paths))} holds no rows")
            self._splits = _cut(table, rule, whole=self.file is not None)
        return self._splits

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.name, "format": self.file_format or "by suffix"}
        if self.spec_file is not None:
            out["spec_file"] = str(self.spec_file)
        if self.files is not None:
            out["files"] = {s: [str(p) for p in ps] for s, ps in self.files.items()}
        else:
            out["file"] = [str(p) for p in self.file]
        rule = self.split_rule
        if rule is None:
            return out
        out["split"] = _rule_record(rule, whole=self.file is not None)
        splits = self.splits()
        out["rows"] = {s: t.num_rows for s, t in splits.items()}
        if rule.kind == "temporal":
            out["window"] = {s: _window(t.column(rule.time_column)) for s, t in splits.items()}
        return out

    def warnings(self) -> list[str]:
        found = list(self.notes)
        for path, names in self._unnamed.items():
            found.append(f"{path}: column(s) {names} have no name (a pandas index written "
                         "with the data? write it with index=False); they are not read")
        odd = [n for n in self.spec.names if UNNAMED.match(n)]
        if odd:
            found.append(f"field(s) {odd} look like a pandas index column, not a feature")
        return found

    def _stream(self, path: Path, extra: Sequence[str] = ()) -> Iterator[tuple[str, pa.Table]]:
        """(origin, table) pieces of one file holding exactly the needed columns."""
        columns = [*self.spec.names, self.spec.label]
        columns += [c for c in extra if c not in columns]
        fmt = self._format(path)
        if fmt == "libfm":
            pieces: Iterator[tuple[str, pa.Table]] = iter([(str(path), self.tables[path])])
        elif fmt == "parquet":
            pieces = self._parquet(path, columns)
        else:
            pieces = self._csv(path, columns, fmt)
        for where, table in pieces:
            table = _label_int64(table.select(columns), self.spec.label, where)
            yield where, self._split_multi(table)

    def _format(self, path: Path) -> str:
        return self.file_format or format_of(path)

    def _parquet(self, path: Path, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
        try:
            pf = pq.ParquetFile(path)
            self._check_header(path, pf.schema_arrow.names, columns)
            offset = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                yield f"{path} (rows {offset + 1}-{offset + batch.num_rows})", pa.table(batch)
                offset += batch.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: {exc}") from None

    def _csv(self, path: Path, columns: list[str], fmt: str) -> Iterator[tuple[str, pa.Table]]:
        delimiter = self.delimiter or ("\t" if fmt == "tsv" or path.suffix == ".tsv" else ",")
        header = self.columns or _header(path, delimiter)
        self._check_header(path, header, columns)
        types = self._csv_types()
        options = {
            "read_options": pacsv.ReadOptions(block_size=BLOCK_SIZE, column_names=self.columns),
            "parse_options": pacsv.ParseOptions(delimiter=delimiter),
        }
        convert = pacsv.ConvertOptions(column_types=types, include_columns=columns)
        offset = 0
        try:
            for batch in pacsv.open_csv(path, convert_options=convert, **options):
                yield f"{path} (rows {offset + 1}-{offset + batch.num_rows})", pa.table(batch)
                offset += batch.num_rows
        except pa.ArrowInvalid as exc:
            raise DataError(explain_csv_error(path, str(exc), header, options,
                                              self.columns is None)) from None
        except OSError as exc:
            raise DataError(f"{path}: {exc}") from None

    def _check_header(self, path: Path, present: Sequence[str], columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}")
        unnamed = [n for n in present if UNNAMED.match(n) and n not in columns]
        if unnamed:
            self._unnamed[path] = unnamed

    def _split_multi(self, table: pa.Table) -> pa.Table:
        """Multi fields stored as separated strings become list<string>; blank is no tokens."""
        for f in self.spec.fields:
            column = table.column(f.name)
            if f.kind != "multi" or not pa.types.is_string(column.type):
                continue
            text = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
            lists = (
                pc.split_pattern(text, f.separator)
                if f.separator
                else pc.utf8_split_whitespace(pc.utf8_trim_whitespace(text))
            )
            table = table.set_column(table.schema.get_field_index(f.name), f.name, lists)
        return table

    def _csv_types(self) -> dict[str, pa.DataType]:
        # Forced so that every block agrees, and so that ids like "007" stay tokens.
        kinds = {"categorical": pa.string(), "multi": pa.string(), "numeric": pa.float64()}
        return {f.name: kinds[f.kind] for f in self.spec.fields} | {self.spec.label: pa.int64()}


# ---- building a source from a parsed spec ----------------------------------------------------
def from_spec(model: DatasetSpecFile, base: Path, where: str, default_name: str,
              spec_file: Path | None = None) -> TabularSource:
    """A TabularSource for a validated spec; paths and globs are relative to `base`."""
    files = file = None
    if model.files is not None:
        files = {s: _paths(base, where, f"files.{s}", getattr(model.files, s))
                 for s in SPLITS if getattr(model.files, s) is not None}
        every = [p for ps in files.values() for p in ps]
    else:
        file = _paths(base, where, "file", model.file)
        every = file
    fmt = _one_format(model.format, every, where)
    common: dict[str, Any] = {"files": files, "file": file, "split": model.split,
                              "file_format": model.format, "spec_file": spec_file}
    name = model.name or default_name
    if fmt == "libfm":
        return _libfm(model, every, where, name, common)
    if model.fields is None:
        raise DataError(f"{where}: fields: required for CSV and Parquet files")
    if model.columns is not None and fmt == "parquet":
        raise DataError(f"{where}: columns: only for CSV/TSV files without a header line")
    spec = DatasetSpec(fields=tuple(model.fields), label=model.label)
    return TabularSource(name, spec, delimiter=model.delimiter, columns=model.columns, **common)


def _paths(base: Path, where: str, key: str, value: str | list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in [value] if isinstance(value, str) else value:
        matches = sorted(glob.glob(str(base / pattern)))
        if not matches:
            raise DataError(f"{where}: {key}: no file matches {str(base / pattern)!r}")
        paths.extend(Path(m) for m in matches)
    return paths


def format_of(path: Path) -> str:
    """A file's format by its suffix: parquet, tsv, libfm or csv."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in libfm.SUFFIXES:
        return "libfm"
    return "tsv" if suffix == ".tsv" else "csv"


def _one_format(declared: str | None, paths: Sequence[Path], where: str) -> str:
    if declared is not None:
        return declared
    kinds = {format_of(p) for p in paths}
    if "libfm" in kinds and len(kinds) > 1:
        raise DataError(f"{where}: format: libFM files mixed with other files; give 'format'")
    return "libfm" if "libfm" in kinds else "csv"


def _libfm(model: DatasetSpecFile, paths: list[Path], where: str, name: str,
           common: dict[str, Any]) -> TabularSource:
    if model.columns is not None or model.delimiter is not None:
        key = "columns" if model.columns is not None else "delimiter"
        raise DataError(f"{where}: {key}: not used with libFM files")
    data = libfm.read_libfm_files(paths, model.label)
    fields = _libfm_fields(model.fields, data.fields, where)
    names = [*(f.name for f in fields), model.label]
    tables = {p: t.rename_columns(names) for p, t in data.tables.items()}
    notes = []
    if data.weighted:
        notes.append(f"{data.weighted} libFM feature value(s) other than 0 or 1 in token "
                     "fields were read as present (feature weights are not used)")
    spec = DatasetSpec(fields=tuple(fields), label=model.label)
    return TabularSource(name, spec, tables=tables, notes=notes,
                         **(common | {"file_format": "libfm"}))


def _libfm_fields(declared: list[FieldSpec] | None, found: list[libfm.LibfmField],
                  where: str) -> list[FieldSpec]:
    """The spec's fields name the file's fields in order; by default f1, f2, ..."""
    if declared is None:
        return [FieldSpec(f.name, f.kind, max_len=max(f.max_len, 1)) for f in found]
    if len(declared) != len(found):
        raise DataError(f"{where}: fields: the libFM files hold {len(found)} field(s) "
                        f"({', '.join(f.name for f in found)}); the spec declares "
                        f"{len(declared)}")
    for i, (mine, theirs) in enumerate(zip(declared, found, strict=True)):
        if mine.kind != theirs.kind and (mine.kind, theirs.kind) != ("multi", "categorical"):
            raise DataError(f"{where}: fields[{i}].kind: the file's field {theirs.name} is "
                            f"{theirs.kind}, not {mine.kind}")
    return declared


def libfm_source(arg: str) -> TabularSource:
    """`libfm:FILE` (cut at random 80/10/10, seed 0) or `libfm:DIR` with files whose names
    say train, valid (or validation, val, dev) and test; without valid, a random 10% of train
    (seed 0) is held out."""
    if not arg:
        raise DataError("libfm: give a path: libfm:FILE or libfm:DIR")
    root = Path(arg).absolute()
    if root.is_file():
        spec = DatasetSpecFile(file=glob.escape(str(root)), split=SplitRule(kind="random"),
                               format="libfm")
        return from_spec(spec, root.parent, str(root), root.stem)
    if not root.is_dir():
        raise DataError(f"{root}: no such file or directory")
    found = _split_files(root)
    files = SplitFiles(**{s: [glob.escape(str(p)) for p in ps] for s, ps in found.items()})
    split = SplitRule(kind="random") if "valid" not in found else None
    spec = DatasetSpecFile(files=files, split=split, format="libfm")
    return from_spec(spec, root, str(root), root.name)


def _split_files(root: Path) -> dict[str, list[Path]]:
    """The files of a folder by the split their name says (train, valid, test)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
        splits = [s for s, names in SPLIT_WORDS.items() if words & names]
        if len(splits) > 1:
            raise DataError(f"{path}: the name says {' and '.join(splits)}; rename it")
        if splits:
            found.setdefault(splits[0], []).append(path)
    for split in ("train", "test"):
        if split not in found:
            seen = ", ".join(f"{s}: {[p.name for p in ps]}" for s, ps in found.items())
            raise DataError(f"{root}: no {split} file (a name with "
                            f"{' or '.join(sorted(SPLIT_WORDS[split]))}); found {seen or 'none'}"
                            "; a spec file with format: libfm can name any files")
    return found


# ---- cutting, labels, errors -----------------------------------------------------------------
def _cut(table: pa.Table, rule: SplitRule, whole: bool) -> dict[str, pa.Table]:
    """All three splits of one table (whole), or train and valid carved out of train."""
    if whole:
        if rule.kind == "temporal":
            return temporal_split(table, rule.time_column, rule.fractions)
        return _random_split3(table, rule.fractions, rule.seed)
    if rule.kind == "temporal":
        cut = temporal_split(table, rule.time_column, (1 - rule.valid_fraction, 0.0))
        return {"train": cut["train"], "valid": cut["test"]}
    train, valid = random_split(table, rule.valid_fraction, rule.seed)
    return {"train": train, "valid": valid}


def _rule_record(rule: SplitRule, whole: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": rule.kind}
    if whole:
        out["fractions"] = list(rule.fractions)
    else:
        out["valid_fraction"] = rule.valid_fraction
    if rule.kind == "temporal":
        out["time_column"] = rule.time_column
    else:
        out["seed"] = rule.seed
    return out


def _header(path: Path, delimiter: str) -> list[str]:
    try:
        return csv_header(path, delimiter)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read its header line ({exc})") from None


def _label_int64(table: pa.Table, label: str, where: str) -> pa.Table:
    column = table.column(label)
    if column.type == pa.int64():
        return table
    try:
        column = column.cast(pa.int64())  # safe cast: 1.0 passes, 0.5 does not
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{where}: label {label!r} must be 0/1 ({exc})") from None
    return table.set_column(table.schema.get_field_index(label), label, column)


def _random_split3(
    table: pa.Table, fractions: tuple[float, float], seed: int
) -> dict[str, pa.Table]:
    u = np.random.default_rng(seed).random(table.num_rows)
    a, b = fractions[0], fractions[0] + fractions[1]
    masks = {"train": u < a, "valid": (u >= a) & (u < b), "test": u >= b}
    return {s: table.filter(pa.array(m)) for s, m in masks.items()}


def _window(column: pa.ChunkedArray) -> dict[str, Any]:
    if len(column) == 0:
        return {"start": None, "end": None}
    lo, hi = pc.min_max(column).values()
    return {"start": str(lo.as_py()), "end": str(hi.as_py())}
