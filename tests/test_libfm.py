"""The libFM/libSVM reader (`libfm:PATH` and spec files with format libfm) on files written
here, and on Frappe's libFM files where the shared datasets are present."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from ctrserve.cli import main
from ctrserve.training.data import DataError, checked_chunks, open_source
from tests.conftest import shared_datasets

SPLITS = ("train", "valid", "test")


def read(source, split: str) -> pa.Table:
    return pa.concat_tables(c.table for c in checked_chunks(source, split))


def one_hot_lines(n: int, seed: int = 0) -> list[str]:
    """Frappe-like rows: label -1/1, three one-hot fields in their own index ranges."""
    return [f"{1 if (i + seed) % 3 == 0 else -1} {i % 5}:1 {10 + i % 4}:1 {20 + i % 2}:1"
            for i in range(n)]


def test_one_file_one_hot_is_cut_80_10_10(tmp_path):
    path = tmp_path / "clicks.libfm"
    path.write_text("\n".join(one_hot_lines(200)) + "\n\n")
    source = open_source(f"libfm:{path}")
    assert [(f.name, f.kind) for f in source.spec.fields] == [
        ("f1", "categorical"), ("f2", "categorical"), ("f3", "categorical")]
    tables = {s: read(source, s) for s in SPLITS}
    assert sum(t.num_rows for t in tables.values()) == 200
    assert tables["train"].num_rows == pytest.approx(160, abs=20)
    first = tables["train"].slice(0, 1).to_pylist()[0]
    assert first == {"f1": "0", "f2": "10", "f3": "20", "label": 1}
    assert source.describe()["split"] == {"kind": "random", "fractions": [0.8, 0.1], "seed": 0}
    again = open_source(f"libfm:{path}")
    assert all(read(again, s).equals(tables[s]) for s in SPLITS)


def test_field_aware_pairs_give_categorical_multi_and_numeric_fields(tmp_path):
    lines = ["1 0:3:1 1:10:1 1:11:1 2:99:0.5",
             "0 0:4:1 1:12:1 2:99:2.25",
             "-1 0:3:1",
             "+1 1:10:0 0:5:1 2:99:1"]
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.ffm", "valid.ffm", "test.ffm"):
        (folder / name).write_text("\n".join(lines) + "\n")
    source = open_source(f"libfm:{folder}")
    assert [(f.name, f.kind) for f in source.spec.fields] == [
        ("f0", "categorical"), ("f1", "multi"), ("f2", "numeric")]
    assert source.spec.fields[1].max_len == 2
    table = read(source, "valid")
    assert table.column("f0").to_pylist() == ["3", "4", "3", "5"]
    assert table.column("f1").to_pylist() == [["10", "11"], ["12"], [], []]  # value 0: absent
    assert table.column("f2").to_pylist() == [0.5, 2.25, 0.0, 1.0]  # absent: 0 (sparse)
    assert table.column("label").to_pylist() == [1, 0, 0, 1]
    assert source.describe()["files"]["test"] == [str(folder / "test.ffm")]


def test_sparse_libsvm_is_one_multi_field_and_weights_are_noted(tmp_path):
    lines = [f"{i % 2} {i % 7}:1 {7 + i % 3}:0.5" + (f" {20 + i}:1" if i % 4 == 0 else "")
             for i in range(40)]
    folder = tmp_path / "svm"
    folder.mkdir()
    (folder / "a9a-train.svm").write_text("\n".join(lines) + "\n")
    (folder / "a9a-test.svm").write_text("\n".join(lines[:10]) + "\n")
    (folder / "README.txt").write_text("not a split\n")
    source = open_source(f"libfm:{folder}")
    assert [(f.name, f.kind, f.max_len) for f in source.spec.fields] == [
        ("features", "multi", 3)]
    # no valid file: a random 10% of train is held out
    assert read(source, "train").num_rows + read(source, "valid").num_rows == 40
    assert read(source, "test").column("features")[0].as_py() == ["0", "7", "20"]
    assert source.warnings() == ["50 libFM feature value(s) other than 0 or 1 in token "
                                 "fields were read as present (feature weights are not used)"]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("2 0:1 10:1 20:1", "train.libfm:3: label '2' is not 1/+1 (click) or 0/-1 (none)"),
        ("1 0:1 x:1 20:1", "train.libfm:3: 'x:1': field and index must be non-negative"),
        ("1 0:1 10:one 20:1", "train.libfm:3: '10:one': the value is not a number"),
        ("1 0:1 1:10:1 20:1", "train.libfm:3: '1:10:1' mixes plain and field-aware pairs"),
        ("1 0:1 10 20:1", "train.libfm:3: '10' is not INDEX:VALUE or FIELD:INDEX:VALUE"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, bad, problem):
    good = one_hot_lines(2)
    (tmp_path / "train.libfm").write_text("\n".join([*good, bad]) + "\n")
    (tmp_path / "test.libfm").write_text("\n".join(good) + "\n")
    with pytest.raises(DataError, match="train.libfm:3: ") as err:
        open_source(f"libfm:{tmp_path}")
    assert problem in str(err.value)


def test_folder_needs_train_and_test(tmp_path):
    (tmp_path / "clicks.validation.libfm").write_text("1 1:1\n")
    (tmp_path / "clicks.test.libfm").write_text("1 1:1\n")
    with pytest.raises(DataError, match="no train file .*found test: \\['clicks.test.libfm'\\]"):
        open_source(f"libfm:{tmp_path}")
    with pytest.raises(DataError, match="no such file or directory"):
        open_source(f"libfm:{tmp_path / 'absent'}")


def test_spec_file_names_the_fields_and_checks_their_kinds(tmp_path, capsys):
    (tmp_path / "train.libfm").write_text("\n".join(one_hot_lines(50)) + "\n")
    (tmp_path / "test.libfm").write_text("\n".join(one_hot_lines(20, seed=1)) + "\n")
    spec = {"format": "libfm", "label": "clicked",
            "fields": [{"name": "user", "kind": "categorical", "min_count": 2},
                       {"name": "item", "kind": "categorical"},
                       {"name": "daytime", "kind": "categorical"}],
            "files": {"train": "train.libfm", "test": "test.libfm"},
            "split": {"kind": "random", "seed": 5, "valid_fraction": 0.2}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    source = open_source(str(path))
    assert source.spec.names == ["user", "item", "daytime"]
    assert source.spec.fields[0].min_count == 2
    assert read(source, "test").column_names == ["user", "item", "daytime", "clicked"]

    spec["fields"][2]["kind"] = "numeric"
    path.write_text(json.dumps(spec))
    assert main(["inspect", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: fields[2].kind: the file's field f3 is categorical, not numeric" in err
    spec["fields"].pop()
    path.write_text(json.dumps(spec))
    assert main(["inspect", "--data", str(path)]) == 2
    assert "fields: the libFM files hold 3 field(s) (f1, f2, f3); the spec declares 2" \
        in capsys.readouterr().err


def frappe_dir() -> Path:
    root = shared_datasets()
    if root is None or not (root / "frappe" / "frappe.test.libfm").is_file():
        pytest.skip("Frappe's libFM files are absent (set CTR_DATA_DIR to the datasets folder)")
    return root / "frappe"


def test_frappe_libfm_spec_reproduces_the_frappe_reader(tmp_path):
    root = frappe_dir()
    names = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
             "country", "city"]
    spec = {"name": "frappe", "format": "libfm",
            "fields": [{"name": n, "kind": "categorical"} for n in names],
            "files": {"train": str(root / "frappe.validation.libfm"),
                      "test": str(root / "frappe.test.libfm")},
            "split": {"kind": "random", "seed": 2026, "valid_fraction": 0.1}}
    (tmp_path / "frappe.json").write_text(json.dumps(spec))
    mine = open_source(str(tmp_path / "frappe.json"))
    theirs = open_source(f"frappe:{root}")
    for split in SPLITS:
        assert read(mine, split).equals(read(theirs, split)), split


def test_frappe_one_file_inspects(capsys):
    path = frappe_dir() / "frappe.validation.libfm"
    assert main(["inspect", "--data", f"libfm:{path}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(s["rows"] for s in report["splits"].values()) == 57_722
    assert report["fields"]["f2"]["cardinality"]["train"] > 3_000  # items
    assert report["warnings"] == []
