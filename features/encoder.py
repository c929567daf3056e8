"""The feature encoder: raw columns -> int64 ids and float32 numbers, with fitted state.

Index conventions, per field:
- categorical: 0 is the OOV slot, known tokens are 1..len(vocab) (vocab sorted);
  hashed fields use 1 + fnv1a64(token) % hash_buckets.
- multi: 0 is padding (masked out by the model), 1 is OOV, known tokens are 2..len(vocab)+1.
- numeric: transformed, standardised with training mean/std; missing becomes 0 (the mean).
Every index is < the field's `size`, so an embedding Gather can never go out of range.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctrserve.features.columns import FeatureError, Ragged, numbers, ragged, tokens
from ctrserve.features.hashing import fnv1a64
from ctrserve.features.spec import DatasetSpec, FieldSpec

EncodedBatch = dict[str, np.ndarray]
ENCODER_FORMAT = 1


@dataclass
class FieldState:
    """Fitted state of one field."""

    spec: FieldSpec
    vocab: np.ndarray | None = None  # sorted tokens (vocabulary fields only)
    mean: float = 0.0
    std: float = 1.0

    @property
    def size(self) -> int:
        """Number of embedding rows the field needs (0 for numeric fields)."""
        if self.spec.kind == "numeric":
            return 0
        reserved = 2 if self.spec.kind == "multi" else 1
        if self.spec.hash_buckets:
            return self.spec.hash_buckets + reserved
        return len(self.vocab) + reserved

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec.to_dict()}
        if self.vocab is not None:
            out["vocab"] = self.vocab.tolist()
        if self.spec.kind == "numeric":
            out["mean"], out["std"] = self.mean, self.std
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldState:
        vocab = data.get("vocab")
        return cls(
            spec=FieldSpec.from_dict(data["spec"]),
            vocab=None if vocab is None else np.asarray(vocab, dtype=str),
            mean=float(data.get("mean", 0.0)),
            std=float(data.get("std", 1.0)),
        )


class FeatureEncoder:
    """Encodes raw feature columns into the model inputs `cat_ids`, `multi_ids`, `numeric`."""

    def __init__(self, spec: DatasetSpec, states: Mapping[str, FieldState]):
        self.spec = spec
        self.states = {f.name: states[f.name] for f in spec.fields}
        self.categorical = [f for f in spec.fields if f.kind == "categorical"]
        self.multi = [f for f in spec.fields if f.kind == "multi"]
        self.numeric = [f for f in spec.fields if f.kind == "numeric"]
        self.multi_len = max((f.max_len for f in self.multi), default=0)

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, spec: DatasetSpec, chunks: Iterable[Mapping[str, Any]]) -> FeatureEncoder:
        """Fit vocabularies and numeric statistics over chunks of the training split only."""
        fitter = _Fitter(spec)
        for chunk in chunks:
            fitter.update(chunk)
        return fitter.finish()

    # ---- encoding ------------------------------------------------------------------------
    def transform(self, columns: Mapping[str, Any]) -> EncodedBatch:
        """Encode raw columns (one entry per field) into model inputs."""
        missing = [name for name in self.spec.names if name not in columns]
        if missing:
            raise FeatureError(f"missing field(s) {missing}")
        n_rows = _row_count(columns, self.spec.names)
        out: EncodedBatch = {}
        if self.categorical:
            cat = np.empty((n_rows, len(self.categorical)), dtype=np.int64)
            for j, f in enumerate(self.categorical):
                cat[:, j] = self._ids(f, tokens(columns[f.name], f.name), reserved=1)
            out["cat_ids"] = cat
        if self.multi:
            multi = np.zeros((n_rows, len(self.multi), self.multi_len), dtype=np.int64)
            for j, f in enumerate(self.multi):
                multi[:, j, :] = self._multi_ids(f, ragged(columns[f.name], f.name, f.separator))
            out["multi_ids"] = multi
        if self.numeric:
            num = np.empty((n_rows, len(self.numeric)), dtype=np.float32)
            for j, f in enumerate(self.numeric):
                num[:, j] = self._number(f, numbers(columns[f.name], f.name))
            out["numeric"] = num
        return out

    def _ids(self, f: FieldSpec, values: np.ndarray, reserved: int) -> np.ndarray:
        if f.hash_buckets:
            return (fnv1a64(values) % np.uint64(f.hash_buckets)).astype(np.int64) + reserved
        vocab = self.states[f.name].vocab
        if len(vocab) == 0:
            return np.zeros(len(values), dtype=np.int64) + (reserved - 1)
        pos = np.searchsorted(vocab, values)
        pos_c = np.minimum(pos, len(vocab) - 1)
        known = vocab[pos_c] == values
        return np.where(known, pos_c + reserved, reserved - 1).astype(np.int64)

    def _multi_ids(self, f: FieldSpec, column: Ragged) -> np.ndarray:
        n = len(column)
        out = np.zeros((n, self.multi_len), dtype=np.int64)
        lengths = np.diff(column.offsets)
        rows = np.repeat(np.arange(n), lengths)
        pos = np.arange(len(column.values)) - np.repeat(column.offsets[:-1], lengths)
        keep = pos < f.max_len
        ids = self._ids(f, column.values, reserved=2)
        out[rows[keep], pos[keep]] = ids[keep]
        return out

    def _number(self, f: FieldSpec, x: np.ndarray) -> np.ndarray:
        st = self.states[f.name]
        x = _log(x) if f.transform in ("log", "log_standard") else x
        if f.transform in ("standard", "log_standard"):
            x = (x - st.mean) / st.std
        x = np.where(np.isfinite(x), x, 0.0)
        return x.astype(np.float32)

    # ---- layout for the model ----------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        """What the model needs to know: fields per input and their embedding sizes."""
        return {
            "categorical": [(f.name, self.states[f.name].size) for f in self.categorical],
            "multi": [(f.name, self.states[f.name].size) for f in self.multi],
            "numeric": [f.name for f in self.numeric],
            "multi_len": self.multi_len,
        }

    def input_names(self) -> list[str]:
        groups = (("cat_ids", self.categorical), ("multi_ids", self.multi),
                  ("numeric", self.numeric))
        return [name for name, group in groups if group]

    # ---- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENCODER_FORMAT,
            "dataset": self.spec.to_dict(),
            "fields": [self.states[n].to_dict() for n in self.spec.names],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureEncoder:
        if data.get("format") != ENCODER_FORMAT:
            raise FeatureError(f"encoder state format {data.get('format')!r} is not supported")
        spec = DatasetSpec.from_dict(data["dataset"])
        states = [FieldState.from_dict(s) for s in data["fields"]]
        return cls(spec, {s.spec.name: s for s in states})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoder:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _row_count(columns: Mapping[str, Any], names: list[str]) -> int:
    counts = {name: len(columns[name]) for name in names}
    distinct = set(counts.values())
    if len(distinct) > 1:
        raise FeatureError(f"fields have different row counts: {counts}")
    return distinct.pop()


class _Fitter:
    """Streaming accumulation of token counts and numeric moments."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.counts: dict[str, Counter] = {f.name: Counter() for f in spec.fields}
        self.moments = {f.name: np.zeros(3) for f in spec.fields if f.kind == "numeric"}

    def update(self, chunk: Mapping[str, Any]) -> None:
        for f in self.spec.fields:
            if f.name not in chunk:
                raise FeatureError(f"missing field {f.name!r}")
            column = chunk[f.name]
            if f.kind == "numeric":
                x = numbers(column, f.name)
                x = _log(x) if f.transform in ("log", "log_standard") else x
                x = x[np.isfinite(x)]
                self.moments[f.name] += (len(x), x.sum(), np.square(x).sum())
            elif not f.hash_buckets:
                values = (
                    tokens(column, f.name)
                    if f.kind == "categorical"
                    else ragged(column, f.name, f.separator).values
                )
                uniq, cnt = np.unique(values, return_counts=True)
                self.counts[f.name].update(dict(zip(uniq.tolist(), cnt.tolist(), strict=True)))

    def finish(self) -> FeatureEncoder:
        states = {}
        for f in self.spec.fields:
            state = FieldState(spec=f)
            if f.kind == "numeric":
                n, s, ss = self.moments[f.name]
                mean = s / n if n else 0.0
                var = ss / n - mean * mean if n else 1.0
                state.mean, state.std = float(mean), float(np.sqrt(var)) if var > 1e-12 else 1.0
            elif not f.hash_buckets:
                kept = sorted(t for t, c in self.counts[f.name].items() if c >= f.min_count)
                state.vocab = np.asarray(kept, dtype=str)
            states[f.name] = state
        return FeatureEncoder(self.spec, states)
