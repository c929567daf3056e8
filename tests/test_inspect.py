"""`ctrserve inspect` on the shared real datasets (skipped where they are absent), the spec
examples of the data reference page on the Criteo and Avazu samples, and the warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from ctrserve.cli import main
from ctrserve.features import DatasetSpec, FieldSpec
from ctrserve.training.data.inspect import format_report, inspect_source
from ctrserve.training.data.source import Chunk, DataSource
from tests.conftest import shared_datasets


def dataset(subdir: str) -> Path:
    root = shared_datasets()
    if root is None or not (root / subdir).exists():
        pytest.skip(f"real dataset {subdir} is absent (set CTR_DATA_DIR to the datasets folder)")
    return root / subdir


def inspect_json(capsys: pytest.CaptureFixture, source: str) -> dict:
    assert main(["inspect", "--data", source, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_movielens(capsys):
    root = dataset("movielens-100k")
    report = inspect_json(capsys, f"movielens:{root}")
    assert {s: v["rows"] for s, v in report["splits"].items()} == {
        "train": 80_000, "valid": 10_000, "test": 10_000}
    assert report["splits"]["train"]["click_rate"] == pytest.approx(0.551, abs=0.001)
    fields = report["fields"]
    assert fields["genres"]["kind"] == "multi" and fields["genres"]["cardinality"]["train"] == 19
    assert fields["gender"]["cardinality"] == {"train": 2, "valid": 2, "test": 2}
    # the temporal split brings mostly new users into valid and test; items are mostly known
    assert fields["user_id"]["unseen_in_train"]["test"] > 0.8
    assert fields["item_id"]["unseen_in_train"]["test"] < 0.05
    assert report["warnings"] == [
        "field 'user_id': 85% of valid values are unseen in train (OOV)",
        "field 'user_id': 86% of test values are unseen in train (OOV)"]
    assert report["data"]["path"] == str(root.absolute())
    assert main(["inspect", "--data", f"movielens:{root}"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"data: movielens-100k ({root.absolute()})")
    assert "train  80,000  44,072      0.5509" in text


# ---- the examples of the data reference page (docs/data.md), on the shared samples ----------
CRITEO_COLUMNS = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
CRITEO_SPEC = "\n".join([
    "# Criteo challenge files: tab-separated, no header line (criteo-sample/first-8k)",
    "name: criteo-8k",
    "format: tsv",
    f"columns: [{', '.join(CRITEO_COLUMNS)}]",
    "label: label",
    "fields:",
    *(f"  - {{name: I{i}, kind: numeric, transform: log_standard}}" for i in range(1, 14)),
    *(f"  - {{name: C{i}, kind: categorical, min_count: 2}}" for i in range(1, 27)),
    "files: {train: train.csv, valid: dev.csv, test: test.csv}",
    ""])

AVAZU_SPEC = """\
# Avazu CSV with a header line (avazu-sample/first-9k/train.csv), cut by time
name: avazu-9k
label: click
fields:
  - {name: C1, kind: categorical}
  - {name: banner_pos, kind: categorical}
  - {name: site_id, kind: categorical, min_count: 2}
  - {name: site_domain, kind: categorical, min_count: 2}
  - {name: site_category, kind: categorical}
  - {name: app_id, kind: categorical, min_count: 2}
  - {name: app_domain, kind: categorical, min_count: 2}
  - {name: app_category, kind: categorical}
  - {name: device_id, kind: categorical, hash_buckets: 100000}
  - {name: device_ip, kind: categorical, hash_buckets: 100000}
  - {name: device_model, kind: categorical, min_count: 2}
  - {name: device_type, kind: categorical}
  - {name: device_conn_type, kind: categorical}
  - {name: C14, kind: categorical, min_count: 2}
  - {name: C15, kind: categorical}
  - {name: C16, kind: categorical}
  - {name: C17, kind: categorical, min_count: 2}
  - {name: C18, kind: categorical}
  - {name: C19, kind: categorical}
  - {name: C20, kind: categorical}
  - {name: C21, kind: categorical}
file: train.csv
split: {kind: temporal, time_column: hour, fractions: [0.8, 0.1]}
"""


def spec_beside(tmp_path: Path, data: Path, names: list[str], text: str) -> Path:
    """The spec in a folder of links to the real files, as if written beside them."""
    for name in names:
        (tmp_path / name).symlink_to(data / name)
    (tmp_path / "spec.yaml").write_text(text)
    return tmp_path / "spec.yaml"


def test_criteo_style_tsv_example(tmp_path, capsys):
    data = dataset("criteo-sample/first-8k")
    spec = spec_beside(tmp_path, data, ["train.csv", "dev.csv", "test.csv"], CRITEO_SPEC)
    report = inspect_json(capsys, str(spec))
    assert {s: v["rows"] for s, v in report["splits"].items()} == {
        "train": 7200, "valid": 409, "test": 391}
    assert report["fields"]["I1"]["missing_rate"]["train"] > 0.4  # blanks are missing
    assert report["fields"]["C1"]["kind"] == "categorical"
    assert report["warnings"] == ["field 'C3': 52% of valid values are unseen in train (OOV)"]


def test_avazu_style_csv_example(tmp_path, capsys):
    data = dataset("avazu-sample/first-9k")
    spec = spec_beside(tmp_path, data, ["train.csv"], AVAZU_SPEC)
    report = inspect_json(capsys, str(spec))
    assert sum(v["rows"] for v in report["splits"].values()) == 8087
    window = report["data"]["window"]
    assert window["train"]["end"] <= window["valid"]["start"]
    assert [w.split(":")[0] for w in report["warnings"]] == ["field 'device_ip'"] * 2


# ---- warnings ---------------------------------------------------------------------------------
class Tables(DataSource):
    name = "tables"

    def __init__(self, spec: DatasetSpec, splits: dict[str, dict[str, list]]):
        self.spec, self.splits = spec, splits

    def chunks(self, split: str):
        yield Chunk(split, pa.table(self.splits[split]))


def test_warnings_for_shift_no_clicks_constant_and_unseen_fields():
    spec = DatasetSpec(fields=(FieldSpec("country", "categorical"),
                               FieldSpec("tags", "multi", separator=" "),
                               FieldSpec("bid", "numeric")), label="y")
    source = Tables(spec, {
        "train": {"country": ["fr"] * 10, "tags": ["a b"] * 10, "bid": [1.0] * 9 + [None],
                  "y": [1] + [0] * 9},
        "valid": {"country": ["de"] * 4, "tags": ["a"] * 4, "bid": [2.0] * 4, "y": [0] * 4},
        "test": {"country": ["fr", "de", "", None], "tags": ["c", "a", "c d", ""],
                 "bid": [1.0] * 4, "y": [1, 1, 0, 0]},
    })
    report = inspect_source(source)
    assert report["splits"]["test"] == {"rows": 4, "positives": 2, "click_rate": 0.5}
    country = report["fields"]["country"]
    assert country["missing_rate"]["test"] == 0.5
    assert country["unseen_in_train"] == {"valid": 1.0, "test": 0.5}
    assert report["fields"]["tags"]["unseen_in_train"]["test"] == 0.75
    assert report["fields"]["bid"]["mean"] == {"train": 1.0, "valid": 2.0, "test": 1.0}
    assert report["fields"]["bid"]["missing_rate"]["train"] == 0.1
    assert report["warnings"] == [
        "the valid split has no clicks: AUC is undefined on it",
        "click rate shifts 5.0x between train (0.1000) and test (0.5000): a model calibrated "
        "on train will be off",
        "field 'country' has a single value in train: it carries no signal",
        "field 'country': every valid value is unseen in train (100%): the model knows none "
        "of them (OOV)",
        "field 'tags': 75% of test values are unseen in train (OOV)",
        "field 'bid' has a single value in train: it carries no signal",
    ]
    text = format_report(report)
    assert text.startswith("data: tables\n")
    assert "warnings (6):\n  ! the valid split has no clicks" in text
