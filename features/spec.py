"""Declarations of raw fields: what kind each is and how it is to be encoded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ctrserve.errors import UserError

FieldKind = Literal["categorical", "multi", "numeric"]
NumericTransform = Literal["none", "log", "standard", "log_standard"]
KINDS: tuple[str, ...] = ("categorical", "multi", "numeric")
TRANSFORMS: tuple[str, ...] = ("none", "log", "standard", "log_standard")


class SpecError(UserError):
    """A dataset or field declaration that cannot be used."""


@dataclass(frozen=True)
class FieldSpec:
    """One raw input field.

    categorical: one token per row (vocabulary with min_count, or hash_buckets for huge fields).
    multi: a list of tokens per row (or a string split on `separator`), padded to max_len.
    numeric: a float per row, NaN or None for missing, transformed by `transform`.
    """

    name: str
    kind: FieldKind
    min_count: int = 1
    hash_buckets: int | None = None
    max_len: int = 8
    separator: str | None = None
    transform: NumericTransform = "standard"

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("field name must not be empty")
        if self.kind not in KINDS:
            raise SpecError(f"field {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.min_count < 1:
            raise SpecError(f"field {self.name!r}: min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise SpecError(f"field {self.name!r}: hash_buckets must be >= 1")
        if self.max_len < 1:
            raise SpecError(f"field {self.name!r}: max_len must be >= 1, got {self.max_len}")
        if self.transform not in TRANSFORMS:
            raise SpecError(
                f"field {self.name!r}: transform {self.transform!r} is not one of {TRANSFORMS}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError(f"field {data.get('name')!r}: unknown keys {sorted(unknown)}")
        if "name" not in data or "kind" not in data:
            raise SpecError(f"field declaration {data!r} needs 'name' and 'kind'")
        return cls(**data)


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
