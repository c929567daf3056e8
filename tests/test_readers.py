"""Readers for real click logs (MovieLens, Frappe, Criteo) and spec-described CSV/Parquet data.

Tests on the shared real datasets skip when the folder is absent; the tabular, libFM and
Criteo format tests write their own tiny files and always run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctrserve.features import FeatureEncoder
from ctrserve.training.data import (
    DataError,
    DataSource,
    checked_chunks,
    criteo,
    open_source,
    tabular,
)

DATA_DIR = Path(
    os.environ.get("CTR_DATA_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
)
SPLITS = ("train", "valid", "test")


def dataset(subdir: str) -> Path:
    path = DATA_DIR / subdir
    if not path.exists():
        pytest.skip(f"real dataset {path} is absent (set CTR_DATA_DIR to the datasets folder)")
    return path


def read(source: DataSource, split: str) -> pa.Table:
    return pa.concat_tables(chunk.table for chunk in checked_chunks(source, split))


def columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    return {name: table.column(name) for name in table.column_names}


def assert_encodes_in_range(source: DataSource, train: pa.Table, other: pa.Table) -> None:
    """Fit on train, encode another split: every id is inside its field's embedding table."""
    encoder = FeatureEncoder.fit(source.spec, [columns(train)])
    batch = encoder.transform(columns(other))
    layout = encoder.layout()
    if layout["categorical"]:
        sizes = np.array([size for _, size in layout["categorical"]])
        ids = batch["cat_ids"]
        assert ids.shape == (other.num_rows, len(sizes))
        assert (ids >= 0).all() and (ids < sizes).all()
        assert (ids > 0).mean() > 0.5  # most tokens are known, not OOV
    if layout["multi"]:
        sizes = np.array([size for _, size in layout["multi"]])
        ids = batch["multi_ids"]
        assert (ids >= 0).all() and (ids < sizes[None, :, None]).all()
    if layout["numeric"]:
        assert np.isfinite(batch["numeric"]).all()


# ---- MovieLens-100K ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens() -> tuple[DataSource, dict[str, pa.Table]]:
    source = open_source(f"movielens:{dataset('movielens-100k')}")
    return source, {split: read(source, split) for split in SPLITS}


def test_movielens_temporal_split(movielens):
    source, splits = movielens
    assert {s: t.num_rows for s, t in splits.items()} == {
        "train": 80_000,
        "valid": 10_000,
        "test": 10_000,
    }
    ts = {s: t.column("timestamp") for s, t in splits.items()}
    assert pc.max(ts["train"]).as_py() <= pc.min(ts["valid"]).as_py()
    assert pc.max(ts["valid"]).as_py() <= pc.min(ts["test"]).as_py()
    positives = sum(pc.sum(t.column("label")).as_py() for t in splits.values())
    assert positives / 100_000 == pytest.approx(0.554, abs=0.002)
    info = source.describe()
    assert info["rows"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    assert info["window"]["train"]["start"].startswith("1997-09")
    assert info["window"]["test"]["end"].startswith("1998-04")
    origin = next(source.chunks("train")).origin
    assert origin.endswith("ml-100k.inter (train split)")


def test_movielens_fields(movielens):
    source, splits = movielens
    assert source.spec.names == [
        "user_id", "item_id", "age", "gender", "occupation", "zip_code",
        "release_year", "genres", "hour", "weekday",
    ]  # fmt: skip
    train = splits["train"]
    assert pa.types.is_list(train.schema.field("genres").type)
    assert pc.min(pc.list_value_length(train.column("genres"))).as_py() >= 1
    assert set(pc.unique(train.column("gender")).to_pylist()) == {"F", "M"}
    assert len(pc.unique(train.column("age"))) <= 7
    assert set(pc.unique(train.column("hour")).to_pylist()) <= set(range(24))
    assert set(pc.unique(train.column("weekday")).to_pylist()) == set(range(7))
    # 874724710 = Saturday 1997-09-20 03:05:10 UTC
    first = train.filter(pc.equal(train.column("timestamp"), 874724710)).slice(0, 1).to_pylist()
    assert first[0]["hour"] == 3 and first[0]["weekday"] == 5


def test_movielens_encodes_in_range(movielens):
    source, splits = movielens
    assert_encodes_in_range(source, splits["train"], splits["test"])


def test_default_path_comes_from_env(monkeypatch):
    root = dataset("movielens-100k")
    monkeypatch.setenv("CTR_DATA_DIR", str(root.parent))
    assert open_source("movielens:").root == root.absolute()
    monkeypatch.delenv("CTR_DATA_DIR")
    with pytest.raises(DataError, match="CTR_DATA_DIR"):
        open_source("movielens:")


# ---- Frappe --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frappe() -> tuple[DataSource, dict[str, pa.Table]]:
    source = open_source(f"frappe:{dataset('frappe')}")
    return source, {split: read(source, split) for split in SPLITS}


def test_frappe_protocol(frappe):
    source, splits = frappe
    rows = {s: t.num_rows for s, t in splits.items()}
    assert rows["train"] + rows["valid"] == 57_722
    assert rows["valid"] == pytest.approx(5_772, abs=250)
    assert rows["test"] == 28_860
    assert source.describe()["rows"] == rows
    for table in splits.values():
        assert set(pc.unique(table.column("label")).to_pylist()) == {0, 1}
        assert pc.mean(table.column("label")).as_py() == pytest.approx(0.33, abs=0.01)
    assert source.spec.names[:2] == ["user", "item"] and len(source.spec.names) == 10
    # the holdout is reproducible
    again = open_source(f"frappe:{source.root}")
    assert again.splits()["valid"].equals(splits["valid"])


def test_frappe_encodes_in_range(frappe):
    source, splits = frappe
    assert_encodes_in_range(source, splits["train"], splits["test"])


def write_libfm(folder: Path, validation: str) -> None:
    good = "1 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1 10:1\n"
    (folder / "frappe.validation.libfm").write_text(validation)
    (folder / "frappe.test.libfm").write_text(good)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("-1 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1\n", "expected 10 index:value pairs"),
        ("2 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1 10:1\n", "label '2'"),
        ("1 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1 x:1\n", "'x:1' is not a one-hot"),
    ],
)
def test_frappe_malformed_line_names_file_and_line(tmp_path, bad_line, problem):
    good = "-1 11:1 12:1 13:1 14:1 15:1 16:1 17:1 18:1 19:1 20:1\n"
    write_libfm(tmp_path, good + good + bad_line)
    source = open_source(f"frappe:{tmp_path}")
    with pytest.raises(DataError, match=problem) as err:
        read(source, "train")
    assert "frappe.validation.libfm:3:" in str(err.value)


def test_frappe_tiny_file_maps_labels(tmp_path):
    labels = ["1", "-1", "-1"] * 10
    pairs = [" ".join(f"{i * 10 + k}:1" for k in range(10)) for i in range(len(labels))]
    lines = [f"{label} {p}" for label, p in zip(labels, pairs, strict=True)]
    write_libfm(tmp_path, "\n".join(lines) + "\n\n")
    source = open_source(f"frappe:{tmp_path}")
    table = pa.concat_tables([read(source, "train"), read(source, "valid")])
    assert table.num_rows == 30
    assert sorted(table.column("label").to_pylist()) == [0] * 20 + [1] * 10
    assert table.column("city").type == pa.string()


# ---- Criteo --------------------------------------------------------------------------------


def test_criteo_first_8k_directory():
    source = open_source(f"criteo:{dataset('criteo-sample/first-8k')}")
    splits = {s: read(source, s) for s in SPLITS}
    assert {s: t.num_rows for s, t in splits.items()} == {"train": 7200, "valid": 409, "test": 391}
    assert source.describe()["rows"] == {"train": 7200, "valid": 409, "test": 391}
    schema = splits["train"].schema
    assert schema.field("label").type == pa.int64()
    assert all(schema.field(f"I{i}").type == pa.float64() for i in range(1, 14))
    assert all(schema.field(f"C{i}").type == pa.string() for i in range(1, 27))
    assert splits["train"].column("I1").null_count > 0  # blanks are missing, not zero
    assert pc.sum(pc.equal(splits["train"].column("C26"), "")).as_py() > 0
    rate = pc.mean(splits["train"].column("label")).as_py()
    assert 0.18 < rate < 0.26
    assert_encodes_in_range(source, splits["train"], splits["valid"])


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("pytorchfm_criteo_train_999.txt", 1000),  # tab, no header, trailing blanks stripped
        ("airecsys_criteo_train.csv", 1599),  # comma, header with an extra Id column
        ("deepctr_criteo_sample.txt", 200),  # comma, header
    ],
)
def test_criteo_single_file_variants(name, rows):
    source = open_source(f"criteo:{dataset('criteo-sample') / name}")
    sizes = {s: read(source, s).num_rows for s in SPLITS}
    assert sum(sizes.values()) == rows
    assert sizes["train"] == int(rows * 0.8)
    assert sizes["valid"] == int(rows * 0.9) - int(rows * 0.8)


def test_criteo_short_rows_are_padded():
    loose = open_source(f"criteo:{dataset('criteo-sample') / 'pytorchfm_criteo_train_999.txt'}")
    whole = open_source(f"criteo:{dataset('criteo-sample/first-8k')}")
    # The loose sample starts with the same four rows; rows 3 and 4 lost their trailing blanks.
    head = read(loose, "train").slice(0, 4)
    assert head.equals(read(whole, "train").slice(0, 4))
    assert head.column("C24")[2].as_py() == "3b183c5c"
    assert head.column("C25")[2].as_py() == head.column("C26")[2].as_py() == ""


def test_criteo_streams_blocks_across_split_boundaries(monkeypatch):
    path = dataset("criteo-sample/first-8k") / "train.csv"
    expected = {s: read(open_source(f"criteo:{path}"), s) for s in SPLITS}
    monkeypatch.setattr(criteo, "BLOCK_SIZE", 64 * 1024)
    source = open_source(f"criteo:{path}")
    for split in SPLITS:
        chunks = list(checked_chunks(source, split))
        assert len(chunks) > 1
        assert pa.concat_tables(c.table for c in chunks).equals(expected[split])
    assert {s: t.num_rows for s, t in expected.items()} == {
        "train": 5760,
        "valid": 720,
        "test": 720,
    }


def criteo_line(label: str, sep: str = "\t", fields: int = 39) -> str:
    values = [str(i) for i in range(13)] + [f"c{i:x}" for i in range(26)]
    return sep.join([label, *values[:fields]])


def test_criteo_tiny_comma_file_with_header(tmp_path):
    header = ",".join(["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))])
    rows = [criteo_line(str(i % 2), ",") for i in range(10)]
    rows[3] = criteo_line("1", ",", fields=30)  # short row: the rest is missing
    (tmp_path / "tiny.csv").write_text("\n".join([header, *rows]) + "\n")
    source = open_source(f"criteo:{tmp_path / 'tiny.csv'}")
    table = pa.concat_tables([read(source, s) for s in SPLITS])
    assert table.num_rows == 10
    assert table.column("label").to_pylist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert table.column("I13")[3].as_py() == 12.0 and table.column("C26")[3].as_py() == ""


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (criteo_line("0") + "\textra", "more than 40 fields"),
        (criteo_line("x"), "column 'label'"),
        ("0\tseven" + criteo_line("0")[3:], "column 'I1'"),
    ],
)
def test_criteo_malformed_rows(tmp_path, line, problem):
    (tmp_path / "train.csv").write_text(criteo_line("0") + "\n" + line + "\n")
    (tmp_path / "dev.csv").write_text(criteo_line("1") + "\n")
    (tmp_path / "test.csv").write_text(criteo_line("1") + "\n")
    source = open_source(f"criteo:{tmp_path}")
    with pytest.raises(DataError, match=problem) as err:
        read(source, "train")
    assert "train.csv" in str(err.value)


# ---- spec-described CSV / Parquet --------------------------------------------------------

FIELDS = [
    {"name": "user", "kind": "categorical"},
    {"name": "tags", "kind": "multi", "separator": "|", "max_len": 3},
    {"name": "price", "kind": "numeric", "transform": "log_standard"},
]


def rows(n: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        "user": [f"{u:03d}" for u in rng.integers(0, 5, n)],
        "tags": ["|".join(rng.choice(["a", "b", "c", "d"], rng.integers(0, 4))) for _ in range(n)],
        "price": [None if i % 7 == 0 else float(v) for i, v in enumerate(rng.random(n) * 100)],
        "clicked": rng.integers(0, 2, n).tolist(),
        "ts": rng.permutation(n).tolist(),
    }


def write_csv(path: Path, data: dict[str, list]) -> None:
    lines = [",".join(data)]
    for values in zip(*data.values(), strict=True):
        lines.append(",".join("" if v is None else str(v) for v in values))
    path.write_text("\n".join(lines) + "\n")


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


def test_tabular_files_per_split_csv_and_parquet(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    for part in range(2):
        table = pa.table(rows(20, seed=part))
        pq.write_table(table, tmp_path / "train" / f"part-{part}.parquet", row_group_size=8)
    write_csv(tmp_path / "valid.csv", rows(15, seed=5))
    write_csv(tmp_path / "test.csv", rows(15, seed=6))
    (tmp_path / "clicks.yaml").write_text(
        "name: clicks\nlabel: clicked\n"
        f"fields: {json.dumps(FIELDS)}\n"
        "files: {train: 'train/*.parquet', valid: valid.csv, test: [test.csv]}\n"
    )
    monkeypatch.setattr(tabular, "PARQUET_BATCH_ROWS", 8)
    source = open_source(str(tmp_path / "clicks.yaml"))
    assert source.name == "clicks" and source.spec.label == "clicked"
    chunks = list(checked_chunks(source, "train"))
    assert len(chunks) == 6 and "part-0.parquet (rows 1-8) (train split)" in chunks[0].origin
    splits = {s: read(source, s) for s in SPLITS}
    assert {s: t.num_rows for s, t in splits.items()} == {"train": 40, "valid": 15, "test": 15}
    valid = splits["valid"]
    assert valid.column("user").type == pa.string() and valid.column("user")[0].as_py()[0] == "0"
    assert valid.column("price").null_count == 3
    assert_encodes_in_range(source, splits["train"], valid)


def test_tabular_one_file_temporal_split(tmp_path):
    write_csv(tmp_path / "all.csv", rows(100))
    spec = {
        "label": "clicked",
        "fields": FIELDS,
        "file": "all.csv",
        "split": {"kind": "temporal", "time_column": "ts", "fractions": [0.8, 0.1]},
    }
    source = open_source(str(write_spec(tmp_path / "events.json", spec)))
    splits = {s: read(source, s) for s in SPLITS}
    assert source.name == "events"
    assert {s: t.num_rows for s, t in splits.items()} == {"train": 80, "valid": 10, "test": 10}
    assert pc.max(splits["train"].column("ts")).as_py() == 79
    assert splits["test"].column("ts").to_pylist() == list(range(90, 100))
    assert source.describe()["window"]["valid"] == {"start": "80", "end": "89"}


def test_tabular_one_file_random_split_is_reproducible(tmp_path):
    pq.write_table(pa.table(rows(200)), tmp_path / "all.parquet")
    spec = {
        "label": "clicked",
        "fields": FIELDS,
        "file": "all.parquet",
        "split": {"kind": "random", "seed": 7, "fractions": [0.7, 0.2]},
    }
    path = write_spec(tmp_path / "s.json", spec)
    first = {s: read(open_source(str(path)), s) for s in SPLITS}
    again = {s: read(open_source(str(path)), s) for s in SPLITS}
    assert sum(t.num_rows for t in first.values()) == 200
    assert first["train"].num_rows == pytest.approx(140, abs=25)
    assert all(first[s].equals(again[s]) for s in SPLITS)


def test_tabular_label_not_binary_names_the_file(tmp_path):
    data = rows(10)
    data["clicked"][4] = 2
    write_csv(tmp_path / "d.csv", data)
    spec = {"label": "clicked", "fields": FIELDS, "files": dict.fromkeys(SPLITS, "d.csv")}
    source = open_source(str(write_spec(tmp_path / "s.json", spec)))
    with pytest.raises(DataError, match="must be 0/1") as err:
        read(source, "train")
    assert "d.csv" in str(err.value)


def test_tabular_missing_column_names_file_and_column(tmp_path):
    data = rows(10)
    del data["price"]
    write_csv(tmp_path / "d.csv", data)
    pq.write_table(pa.table(data), tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        spec = {"label": "clicked", "fields": FIELDS, "files": dict.fromkeys(SPLITS, name)}
        source = open_source(str(write_spec(tmp_path / "s.json", spec)))
        with pytest.raises(DataError, match=r"d\.(csv|parquet): missing column\(s\) \['price'\]"):
            read(source, "valid")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"labels": "clicked"}, "labels: unknown key"),
        ({"files": {"train": "d.csv", "valid": "d.csv", "tst": "d.csv"}}, "files.tst"),
        ({"files": {"train": "d.csv", "valid": "nope-*.csv", "test": "d.csv"}}, "files.valid"),
        ({"fields": [FIELDS[0], {"name": "x", "kind": "fancy"}]}, r"fields\[1\]"),
        ({"fields": [{"name": "x", "kind": "numeric", "bins": 3}]}, r"fields\[0\]"),
        ({"files": None, "file": "d.csv", "split": {"kind": "temporal"}}, "split.time_column"),
        ({"files": None, "file": "d.csv", "split": {"kind": "random", "seeds": 1}}, "split.seeds"),
        (
            {"files": None, "file": "d.csv", "split": {"kind": "random", "fractions": [0.9, 0.2]}},
            "split.fractions",
        ),
        ({"files": None, "file": "d.csv"}, "split"),
    ],
)
def test_tabular_malformed_spec_names_file_and_key(tmp_path, change, key):
    write_csv(tmp_path / "d.csv", rows(5))
    spec = {"label": "clicked", "fields": FIELDS, "files": dict.fromkeys(SPLITS, "d.csv")}
    spec.update(change)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = write_spec(tmp_path / "bad.json", spec)
    with pytest.raises(DataError, match=key) as err:
        open_source(str(path))
    assert str(path) in str(err.value)


def test_tabular_unreadable_spec_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("fields: [unclosed\n")
    with pytest.raises(DataError, match="broken.yaml"):
        open_source(str(path))
    with pytest.raises(DataError, match="no such spec file"):
        open_source(str(tmp_path / "absent.yaml"))
