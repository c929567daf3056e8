"""The dataset spec file (YAML or JSON), defined once as a pydantic model.

The model validates spec files (every error names its key path, such as
`fields[3].transform`), documents every key, and gives the JSON Schema committed as
docs/dataset-spec.schema.json:
`python -m ctrserve.training.data.spec > docs/dataset-spec.schema.json`.
Building a data source from a parsed spec is training/data/tabular.py's job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ctrserve.features.spec import KIND_KEYS, KINDS, FieldSpec, KeyProblem, error_text
from ctrserve.training.data.source import DataError

FORMATS = ("csv", "tsv", "parquet", "libfm")
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

Paths = str | list[str]


class SplitRule(BaseModel):
    """How rows are cut into train, valid and test when the files do not say."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["random", "temporal"] = Field(
        description="random: each row drawn by a seeded generator; temporal: rows sorted by "
        "time_column, the earliest first (no future rows leak into training).")
    fractions: tuple[float, float] = Field(
        (0.8, 0.1), description="With one `file`: the train and valid shares of its rows, "
        "both > 0 and summing below 1; test gets the rest.")
    valid_fraction: float = Field(
        0.1, gt=0, lt=1, description="With `files` that give train and test but no valid: the "
        "share of train held out as valid (random: drawn with seed; temporal: the latest rows).")
    seed: int = Field(0, description="random: the generator's seed (the same seed, the same "
                      "split).")
    time_column: str | None = Field(
        None, min_length=1, description="temporal: the column to sort by (numbers, or ISO "
        "dates and times that sort as text); read beside the fields, not a feature itself.")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0 or sum(value) >= 1:
            raise ValueError(f"must be [train, valid] fractions > 0 summing below 1, "
                             f"got {list(value)}")
        return value

    @model_validator(mode="after")
    def _kind_keys(self) -> SplitRule:
        if self.kind == "temporal" and not self.time_column:
            raise KeyProblem(("time_column",), "a temporal split needs the time column's name")
        if self.kind == "random" and self.time_column is not None:
            raise KeyProblem(("time_column",), "only goes with a temporal split")
        if self.kind == "temporal" and "seed" in self.model_fields_set:
            raise KeyProblem(("seed",), "only goes with a random split")
        return self


class SplitFiles(BaseModel):
    """The files of each split: a path, a glob, or a list of them, relative to the spec file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: Paths = Field(description="Training rows (the encoder is fitted on these only).")
    valid: Paths | None = Field(
        None, description="Validation rows (early stopping). Leave it out and give `split` to "
        "carve validation out of train.")
    test: Paths = Field(description="Held-out rows for the final metrics.")


class DatasetSpecFile(BaseModel):
    """A dataset described by a spec file: its fields, its label and where its rows are."""

    model_config = ConfigDict(extra="forbid", title="ctrserve dataset spec")

    name: str | None = Field(None, min_length=1, description="The dataset's name in run "
                             "records (default: the spec file's name without its suffix).")
    label: str = Field("label", min_length=1, description="The 0/1 click column (integers; "
                       "for libFM files, the name given to the label).")
    fields: list[FieldSpec] | None = Field(
        None, min_length=1, description="The feature fields in model order. Required for CSV "
        "and Parquet; for libFM files optional: it names the file's fields in order (their "
        "kinds must match what the file holds), else they are f1, f2, ...")
    files: SplitFiles | None = Field(None, description="Files per split (each split streams "
                                     "from its own files). Not with `file`.")
    file: Paths | None = Field(None, description="One table (a path, a glob or a list) cut "
                               "into the three splits by `split`. Not with `files`.")
    split: SplitRule | None = Field(None, description="Required with `file`; with `files` "
                                    "lacking valid, carves valid out of train.")
    format: Literal["csv", "tsv", "parquet", "libfm"] | None = Field(
        None, description="The files' format (default: by suffix: .parquet/.pq Parquet, "
        ".tsv tab-separated, .libfm/.libsvm/.svm/.ffm libFM, anything else CSV).")
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="CSV: the "
                                  "cell separator (default: tab for .tsv files and format "
                                  "tsv, else a comma).")
    columns: list[str] | None = Field(
        None, min_length=1, description="CSV/TSV files without a header line: the names of "
        "their columns in file order (every line is then data).")

    @field_validator("fields", mode="before")
    @classmethod
    def _keys_fit_kind(cls, fields: Any) -> Any:
        for i, declared in enumerate(fields if isinstance(fields, list) else []):
            if isinstance(declared, dict):
                _check_kind_keys(i, declared)
        return fields

    @field_validator("columns")
    @classmethod
    def _distinct_columns(cls, columns: list[str] | None) -> list[str] | None:
        for i, name in enumerate(columns or []):
            if name in columns[:i]:
                raise KeyProblem((i,), f"{name!r} is named twice")
        return columns

    @model_validator(mode="after")
    def _layout(self) -> DatasetSpecFile:
        _check_layout(self)
        _check_names(self)
        return self


def _check_kind_keys(i: int, declared: dict[str, Any]) -> None:
    kind = declared.get("kind")
    for key, kinds in KIND_KEYS.items():
        if key in declared and kind in KINDS and kind not in kinds:
            raise KeyProblem((i, key), f"only applies to {' and '.join(kinds)} fields, "
                                       f"not to a {kind} field")
    if "min_count" in declared and declared.get("hash_buckets") is not None:
        raise KeyProblem((i, "min_count"), "not used with hash_buckets (a hashed field has no "
                                           "vocabulary)")


def _check_layout(spec: DatasetSpecFile) -> None:
    if (spec.files is None) == (spec.file is None):
        raise KeyProblem(("files",), "give either 'files' (train, test and optionally valid) "
                                     "or 'file' with a 'split' rule")
    split, given = spec.split, spec.split.model_fields_set if spec.split else set()
    if spec.file is not None:
        if split is None:
            raise KeyProblem(("split",), "'file' needs a split rule (random or temporal)")
        if "valid_fraction" in given:
            raise KeyProblem(("split", "valid_fraction"), "only goes with 'files' lacking "
                             "valid; one 'file' is cut by 'fractions'")
        return
    if spec.files.valid is not None and split is not None:
        raise KeyProblem(("split",), "only goes with 'file', or with 'files' lacking valid "
                                     "(validation is then carved out of train)")
    if spec.files.valid is None and split is None:
        raise KeyProblem(("files", "valid"), "missing; give valid files, or a 'split' rule "
                                             "to carve validation out of train")
    if "fractions" in given:
        raise KeyProblem(("split", "fractions"), "only goes with one 'file'; to carve valid "
                                                 "out of train use 'valid_fraction'")


def _check_names(spec: DatasetSpecFile) -> None:
    names = [f.name for f in spec.fields or []]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise KeyProblem(("fields", i, "name"), f"{name!r} is declared twice (also "
                                                    f"fields[{names.index(name)}])")
    if spec.label in names:
        raise KeyProblem(("label",), f"{spec.label!r} is also declared as a feature field "
                                     f"(fields[{names.index(spec.label)}])")
    time = spec.split.time_column if spec.split else None
    if time is not None and time in names:
        raise KeyProblem(("split", "time_column"), f"{time!r} is also a feature field; the "
                                                   "split reads it on its own")


def parse_spec(raw: Any, where: str) -> DatasetSpecFile:
    """Validate a loaded spec; a DataError names `where` and every key path at fault."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a mapping at the top level")
    try:
        return DatasetSpecFile.model_validate(raw)
    except ValidationError as exc:
        raise DataError(f"{where}: {error_text(exc)}") from None


def load_spec_file(path: Path) -> DatasetSpecFile:
    """Read and validate a YAML or JSON spec file."""
    if not path.is_file():
        raise DataError(f"{path}: no such spec file")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not valid {path.suffix[1:]}: {exc}") from None
    return parse_spec(raw, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of spec files, as committed in docs/dataset-spec.schema.json."""
    return {"$schema": SCHEMA_DIALECT, **DatasetSpecFile.model_json_schema()}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
