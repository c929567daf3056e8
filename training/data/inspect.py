"""What a dataset holds, split by split and field by field, and what looks wrong in it.

`ctrserve inspect` prints it; `ctrserve train` records it in run.json and prints its warnings.
Per split: rows, clicks and click rate. Per field: distinct values per split, the share of
missing values, and for categorical and multi fields the share of valid and test values never
seen in train (the encoder maps them to OOV). Warnings: a field mostly or wholly unseen in
train for a split, a click rate that shifts more than SHIFT_WARN times between train and
another split, a split without clicks, a field with one value in train, and the source's own
notes (columns without a name, such as a pandas index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ctrserve.features import FieldSpec
from ctrserve.features.columns import numbers, ragged, tokens
from ctrserve.training.data.source import SPLITS, DataSource, check_chunk

SHIFT_WARN = 2.0  # click rate of a split over train's (or under it) beyond this is a warning
MOSTLY_UNSEEN = 0.5  # share of a split's values unseen in train beyond this is a warning
UNSEEN_SPLITS = ("valid", "test")


class _FieldTally:
    """One field's counts, split by split; train first, so later splits can look it up."""

    def __init__(self, spec: FieldSpec):
        self.spec = spec
        self.distinct: dict[str, set] = {s: set() for s in SPLITS}
        self.rows = dict.fromkeys(SPLITS, 0)
        self.missing = dict.fromkeys(SPLITS, 0)
        self.values = dict.fromkeys(SPLITS, 0)
        self.unseen = dict.fromkeys(SPLITS, 0)
        self.total = dict.fromkeys(SPLITS, 0.0)
        self.vocab: np.ndarray | None = None

    def add(self, split: str, column: pa.ChunkedArray) -> None:
        present, missing = self._present(column)
        self.rows[split] += len(column)
        self.missing[split] += missing
        self.values[split] += len(present)
        if self.spec.kind == "numeric":
            self.total[split] += float(present.sum())
        elif split != "train":
            if self.vocab is None:
                self.vocab = np.array(sorted(self.distinct["train"]), dtype=str)
            self.unseen[split] += int((~np.isin(present, self.vocab)).sum())
        self.distinct[split].update(np.unique(present).tolist())

    def _present(self, column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
        """The values that are there, and how many rows have none."""
        name = self.spec.name
        if self.spec.kind == "numeric":
            x = numbers(column, name)
            ok = np.isfinite(x)
            return x[ok], int((~ok).sum())
        if self.spec.kind == "multi":
            lists = ragged(column, name, self.spec.separator)
            keep = lists.values != ""
            empty = int((np.diff(lists.offsets) == 0).sum())
            return lists.values[keep], empty
        values = tokens(column, name)
        keep = values != ""
        return values[keep], int((~keep).sum())

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.spec.kind,
            "cardinality": {s: len(self.distinct[s]) for s in SPLITS},
            "missing_rate": {s: _rate(self.missing[s], self.rows[s]) for s in SPLITS},
        }
        if self.spec.kind == "numeric":
            out["mean"] = {s: _rate(self.total[s], self.values[s], 6) for s in SPLITS}
        else:
            out["unseen_in_train"] = {s: _rate(self.unseen[s], self.values[s])
                                      for s in UNSEEN_SPLITS}
        return out


def inspect_source(source: DataSource) -> dict[str, Any]:
    """Rows, clicks and per-field numbers of every split of `source`, and warnings."""
    spec = source.spec
    tallies = {f.name: _FieldTally(f) for f in spec.fields}
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        rows = positives = 0
        for chunk in source.chunks(split):
            check_chunk(chunk, spec)
            rows += chunk.table.num_rows
            positives += int(np.asarray(chunk.table.column(spec.label)).sum())
            for name, tally in tallies.items():
                tally.add(split, chunk.table.column(name))
        splits[split] = {"rows": rows, "positives": positives,
                         "click_rate": _rate(positives, rows, 6)}
    fields = {name: tally.report() for name, tally in tallies.items()}
    report = {"data": source.describe(), "label": spec.label, "splits": splits,
              "fields": fields}
    report["warnings"] = (_split_warnings(splits) + _field_warnings(fields)
                          + source.warnings())
    return report


def _rate(part: float, whole: float, digits: int = 4) -> float | None:
    return round(part / whole, digits) if whole else None


def _split_warnings(splits: dict[str, dict[str, Any]]) -> list[str]:
    found = []
    for split, s in splits.items():
        if not s["rows"]:
            found.append(f"the {split} split is empty")
        elif s["positives"] in (0, s["rows"]):
            which = "no clicks" if s["positives"] == 0 else "only clicks"
            found.append(f"the {split} split has {which}: AUC is undefined on it")
    base = splits["train"]["click_rate"]
    for split in UNSEEN_SPLITS:
        rate = splits[split]["click_rate"]
        if not base or not rate:
            continue
        shift = max(rate / base, base / rate)
        if shift > SHIFT_WARN:
            found.append(f"click rate shifts {shift:.1f}x between train ({base:.4f}) and "
                         f"{split} ({rate:.4f}): a model calibrated on train will be off")
    return found


def _field_warnings(fields: dict[str, dict[str, Any]]) -> list[str]:
    found = []
    for name, f in fields.items():
        if f["cardinality"]["train"] == 0:
            found.append(f"field {name!r} is missing in every train row")
        elif f["cardinality"]["train"] == 1:
            found.append(f"field {name!r} has a single value in train: it carries no signal")
        for split, rate in f.get("unseen_in_train", {}).items():
            if rate is not None and rate >= 1.0:
                found.append(f"field {name!r}: every {split} value is unseen in train (100%): "
                             "the model knows none of them (OOV)")
            elif rate is not None and rate > MOSTLY_UNSEEN:
                found.append(f"field {name!r}: {rate:.0%} of {split} values are unseen in "
                             "train (OOV)")
    return found


def format_report(report: dict[str, Any]) -> str:
    """The report as text: a table of splits, a table of fields, then the warnings."""
    return "\n\n".join([_title(report["data"]), _split_table(report),
                        _field_table(report["fields"]), _warning_lines(report["warnings"])])


def _title(data: dict[str, Any]) -> str:
    where = data.get("spec_file") or data.get("path") or data.get("file") or data.get("files")
    if isinstance(where, dict):
        where = "; ".join(f"{split}: {_paths(paths)}" for split, paths in where.items())
    elif where is not None:
        where = _paths(where)
    return f"data: {data['source']}" + (f" ({where})" if where else "")


def _paths(paths: str | list[str]) -> str:
    return paths if isinstance(paths, str) else ", ".join(map(str, paths))


def _split_table(report: dict[str, Any]) -> str:
    rows = [["split", "rows", "clicks", "click rate"]]
    for split, s in report["splits"].items():
        rate = "-" if s["click_rate"] is None else f"{s['click_rate']:.4f}"
        rows.append([split, f"{s['rows']:,}", f"{s['positives']:,}", rate])
    return _table(rows, right=(1, 2, 3))


def _field_table(fields: dict[str, dict[str, Any]]) -> str:
    rows = [["field", "kind", "distinct train", "distinct valid", "distinct test",
             "missing train", "unseen valid", "unseen test"]]
    for name, f in fields.items():
        card, unseen = f["cardinality"], f.get("unseen_in_train", {})
        rows.append([name or '""', f["kind"], *(f"{card[s]:,}" for s in SPLITS),
                     _percent(f["missing_rate"]["train"]),
                     *(_percent(unseen.get(s)) for s in UNSEEN_SPLITS)])
    return _table(rows, right=(2, 3, 4, 5, 6, 7))


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _warning_lines(warnings: list[str]) -> str:
    if not warnings:
        return "warnings: none"
    return "\n".join([f"warnings ({len(warnings)}):", *(f"  ! {w}" for w in warnings)])


def _table(rows: list[list[str]], right: tuple[int, ...]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
