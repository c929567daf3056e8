"""Namespaces: mutually exclusive experiments in one namespace, orthogonal ones across them."""

from __future__ import annotations

import json
import math
import time

import httpx
import numpy as np
import pytest
import yaml
from scipy import stats

from ctrserve.common.keys import TOTAL, arm_key
from ctrserve.service.experiments.assignment import BUCKETS, bucket, buckets
from ctrserve.service.experiments.config import (
    Canary,
    ExperimentConfigError,
    ExperimentSet,
    load_experiments,
    parse_experiments,
)
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

USERS = [f"u{i:06d}" for i in range(100_000)]
API_KEY = "ns-key"
SIGMAS = 4.5  # deterministic hashes: a fixed draw, so a wide binomial band


def experiment(name: str, namespace: str | None = None, start: float = 0.0, end: float = 1.0,
               bundles: tuple[str, str] = ("b", "b"), **extra) -> dict:
    exp = {"name": name, "salt": f"{name}-salt", **extra, "arms": [
        {"name": "control", "weight": 0.5, "bundle": bundles[0], "control": True},
        {"name": "treatment", "weight": 0.5, "bundle": bundles[1]}]}
    if namespace is not None:
        exp["namespace"] = {"name": namespace, "range": [start, end]}
    return exp


def parse(*experiments: dict) -> ExperimentSet:
    return parse_experiments({"experiments": list(experiments)}, None)


def refusal(*experiments: dict) -> ExperimentConfigError:
    with pytest.raises(ExperimentConfigError) as err:
        parse(*experiments)
    return err.value


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


def taken(exps: ExperimentSet, name: str) -> np.ndarray:
    """Which of USERS the experiment takes (arm or its own holdout)."""
    space = exps.splitter(name).namespace
    return np.ones(len(USERS), bool) if space is None else ~space.outside(USERS)


# ---- one namespace: disjoint, shares as configured ----------------------------------------
def test_experiments_of_one_namespace_never_share_a_user_and_take_their_ranges():
    ranges = {"a": (0.0, 0.2), "b": (0.2, 0.5), "c": (0.75, 1.0)}
    exps = parse(*(experiment(n, "search", s, e) for n, (s, e) in ranges.items()))
    inside = {n: taken(exps, n) for n in ranges}
    assert (sum(inside.values()) <= 1).all()  # nobody in two
    for name, (start, end) in ranges.items():
        assert within_binomial(int(inside[name].sum()), len(USERS), end - start), name
        arms = exps.splitter(name).arms_of(USERS)
        assert (arms[~inside[name]] == "").all()
        assert within_binomial(int((arms == "treatment").sum()), int(inside[name].sum()), 0.5)
    assert within_binomial(int((sum(inside.values()) == 0).sum()), len(USERS), 0.25)


def test_scalar_assignment_agrees_with_the_vectorised_one_and_names_the_namespace():
    exps = parse(experiment("a", "search", 0, 0.5), experiment("b", "search", 0.5, 1))
    users = USERS[:2000]
    ns = buckets("namespace:search", users)
    for name, vector in (("a", exps.splitter("a").arms_of(users)),
                         ("b", exps.splitter("b").arms_of(users))):
        start, end = exps.splitter(name).namespace.start, exps.splitter(name).namespace.end
        for user, expected, nb in zip(users, vector, ns, strict=True):
            a, _ = exps.assign(name, user)
            assert (a.namespace, a.namespace_bucket) == ("search", nb)
            assert a.bucket == bucket(f"{name}-salt", user)  # the arm split keeps its salt
            assert a.in_experiment == (start <= nb < end) == (not a.holdout)
            assert (a.arm if a.in_experiment else "") == expected
            assert a.arm == "control" or a.in_experiment


def test_a_user_outside_the_range_gets_control_flagged_holdout_and_no_canary():
    config = parse(experiment("a", "search", 0, 0.3)).config
    exps = ExperimentSet(config, canaries={("a", "control"): Canary("b-canary", 0.99)})
    outside = [u for u in USERS[:500] if not exps.assign("a", u)[0].in_experiment]
    assert outside
    for user in outside:
        a, key = exps.assign("a", user)
        assert (a.arm, a.holdout, a.canary, key) == ("control", True, False, "b")
    inside = [exps.assign("a", u) for u in USERS[:500] if u not in outside]
    assert any(a.canary and key == "b-canary" for a, key in inside)


def test_a_forced_user_wins_over_the_namespace():
    exps = parse(experiment("a", "search", 0, 0.01, forced={"qa-1": "treatment"}))
    assert bucket("namespace:search", "qa-1") >= 100  # outside [0, 100)
    a, _ = exps.assign("a", "qa-1")
    assert (a.arm, a.forced, a.in_experiment, a.holdout) == ("treatment", True, True, False)
    assert exps.splitter("a").arms_of(["qa-1"]).tolist() == ["treatment"]


def test_holdout_applies_within_the_range():
    exps = parse(experiment("a", "search", 0, 0.5, holdout=0.2))
    inside = taken(exps, "a")
    held = exps.splitter("a").arms_of(USERS)[inside] == ""
    assert within_binomial(int(held.sum()), int(inside.sum()), 0.2)


# ---- across namespaces: orthogonal --------------------------------------------------------
def test_experiments_in_different_namespaces_or_none_are_orthogonal():
    exps = parse(experiment("x", "search", 0, 0.5), experiment("y", "feed", 0.1, 0.5),
                 experiment("z"))
    in_x, in_y = taken(exps, "x"), taken(exps, "y")
    arm_x, arm_z = exps.splitter("x").arms_of(USERS), exps.splitter("z").arms_of(USERS)
    for rows, cols in ((in_x, in_y), (in_x, arm_z), (arm_x[in_x], arm_z[in_x]),
                       (in_y, arm_z)):
        table = np.array([[np.sum((rows == r) & (cols == c)) for c in np.unique(cols)]
                          for r in np.unique(rows)])
        assert table.shape == (2, 2) and stats.chi2_contingency(table).pvalue > 1e-3, table
    assert within_binomial(int((in_x & in_y).sum()), len(USERS), 0.5 * 0.4)


def test_namespace_buckets_are_uniform_and_independent_per_name():
    search, feed = buckets("namespace:search", USERS), buckets("namespace:feed", USERS)
    for b in (search, feed):
        assert stats.chisquare(np.bincount(b // 100, minlength=100)).pvalue > 1e-3
    joint = np.histogram2d(search // 2000, feed // 2000, bins=5)[0]
    assert stats.chi2_contingency(joint).pvalue > 1e-3


# ---- without a namespace: exactly as before ------------------------------------------------
def test_experiments_without_a_namespace_keep_their_assignments():
    plain = parse(experiment("z"))
    mixed = parse(experiment("z"), experiment("a", "search", 0, 0.5),
                  experiment("b", "search", 0.5, 1))
    users = USERS[:3000]
    np.testing.assert_array_equal(plain.splitter("z").arms_of(USERS),
                                  mixed.splitter("z").arms_of(USERS))
    for user in users:
        a, _ = mixed.assign("z", user)
        assert a == plain.assign("z", user)[0]
        assert a.arm == ("control" if bucket("z-salt", user) < 5000 else "treatment")
        assert (a.namespace, a.namespace_bucket, a.in_experiment) == (None, None, True)


# ---- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(("ranges", "overlap"), [
    (((0, 0.5), (0.4, 1)), "[0.4, 0.5)"),
    (((0.2, 0.6), (0.3, 0.4)), "[0.3, 0.4)"),
    (((0.1, 0.3), (0.1, 0.3)), "[0.1, 0.3)"),
    (((0.5, 1), (0, 0.75)), "[0.5, 0.75)"),
])
def test_overlapping_ranges_are_refused_naming_both_experiments(ranges, overlap):
    (s1, e1), (s2, e2) = ranges
    err = refusal(experiment("first", "search", s1, e1), experiment("other"),
                  experiment("second", "search", s2, e2))
    item = err.items[0]
    assert item["loc"] == ["experiments"]
    for words in ("'first' (experiments.0", "'second' (experiments.2", "namespace 'search'",
                  f"on {overlap}"):
        assert words in item["msg"]


def test_adjacent_ranges_and_equal_ranges_of_other_namespaces_are_accepted():
    exps = parse(experiment("a", "search", 0, 0.5), experiment("b", "search", 0.5, 1),
                 experiment("c", "feed", 0, 0.5), experiment("d", "feed", 0.5, 1))
    assert list(exps.splitters) == ["a", "b", "c", "d"]
    assert (exps.splitter("a").namespace.end, exps.splitter("b").namespace.start) == (5000, 5000)


def test_every_overlap_is_named():
    err = refusal(experiment("a", "s", 0, 0.6), experiment("b", "s", 0.5, 0.8),
                  experiment("c", "s", 0.7, 1))
    msg = err.items[0]["msg"]
    assert "'a' (experiments.0" in msg and "on [0.5, 0.6)" in msg
    assert "'c' (experiments.2" in msg and "on [0.7, 0.8)" in msg


@pytest.mark.parametrize(("namespace", "loc", "words"), [
    ({"name": "s", "range": [0.5, 0.4]}, "namespace.range", "start 0.5 must be below its end"),
    ({"name": "s", "range": [0.5, 0.5]}, "namespace.range", "must be below its end 0.5"),
    ({"name": "s", "range": [-0.1, 0.5]}, "namespace.range", "start -0.1 must be in [0, 1)"),
    ({"name": "s", "range": [0, 1.5]}, "namespace.range", "end 1.5 must be in (0, 1]"),
    ({"name": "s", "range": [0, 0.00001]}, "namespace.range", "holds none of the 10000"),
    ({"name": "s", "range": [0.5]}, "namespace.range.1", "Field required"),
    ({"name": "s", "range": [0, 0.5, 1]}, "namespace.range", "at most 2 items"),
    ({"name": "s", "range": ["a", 1]}, "namespace.range.0", "valid number"),
    ({"range": [0, 1]}, "namespace.name", "Field required"),
    ({"name": "bad name!", "range": [0, 1]}, "namespace.name", "pattern"),
    ({"name": "s", "range": [0, 1], "salt": "x"}, "namespace.salt", "Extra inputs"),
    ("search", "namespace", "valid dictionary"),
])
def test_namespace_errors_name_the_field(namespace, loc, words):
    err = refusal({**experiment("a"), "namespace": namespace})
    assert ".".join(map(str, err.items[0]["loc"])) == "experiments.0." + loc
    assert words in err.items[0]["msg"]


def test_a_salt_equal_to_a_namespace_salt_is_refused():
    err = refusal(experiment("a", "search", 0, 0.5), experiment("b", salt="namespace:search"))
    assert err.items[0]["loc"] == ["experiments"]
    assert "'b' (experiments.1) has the salt 'namespace:search' of namespace 'search'" in \
        err.items[0]["msg"]


def test_namespaces_load_from_yaml_and_json(tmp_path):
    data = {"experiments": [experiment("a", "search", 0, 0.25), experiment("b")]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "e.json").write_text(json.dumps(data))
    for path in (tmp_path / "e.yaml", tmp_path / "e.json"):
        space = load_experiments(path, None).splitter("a").namespace
        assert (space.name, space.start, space.end, space.salt) == \
            ("search", 0, 2500, "namespace:search")


# ---- over HTTP -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def names(bundles) -> tuple[str, str]:
    return bundles["lr"].name, bundles["deepfm"].name


def served_config(names: tuple[str, str]) -> dict:
    return {"experiments": [experiment("plain", bundles=names),
                            experiment("left", "ranking", 0, 0.5, bundles=names),
                            experiment("right", "ranking", 0.5, 1, bundles=names)]}


@pytest.fixture(scope="module")
def store(synth_dir, tmp_path_factory):
    server = start_embedded(tmp_path_factory.mktemp("ns-redis") / "store.rdb")
    load_tables(server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    yield server
    stop_embedded(server)


@pytest.fixture(scope="module")
def server(bundles, names, store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ns-server")
    registry = copy_registry(bundles, tmp_path_factory.mktemp("ns-registry"))
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(served_config(names)))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(store), admin_api_key=API_KEY,
                        max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1)
    with LiveServer(settings) as live:
        yield live


def in_left(user: str) -> bool:
    return bucket("namespace:ranking", user) < BUCKETS // 2


def test_assignment_lists_every_experiment_of_the_user(server):
    for user in USERS[:40]:
        qa = httpx.get(server.url + "/v1/assignment", params={"user_id": user}).json()
        assert (qa["experiment"], qa["in_experiment"], qa["namespace"]) == ("plain", True, None)
        listed = {e["experiment"]: e for e in qa["experiments"]}
        assert list(listed) == ["plain", "left", "right"]
        assert listed["plain"]["arm"] == qa["arm"] and listed["plain"]["bucket"] == qa["bucket"]
        left, right = listed["left"], listed["right"]
        assert (left["in_experiment"], right["in_experiment"]) == (in_left(user),
                                                                   not in_left(user))
        nb = bucket("namespace:ranking", user)
        assert left["namespace"] == right["namespace"] == "ranking"
        assert left["namespace_bucket"] == right["namespace_bucket"] == nb
        outside = right if in_left(user) else left
        assert (outside["arm"], outside["holdout"]) == ("control", True)
        named = httpx.get(server.url + "/v1/assignment",
                          params={"user_id": user, "experiment": "left"}).json()
        assert {k: named[k] for k in left} == left and named["experiments"] == qa["experiments"]


def test_experiments_listing_shows_the_namespace(server):
    described = {e["name"]: e for e in httpx.get(server.url + "/v1/experiments").json()[
        "experiments"]}
    assert described["plain"]["namespace"] is None
    assert described["right"]["namespace"] == {"name": "ranking", "salt": "namespace:ranking",
                                               "range": [0.5, 1.0], "buckets": [5000, 10000]}


def test_a_user_outside_the_range_is_served_by_control_and_not_counted(server, store, names):
    outside = next(u for u in USERS if not in_left(u))
    inside = next(u for u in USERS if in_left(u))
    items = ["a0001", "a0002", "a0003"]
    replies = {u: score(server.url, u, items) for u in (outside, inside)}
    assert (replies[outside]["arm"], replies[outside]["holdout"]) == ("control", True)
    assert replies[inside]["holdout"] is False

    def impressions() -> dict[str, int]:
        return {arm: int(store.hget(arm_key("left", TOTAL, arm, "sums"), "impressions") or 0)
                for arm in ("control", "treatment")}

    before = impressions()
    events = [{"event_id": f"ns-{u}", "type": "impression", "request_id": r["request_id"],
               "attribution": r["attribution"], "user_id": u, "ts": time.time(),
               "items": [{"item_id": i, "position": p} for p, i in enumerate(items, 1)]}
              for u, r in replies.items()]
    sent = httpx.post(server.url + "/v1/events", json={"events": events}).json()
    assert [r["status"] for r in sent["results"]] == ["accepted", "accepted"]
    after = impressions()
    moved = {arm: after[arm] - before[arm] for arm in after}
    assert moved == {arm: len(items) if arm == replies[inside]["arm"] else 0 for arm in moved}


def score(url: str, user: str, items: list[str]) -> dict:
    body = {"user_id": user, "experiment": "left", "context": {"hour": 9, "weekday": 2},
            "candidates": [{"item_id": i} for i in items]}
    reply = httpx.post(url + "/v1/score", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_admin_put_refuses_overlapping_ranges_naming_both(server, names):
    bad = served_config(names)
    bad["experiments"][2]["namespace"]["range"] = [0.4, 1]
    before = httpx.get(server.url + "/v1/experiments").json()
    refused = httpx.put(server.url + "/admin/experiments", json=bad,
                        headers={"X-API-Key": API_KEY})
    assert refused.status_code == 422
    item = refused.json()["detail"][0]
    assert item["loc"] == ["body", "experiments"]
    assert "'left'" in item["msg"] and "'right'" in item["msg"] and "[0.4, 0.5)" in item["msg"]
    assert httpx.get(server.url + "/v1/experiments").json() == before
