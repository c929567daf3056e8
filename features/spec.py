"""Declarations of raw fields: what kind each is and how it is to be encoded.

`FieldSpec` is a pydantic dataclass, so one definition gives its keys, types, defaults,
constraints and descriptions to the Python API, to dataset spec files
(training/data/spec.py) and to their JSON Schema.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ctrserve.common.errors import UserError

FieldKind = Literal["categorical", "multi", "numeric"]
NumericTransform = Literal["none", "log", "standard", "log_standard"]
KINDS: tuple[str, ...] = ("categorical", "multi", "numeric")
TRANSFORMS: tuple[str, ...] = ("none", "log", "standard", "log_standard")


class SpecError(UserError):
    """A dataset or field declaration that cannot be used."""


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class FieldSpec:
    """One raw input field.

    categorical: one token per row (vocabulary with min_count, or hash_buckets for huge fields).
    multi: a list of tokens per row (or a string split on `separator`), padded to max_len.
    numeric: a float per row, NaN or None for missing, transformed by `transform`.
    """

    name: str = Field(min_length=1, description="The column that holds the field; also the "
                      "field's name in scoring requests.")
    kind: FieldKind = Field(description="categorical: one token per row; multi: a list of "
                            "tokens per row; numeric: one number per row (blank = missing).")
    min_count: int = Field(1, ge=1, description="categorical and multi: tokens seen fewer "
                           "times than this in the train split map to the OOV slot.")
    hash_buckets: int | None = Field(None, ge=1, description="categorical and multi: hash "
                                     "tokens into this many buckets instead of fitting a "
                                     "vocabulary (for fields with millions of values).")
    max_len: int = Field(8, ge=1, description="multi: tokens kept per row (the first max_len; "
                         "shorter rows are padded).")
    separator: str | None = Field(None, min_length=1, description="multi: splits a text cell "
                                  "into tokens (default: whitespace); not used when the column "
                                  "already holds lists (Parquet list<string>).")
    transform: NumericTransform = Field("standard", description="numeric: none; log "
                                        "(sign(x) log(1+|x|)); standard (minus the train mean, "
                                        "over the train std); log_standard (log, then "
                                        "standard). Missing values become 0 after it.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldSpec:
        if not isinstance(data, dict):
            raise SpecError(f"field declaration {data!r}: expected a mapping")
        try:
            return cls(**data)
        except ValidationError as exc:
            raise SpecError(f"field {data.get('name')!r}: {error_text(exc)}") from None


# Keys that only make sense for some kinds: a spec file giving one elsewhere is refused.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "min_count": ("categorical", "multi"),
    "hash_buckets": ("categorical", "multi"),
    "max_len": ("multi",),
    "separator": ("multi",),
    "transform": ("numeric",),
}


def error_text(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> str:
    """A pydantic error as `key.path: problem (got value)`; several joined by '; '."""
    return "; ".join(_one_error(err, prefix) for err in exc.errors())


def key_path(loc: tuple[str | int, ...]) -> str:
    """('fields', 3, 'transform') -> 'fields[3].transform'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class KeyProblem(ValueError):
    """Raised inside validators to name the key (relative to the validated object) at fault."""

    def __init__(self, key: tuple[str | int, ...], problem: str):
        super().__init__(problem)
        self.key, self.problem = key, problem


def _one_error(err: dict[str, Any], prefix: tuple[str | int, ...]) -> str:
    loc = (*prefix, *err["loc"])
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, KeyProblem):
        return f"{key_path((*loc, *cause.key)) or 'spec'}: {cause.problem}"
    kind, ctx, msg = err["type"], err.get("ctx", {}), err["msg"]
    if kind == "missing":
        msg = "required"
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = "unknown key"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    else:
        msg = _PHRASES[kind].format(**ctx) if kind in _PHRASES else msg[:1].lower() + msg[1:]
        if not isinstance(err.get("input"), dict | list):
            msg += f", got {err.get('input')!r}"
    return f"{key_path(loc) or 'spec'}: {msg}"


_PHRASES = {
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than": "must be < {lt}",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} character(s)",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
}


@dataclass(frozen=True)
class DatasetSpec:
    """The fields of a dataset, in model order, and its label column."""

    fields: tuple[FieldSpec, ...]
    label: str = "label"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.fields:
            raise SpecError("a dataset needs at least one field")
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"duplicate field names: {dupes}")
        if self.label in names:
            raise SpecError(f"label {self.label!r} is also declared as a feature field")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        fields = data.get("fields")
        if not isinstance(fields, list):
            raise SpecError("dataset spec needs a 'fields' list")
        return cls(
            fields=tuple(FieldSpec.from_dict(f) for f in fields),
            label=data.get("label", "label"),
        )
