"""A generic CSV or Parquet dataset described by a small YAML or JSON spec file.

    name: clicks                      # optional, default: the spec file's stem
    label: clicked                    # optional, default: label
    fields:                           # FieldSpec options: kind, min_count, separator, ...
      - {name: user, kind: categorical}
      - {name: tags, kind: multi, separator: "|", max_len: 4}
      - {name: price, kind: numeric, transform: log_standard}
    files: {train: "train/*.parquet", valid: valid.csv, test: test.csv}
    # or one file cut into splits:
    # file: all.csv
    # split: {kind: temporal, time_column: ts, fractions: [0.8, 0.1]}
    # split: {kind: random, seed: 7, fractions: [0.8, 0.1]}
    delimiter: ","                    # optional, CSV only (.tsv files default to tab)

Paths and globs are relative to the spec file. With `files`, each split streams (Parquet in
record batches, CSV in blocks); with `file`, the whole table is loaded once and split.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from features import DatasetSpec, FieldSpec, SpecError
from training.data.source import SPLITS, Chunk, DataError, DataSource, temporal_split

SPEC_KEYS = ("name", "label", "fields", "files", "file", "split", "delimiter")
SPLIT_KEYS = ("kind", "time_column", "seed", "fractions")
SPLIT_KINDS = ("temporal", "random")
PARQUET_SUFFIXES = (".parquet", ".pq")
BLOCK_SIZE = 16 << 20
PARQUET_BATCH_ROWS = 256 * 1024


@dataclass(frozen=True)
class SplitRule:
    """How one table is cut into train/valid/test."""

    kind: str
    fractions: tuple[float, float] = (0.8, 0.1)
    time_column: str | None = None
    seed: int = 0


class TabularSource(DataSource):
    """CSV or Parquet files: one set of files per split, or one table cut by a SplitRule."""

    def __init__(
        self,
        name: str,
        spec: DatasetSpec,
        *,
        files: Mapping[str, Sequence[Path]] | None = None,
        file: Sequence[Path] | None = None,
        split: SplitRule | None = None,
        delimiter: str = ",",
        spec_file: Path | None = None,
    ):
        if (files is None) == (file is None) or (file is not None) != (split is not None):
            raise DataError(f"{name}: give either files per split, or one file and a split rule")
        if files is not None and sorted(files) != sorted(SPLITS):
            raise DataError(f"{name}: files must name exactly the splits {SPLITS}")
        self.name = name
        self.spec = spec
        self.files = {s: list(files[s]) for s in SPLITS} if files is not None else None
        self.file = list(file) if file is not None else None
        self.split_rule = split
        self.delimiter = delimiter
        self.spec_file = spec_file
        self._splits: dict[str, pa.Table] | None = None

    @classmethod
    def from_spec_file(cls, path: str | Path) -> TabularSource:
        """Parse a YAML or JSON spec file; a DataError names the file and the bad key."""
        return _SpecParser(Path(path)).source()

    # ---- reading -----------------------------------------------------------------------
    def chunks(self, split: str) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self.files is None:
            origin = f"{', '.join(map(str, self.file))} ({split} split)"
            yield Chunk(origin, self.splits()[split])
            return
        for path in self.files[split]:
            for where, table in self._stream(path):
                yield Chunk(f"{where} ({split} split)", table)

    def splits(self) -> dict[str, pa.Table]:
        """The three splits of a single-table source, loaded and cut once."""
        if self.file is None or self.split_rule is None:
            raise DataError(f"{self.name}: splits() needs a single-file source")
        if self._splits is None:
            rule = self.split_rule
            extra = [rule.time_column] if rule.time_column else []
            parts = [t for p in self.file for _, t in self._stream(p, extra)]
            table = pa.concat_tables(parts) if parts else None
            if table is None:
                raise DataError(f"{self.name}: {self.file} holds no rows")
            if rule.kind == "temporal":
                self._splits = temporal_split(table, rule.time_column, rule.fractions)
            else:
                self._splits = _random_split3(table, rule.fractions, rule.seed)
        return self._splits

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.name}
        if self.spec_file is not None:
            out["spec_file"] = str(self.spec_file)
        if self.files is not None:
            out["files"] = {s: [str(p) for p in ps] for s, ps in self.files.items()}
            return out
        rule = self.split_rule
        out["file"] = [str(p) for p in self.file]
        out["split"] = {"kind": rule.kind, "fractions": list(rule.fractions)}
        if rule.kind == "temporal":
            out["split"]["time_column"] = rule.time_column
        else:
            out["split"]["seed"] = rule.seed
        splits = self.splits()
        out["rows"] = {s: t.num_rows for s, t in splits.items()}
        if rule.kind == "temporal":
            out["window"] = {s: _window(t.column(rule.time_column)) for s, t in splits.items()}
        return out

    def _columns(self, extra: Sequence[str] = ()) -> list[str]:
        columns = [*self.spec.names, self.spec.label]
        return columns + [c for c in extra if c not in columns]

    def _stream(self, path: Path, extra: Sequence[str] = ()) -> Iterator[tuple[str, pa.Table]]:
        """(origin, table) pieces of one file holding exactly the needed columns."""
        columns = self._columns(extra)
        try:
            if path.suffix.lower() in PARQUET_SUFFIXES:
                pieces = self._parquet(path, columns)
            else:
                pieces = self._csv(path, columns)
            for where, table in pieces:
                table = _label_int64(table.select(columns), self.spec.label, where)
                yield where, self._split_multi(table)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: {exc}") from None

    def _parquet(self, path: Path, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
        pf = pq.ParquetFile(path)
        _require(path, pf.schema_arrow.names, columns)
        offset = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield f"{path} (rows {offset + 1}-{offset + batch.num_rows})", pa.table(batch)
            offset += batch.num_rows

    def _csv(self, path: Path, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else self.delimiter
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=BLOCK_SIZE),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types=self._csv_types()),
        )
        _require(path, reader.schema.names, columns)
        offset = 0
        for batch in reader:
            yield f"{path} (rows {offset + 1}-{offset + batch.num_rows})", pa.table(batch)
            offset += batch.num_rows

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


def _require(path: Path, present: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")


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


class _SpecParser:
    """Turns a spec file into a TabularSource; every error names the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        self.base = path.parent

    def error(self, key: str, problem: str) -> DataError:
        return DataError(f"{self.path}: {key}: {problem}")

    def source(self) -> TabularSource:
        raw = self._load()
        unknown = [k for k in raw if k not in SPEC_KEYS]
        if unknown:
            raise self.error(unknown[0], f"unknown key; expected one of {SPEC_KEYS}")
        spec = self._dataset(raw)
        name = raw.get("name", self.path.stem)
        if not isinstance(name, str) or not name:
            raise self.error("name", "must be a non-empty string")
        delimiter = raw.get("delimiter", ",")
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise self.error("delimiter", f"must be one character, got {delimiter!r}")
        if ("files" in raw) == ("file" in raw):
            raise self.error("files", "give either 'files' (one per split) or 'file' and 'split'")
        common = {"delimiter": delimiter, "spec_file": self.path}
        if "files" in raw:
            if "split" in raw:
                raise self.error("split", "only goes with 'file', not with 'files'")
            return TabularSource(name, spec, files=self._files(raw["files"]), **common)
        if "split" not in raw:
            raise self.error("split", "'file' needs a split rule (temporal or random)")
        paths = self._paths("file", raw["file"])
        return TabularSource(name, spec, file=paths, split=self._split(raw["split"]), **common)

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such spec file")
        text = self.path.read_text(encoding="utf-8")
        try:
            raw = json.loads(text) if self.path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{self.path}: not valid {self.path.suffix[1:]}: {exc}") from None
        if not isinstance(raw, dict):
            raise DataError(f"{self.path}: expected a mapping at the top level")
        return raw

    def _dataset(self, raw: dict[str, Any]) -> DatasetSpec:
        fields = raw.get("fields")
        if not isinstance(fields, list) or not fields:
            raise self.error("fields", "must be a non-empty list of field declarations")
        specs = []
        for i, f in enumerate(fields):
            if not isinstance(f, dict):
                raise self.error(f"fields[{i}]", f"expected a mapping, got {f!r}")
            try:
                specs.append(FieldSpec.from_dict(f))
            except (SpecError, TypeError) as exc:
                raise self.error(f"fields[{i}]", str(exc)) from None
        label = raw.get("label", "label")
        if not isinstance(label, str) or not label:
            raise self.error("label", "must be a column name")
        try:
            return DatasetSpec(fields=tuple(specs), label=label)
        except SpecError as exc:
            raise self.error("fields", str(exc)) from None

    def _files(self, files: Any) -> dict[str, list[Path]]:
        if not isinstance(files, dict):
            raise self.error("files", "must map train, valid and test to paths or globs")
        for key in files:
            if key not in SPLITS:
                raise self.error(f"files.{key}", f"unknown split; expected {SPLITS}")
        missing = [s for s in SPLITS if s not in files]
        if missing:
            raise self.error(f"files.{missing[0]}", "missing; every split needs files")
        return {s: self._paths(f"files.{s}", files[s]) for s in SPLITS}

    def _paths(self, key: str, value: Any) -> list[Path]:
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise self.error(key, f"expected a path, a glob, or a list of them; got {value!r}")
        paths: list[Path] = []
        for pattern in patterns:
            matches = sorted(glob.glob(str(self.base / pattern)))
            if not matches:
                raise self.error(key, f"no file matches {str(self.base / pattern)!r}")
            paths.extend(Path(m) for m in matches)
        return paths

    def _split(self, raw: Any) -> SplitRule:
        if not isinstance(raw, dict):
            raise self.error("split", "expected a mapping with 'kind'")
        unknown = [k for k in raw if k not in SPLIT_KEYS]
        if unknown:
            raise self.error(f"split.{unknown[0]}", f"unknown key; expected one of {SPLIT_KEYS}")
        kind = raw.get("kind")
        if kind not in SPLIT_KINDS:
            raise self.error("split.kind", f"must be one of {SPLIT_KINDS}, got {kind!r}")
        time_column = raw.get("time_column")
        if kind == "temporal" and (not isinstance(time_column, str) or not time_column):
            raise self.error("split.time_column", "a temporal split needs the time column name")
        if kind == "random" and time_column is not None:
            raise self.error("split.time_column", "only goes with a temporal split")
        seed = raw.get("seed", 0)
        if kind == "temporal" and "seed" in raw:
            raise self.error("split.seed", "only goes with a random split")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise self.error("split.seed", f"must be an integer, got {seed!r}")
        return SplitRule(kind, self._fractions(raw.get("fractions", [0.8, 0.1])), time_column, seed)

    def _fractions(self, value: Any) -> tuple[float, float]:
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and all(v > 0 for v in value)
            and sum(value) < 1
        )
        if not ok:
            raise self.error(
                "split.fractions",
                f"must be [train, valid] fractions > 0 summing below 1, got {value!r}",
            )
        return float(value[0]), float(value[1])
