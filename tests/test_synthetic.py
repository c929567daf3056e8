"""The synthetic app-store world, its logs, and the `synth:DIR` data source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ctrserve.features import FeatureEncoder
from ctrserve.loadtest.synth_logs import load_world, write_synthetic_logs
from ctrserve.loadtest.world import SyntheticWorld, WorldConfig
from ctrserve.training.data import DataError, checked_chunks, open_source
from ctrserve.training.data.synthetic import SyntheticSource

SMALL = {"n_users": 2_000, "n_apps": 300, "n_developers": 40}


def _write(path: Path, seed: int = 7, days: int = 4, per_day: int = 2_005) -> dict:
    return write_synthetic_logs(path, seed=seed, days=days, impressions_per_day=per_day,
                                progress=False, **SMALL)  # fmt: skip


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("synth")
    return path, _write(path)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(WorldConfig(seed=11))


def _day_tables(path: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted((path / "impressions").glob("*.parquet"))}


def _sample(world: SyntheticWorld, seed: int, n_requests: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    imp = world.sample_requests(rng, n_requests, "2026-11-07").impressions()
    imp["p"] = world.click_probability(imp["user"], imp["app"], imp["hour"], imp["weekday"],
                                       imp["slot"])  # fmt: skip
    imp["y"] = world.sample_downloads(rng, imp["p"])
    return imp


# ---- determinism ---------------------------------------------------------------------------
def test_same_seed_writes_identical_logs(logs: tuple[Path, dict], tmp_path: Path) -> None:
    path, summary = logs
    again = _write(tmp_path)
    assert again["rows_per_day"] == summary["rows_per_day"]
    first, second = _day_tables(path), _day_tables(tmp_path)
    assert list(first) == list(second)
    assert all(first[name].equals(second[name]) for name in first)
    for name in ("users.parquet", "apps.parquet"):
        assert pq.read_table(path / name).equals(pq.read_table(tmp_path / name))
    meta = json.loads((path / "world.json").read_text())
    assert meta == json.loads((tmp_path / "world.json").read_text())


def test_different_seed_gives_different_world(logs: tuple[Path, dict], tmp_path: Path) -> None:
    _write(tmp_path, seed=8, days=1)
    name = "day=2026-11-01.parquet"
    a = pq.read_table(logs[0] / "impressions" / name)
    b = pq.read_table(tmp_path / "impressions" / name)
    assert not np.allclose(a["true_probability"].to_numpy(), b["true_probability"].to_numpy())
    assert pq.read_table(logs[0] / "users.parquet") != pq.read_table(tmp_path / "users.parquet")


def test_world_json_rebuilds_the_exact_truth(logs: tuple[Path, dict]) -> None:
    path, _ = logs
    world = load_world(path)
    table = pq.read_table(path / "impressions" / "day=2026-11-02.parquet")
    users = np.array([int(u[1:]) for u in table["user_id"].to_pylist()])
    apps = np.array([int(a[1:]) for a in table["app_id"].to_pylist()])
    cols = [table[c].to_numpy().astype(np.int64) for c in ("hour", "weekday", "slot")]
    prob = world.click_probability(users, apps, *cols)
    np.testing.assert_array_equal(prob, table["true_probability"].to_numpy())
    assert table["user_id"].to_pylist() == world.user_ids[users].tolist()


def test_logs_have_the_documented_layout(logs: tuple[Path, dict]) -> None:
    path, summary = logs
    assert summary["rows_per_day"] == {f"2026-11-0{d}": 2_005 for d in range(1, 5)}
    table = pq.read_table(path / "impressions" / "day=2026-11-01.parquet")
    spec = SyntheticWorld.dataset_spec()
    for name in ["request_id", "ts", "day", *spec.names, "label", "true_probability"]:
        assert name in table.column_names
    assert str(table.schema.field("recent_categories").type) == "list<element: string>"
    assert set(table["label"].to_numpy().tolist()) <= {0, 1}
    assert table["ts"].to_numpy().min() >= np.datetime64("2026-11-01")
    assert table["weekday"].to_numpy().max() == 6  # 2026-11-01 is a Sunday


# ---- ground truth ----------------------------------------------------------------------------
def test_positive_rate_and_slot_bias(world: SyntheticWorld) -> None:
    imp = _sample(world, seed=1, n_requests=20_000)
    assert 0.03 <= imp["y"].mean() <= 0.08
    by_slot = [imp["p"][imp["slot"] == s].mean() for s in range(1, 11)]
    assert by_slot[0] > by_slot[4] > by_slot[9]
    assert imp["y"][imp["slot"] == 1].mean() > imp["y"][imp["slot"] == 10].mean()


def test_interactions_beat_a_first_order_logistic_regression(world: SyntheticWorld) -> None:
    train, test = _sample(world, seed=2, n_requests=8_000), _sample(world, seed=3, n_requests=3_000)
    lr = LogisticRegression(C=0.3, max_iter=500)
    lr.fit(_one_hot(world, train), train["y"])
    lr_auc = roc_auc_score(test["y"], lr.predict_proba(_one_hot(world, test))[:, 1])
    oracle_auc = roc_auc_score(test["y"], test["p"])
    assert oracle_auc > lr_auc + 0.04, (oracle_auc, lr_auc)


def _one_hot(world: SyntheticWorld, rows: dict) -> sparse.csr_matrix:
    """First-order one-hot features: every attribute, the app id and the context (no user id)."""
    u, a, cfg = rows["user"], rows["app"], world.config
    fields = [
        (world.age[u], 5), (world.gender[u], 3), (world.region[u], 8), (world.device[u], 4),
        (world.activity[u], 3), (a, cfg.n_apps), (world.category[a], 15),
        (world.developer[a], cfg.n_developers), (world.price[a], 4), (world.rating[a], 5),
        (world.popularity[a], 5), (rows["hour"], 24), (rows["weekday"], 7), (rows["slot"], 11),
    ]  # fmt: skip
    n = len(u)
    blocks = [sparse.csr_matrix(world.recent_mask[u].astype(float))]
    for codes, size in fields:
        blocks.append(sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, size)))
    return sparse.hstack(blocks).tocsr()


def test_feature_columns_match_the_spec_and_encode(world: SyntheticWorld) -> None:
    imp = _sample(world, seed=4, n_requests=50)
    cols = world.feature_columns(imp["user"], imp["app"], imp["hour"], imp["weekday"], imp["slot"])
    spec = world.dataset_spec()
    assert list(cols) == spec.names
    assert all(len(v) == 500 for v in cols.values())
    assert all(len(r) <= 5 for r in cols["recent_categories"])
    encoded = FeatureEncoder.fit(spec, [cols]).transform(cols)
    assert encoded["cat_ids"].shape == (500, 15)
    assert encoded["multi_ids"].shape == (500, 1, 5)
    records = world.user_records(imp["user"][:3])
    assert records[0]["user_id"] == cols["user_id"][0]
    assert set(world.app_records([0])[0]) == {"app_id", "category", "developer", "price_band",
                                              "rating_band", "popularity", "size_mb"}  # fmt: skip


def test_requests_show_distinct_apps(world: SyntheticWorld) -> None:
    req = world.sample_requests(np.random.default_rng(5), 2_000, "2026-11-02", candidates=30)
    assert req.apps.shape == (2_000, 30)
    assert all(len(set(row)) == 30 for row in req.apps.tolist())
    assert (np.diff(req.hour * 3600 + req.second) >= 0).all()


def test_long_candidate_lists_are_distinct_and_popularity_weighted(world: SyntheticWorld
                                                                   ) -> None:
    """100 candidates out of the catalogue (the simulator's lists): each row distinct, and the
    most popular apps as often in a list as numpy's own draw without replacement puts them."""
    req = world.sample_requests(np.random.default_rng(6), 3_000, "2026-11-02", candidates=100)
    assert all(len(set(row)) == 100 for row in req.apps.tolist())
    rng = np.random.default_rng(7)
    popular = np.argsort(-world._app_p)[:10]
    reference = [np.isin(rng.choice(world.config.n_apps, 100, replace=False, p=world._app_p),
                         popular).sum() for _ in range(3_000)]
    ours = np.isin(req.apps, popular).sum(axis=1)
    se = np.sqrt(np.var(reference) / 3_000 + np.var(ours) / 3_000)
    assert abs(ours.mean() - np.mean(reference)) < 4 * se


# ---- the synth:DIR source ----------------------------------------------------------------------
def test_source_splits_by_day_and_chunks_check(logs: tuple[Path, dict]) -> None:
    path, _ = logs
    source = open_source(f"synth:{path}")
    assert isinstance(source, SyntheticSource)
    assert source.spec == SyntheticWorld.dataset_spec()
    days = {}
    for split in ("train", "valid", "test"):
        chunks = list(checked_chunks(source, split))
        days[split] = [Path(c.origin).name for c in chunks]
        assert set(chunks[0].table.column_names) == {*source.spec.names, "label"}
    assert days == {
        "train": ["day=2026-11-01.parquet", "day=2026-11-02.parquet"],
        "valid": ["day=2026-11-03.parquet"],
        "test": ["day=2026-11-04.parquet"],
    }
    described = source.describe()
    assert described["splits"]["train"]["first_day"] == "2026-11-01"
    assert described["splits"]["train"]["last_day"] == "2026-11-02"
    assert described["splits"]["test"]["files"] == ["day=2026-11-04.parquet"]
    assert described["seed"] == 7


def test_source_valid_and_test_days(logs: tuple[Path, dict]) -> None:
    source = SyntheticSource(str(logs[0]), valid_days=1, test_days=2)
    assert [len(source.days[s]) for s in ("train", "valid", "test")] == [1, 1, 2]
    with pytest.raises(DataError, match="need at least 5"):
        SyntheticSource(str(logs[0]), valid_days=2, test_days=2)


def test_source_errors(tmp_path: Path, logs: tuple[Path, dict]) -> None:
    with pytest.raises(DataError, match="no such file"):
        SyntheticSource(str(tmp_path / "absent"))
    with pytest.raises(DataError, match="world.json"):
        SyntheticSource(str(tmp_path))
    _write(tmp_path, days=2, per_day=100)
    with pytest.raises(DataError, match="2 day file"):
        SyntheticSource(str(tmp_path))
    with pytest.raises(DataError, match="unknown split"):
        list(SyntheticSource(str(logs[0])).chunks("holdout"))


def test_rewrite_replaces_old_days(tmp_path: Path) -> None:
    _write(tmp_path, days=4, per_day=100)
    _write(tmp_path, days=3, per_day=100)
    assert len(list((tmp_path / "impressions").glob("*.parquet"))) == 3
    with pytest.raises(ValueError, match="unknown WorldConfig keys"):
        write_synthetic_logs(tmp_path, days=1, progress=False, n_userz=5)
