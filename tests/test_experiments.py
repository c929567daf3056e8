"""A/B routing: the assignment hash, bucket ranges, config validation, and the scorer's arms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from scipy import stats

from ctrserve.cli import main
from ctrserve.features.hashing import fnv1a64_str
from ctrserve.service.experiments.assignment import (
    BUCKETS,
    Splitter,
    bucket,
    bucket_ends,
    buckets,
    fmix64,
)
from ctrserve.service.experiments.config import (
    ExperimentConfigError,
    load_experiments,
    parse_experiments,
)
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, World, copy_registry, direct_scores

REPO = Path(__file__).resolve().parents[1]
API_KEY = "exp-key"
USERS = [f"u{i:06d}" for i in range(100_000)]

# computed once with the documented hash; they must never change
GOLDEN = [
    ("exp1", "u00001", 8801),
    ("exp1", "u00002", 2850),
    ("exp1", "user-42", 6416),
    ("ranker-2026", "u00001", 5086),
    ("ranker-2026", "", 3690),
    ("s", "ü-ñ", 8919),
    ("salt with space", "12345", 5064),
    ("x", "a" * 100, 5822),
]

def splitter(weights: list[float], holdout: float = 0.0, salt: str = "s1",
             forced: dict[str, str] | None = None) -> Splitter:
    arms = [f"arm{i}" for i in range(len(weights))]
    return Splitter("e", salt, arms, bucket_ends(weights, holdout), arms[0], forced or {})


# ---- the hash ------------------------------------------------------------------------------
def test_golden_buckets_hold_here_vectorised_and_in_a_fresh_process():
    assert fnv1a64_str("") == 0xCBF29CE484222325  # the published FNV-1a 64 test vectors
    assert fnv1a64_str("a") == 0xAF63DC4C8601EC8C
    assert fnv1a64_str("foobar") == 0x85944171F73967E8
    assert fmix64(1) == 0xB456BCFC34C2CB2C  # MurmurHash3's fmix64
    for salt, user, expected in GOLDEN:
        assert bucket(salt, user) == expected
        assert buckets(salt, [user]).tolist() == [expected]
    code = ("import json, sys; from ctrserve.service.experiments.assignment import bucket; "
            "print(json.dumps([bucket(s, u) for s, u in json.loads(sys.argv[1])]))")
    pairs = json.dumps([[s, u] for s, u, _ in GOLDEN])
    out = subprocess.run([sys.executable, "-c", code, pairs], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout) == [b for _, _, b in GOLDEN]


def test_buckets_are_uniform_over_100k_users():
    b = buckets("uniformity", USERS)
    assert b.min() >= 0 and b.max() < BUCKETS
    assert (b[:2000] == [bucket("uniformity", u) for u in USERS[:2000]]).all()
    for ids in (USERS, [f"user-{i}" for i in range(100_000)], [str(i) for i in range(100_000)]):
        counts = np.bincount(buckets("uniformity", ids) // 100, minlength=100)
        assert stats.chisquare(counts).pvalue > 0.001
    shares = np.bincount(np.searchsorted(bucket_ends([0.5, 0.3, 0.2]), b, side="right"))
    np.testing.assert_allclose(shares / len(USERS), [0.5, 0.3, 0.2], atol=0.006)


# ---- ranges --------------------------------------------------------------------------------
def test_bucket_ends_are_exact_and_contiguous():
    assert bucket_ends([0.1, 0.2, 0.7]) == [1000, 3000, 10000]
    assert bucket_ends([0.9, 0.1]) == [9000, 10000]
    assert bucket_ends([0.5, 0.5], holdout=0.05) == [4750, 9500]
    assert bucket_ends([1 / 3, 1 / 3, 1 / 3]) == [3333, 6667, 10000]
    assert bucket_ends([1.0, 0.0]) == [10000, 10000]
    s = splitter([0.1, 0.2, 0.7])
    assert s.ranges() == {"arm0": (0, 1000), "arm1": (1000, 3000), "arm2": (3000, 10000)}
    assert [s.arm_of(b) for b in (0, 999, 1000, 2999, 3000, 9999)] == \
        ["arm0", "arm0", "arm1", "arm1", "arm2", "arm2"]


def test_ramp_from_10_to_20_percent_moves_only_the_boundary_users():
    before, after = splitter([0.9, 0.1]), splitter([0.8, 0.2])
    b = buckets("s1", USERS)
    old, new = before.arms_of(USERS), after.arms_of(USERS)
    moved = old != new
    assert (moved == ((b >= 8000) & (b < 9000))).all()
    assert set(old[moved]) == {"arm0"} and set(new[moved]) == {"arm1"}
    assert 0.09 < moved.mean() < 0.11


def test_a_new_salt_reshuffles_about_half_of_a_50_50_split():
    old = splitter([0.5, 0.5], salt="salt-a").arms_of(USERS)
    new = splitter([0.5, 0.5], salt="salt-b").arms_of(USERS)
    assert 0.49 < (old != new).mean() < 0.51


def test_holdout_takes_the_top_buckets_and_gets_control():
    s = splitter([0.5, 0.5], holdout=0.1)
    assert s.holdout_from == 9000
    held = [u for u in USERS[:5000] if bucket("s1", u) >= 9000]
    assert held and all(s.assign(u).holdout and s.assign(u).arm == "arm0" for u in held)
    assert 0.09 < (s.arms_of(USERS) == "").mean() < 0.11


def test_forced_assignment_wins_over_hash_and_holdout():
    plain = splitter([0.5, 0.5], holdout=0.2)
    users = {plain.assign(u).arm if not plain.assign(u).holdout else "holdout": u
             for u in USERS[:200]}
    forced = {users["arm0"]: "arm1", users["arm1"]: "arm0", users["holdout"]: "arm1"}
    s = splitter([0.5, 0.5], holdout=0.2, forced=forced)
    for user, arm in forced.items():
        a = s.assign(user)
        assert (a.arm, a.forced, a.holdout, a.bucket) == (arm, True, False, bucket("s1", user))
    assert list(s.arms_of(list(forced))) == list(forced.values())


# ---- config --------------------------------------------------------------------------------
def config(**changes) -> dict:
    exp = {"name": "ranker", "salt": "r1", "arms": [
        {"name": "control", "weight": 0.9, "bundle": "lr-1", "control": True},
        {"name": "deepfm", "weight": 0.1, "bundle": "deepfm-1"}]}
    return {"experiments": [{**exp, **changes}]}


@pytest.fixture()
def fake_registry(tmp_path) -> Path:
    for name in ("lr-1", "deepfm-1"):
        (tmp_path / name).mkdir()
    return tmp_path


def arms(*weights_and_flags) -> list[dict]:
    return [{"name": n, "weight": w, "bundle": "lr-1", **({"control": True} if c else {})}
            for n, w, c in weights_and_flags]


@pytest.mark.parametrize(("data", "loc", "words"), [
    (config(arms=arms(("a", 0.5, True), ("b", 0.4, False))), "experiments.0.arms",
     "add up to 0.9, not 1"),
    (config(arms=arms(("a", 50, True), ("b", 50, False))), "experiments.0.arms.0.weight",
     "less than or equal to 1"),
    (config(arms=arms(("a", 0.5, True), ("a", 0.5, False))), "experiments.0.arms",
     "duplicate arm names ['a']"),
    (config(arms=arms(("a", 0.5, False), ("b", 0.5, False))), "experiments.0.arms",
     "exactly one arm must have control: true, found 0"),
    (config(arms=arms(("a", 0.5, True), ("b", 0.5, True))), "experiments.0.arms",
     "found 2"),
    (config(salt=""), "experiments.0.salt", "at least 1 character"),
    (config(salt="  "), "experiments.0.salt", "must not be blank"),
    (config(holdout=1.0), "experiments.0.holdout", "less than 1"),
    (config(forced={"qa": "nope"}), "experiments.0.forced", "unknown arm 'nope'"),
    (config(arms=[{"name": "c", "weight": 1, "bundle": "lr-9", "control": True}]),
     "experiments.0.arms.0.bundle", "unknown bundle 'lr-9'"),
    (config(arms=[{"name": "c", "weight": 1, "bundle": "../lr-1", "control": True}]),
     "experiments.0.arms.0.bundle", "unknown bundle"),
    (config(name="bad name!"), "experiments.0.name", "pattern"),
    (config(colour="red"), "experiments.0.colour", "Extra inputs"),
    ({"experiments": config()["experiments"] * 2}, "experiments", "duplicate experiment"),
    ({"experiments": []}, "experiments", "at least 1 item"),
])
def test_config_errors_name_the_field(fake_registry, data, loc, words):
    with pytest.raises(ExperimentConfigError) as err:
        parse_experiments(data, fake_registry)
    assert ".".join(map(str, err.value.items[0]["loc"])) == loc
    assert words in err.value.items[0]["msg"]
    assert str(err.value).startswith(loc + ": ")


def test_config_loads_from_yaml_and_json(fake_registry, tmp_path):
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(config(holdout=0.05, forced={"qa": "deepfm"})))
    (tmp_path / "e.json").write_text(json.dumps(config()))
    for path in (tmp_path / "e.yaml", tmp_path / "e.json"):
        exps = load_experiments(path, fake_registry)
        assert exps.default == "ranker" and exps.bundles() == ["lr-1", "deepfm-1"]
    a, key = exps.assign(None, "u1")
    assert (a.experiment, key) == ("ranker", "lr-1" if a.arm == "control" else "deepfm-1")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ExperimentConfigError, match="not valid JSON"):
        load_experiments(tmp_path / "bad.json", fake_registry)


# ---- the scorer with two arms --------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(bundles, tmp_path_factory) -> Path:
    return copy_registry(bundles, tmp_path_factory.mktemp("exp-registry"), broken=True)


@pytest.fixture(scope="module")
def names(bundles) -> dict[str, str]:
    return {m: bundles[m].name for m in ("lr", "deepfm")}


def two_arms(names: dict[str, str], treatment: float = 0.5, **extra) -> dict:
    return {"experiments": [
        {"name": "ranker", "salt": "ranker-1", "forced": {"qa-deepfm": "deepfm"}, **extra,
         "arms": [{"name": "lr", "weight": 1 - treatment, "bundle": names["lr"],
                   "control": True},
                  {"name": "deepfm", "weight": treatment, "bundle": names["deepfm"]}]},
        {"name": "held", "salt": "held-1", "holdout": 0.5,
         "arms": [{"name": "control", "weight": 1.0, "bundle": names["lr"], "control": True}]},
    ]}


@pytest.fixture(scope="module")
def server(registry, names, synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp-server")
    redis_server = start_embedded(tmp / "store.rdb")
    load_tables(redis_server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(two_arms(names)))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(redis_server), admin_api_key=API_KEY,
                        max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1)
    try:
        with LiveServer(settings) as live:
            yield live
    finally:
        stop_embedded(redis_server)


def score(url: str, user: str, items: list[str], **extra) -> httpx.Response:
    body = {"user_id": user, "context": {"hour": 9, "weekday": 2},
            "candidates": [{"item_id": i} for i in items], **extra}
    return httpx.post(url + "/v1/score", json=body)


def version(registry: Path, name: str) -> str:
    return json.loads((registry / name / "manifest.json").read_text())["version"]


def test_each_arm_serves_its_own_bundle(server, registry, names, synth_dir):
    world = World(synth_dir)
    users, items = sorted(world.users)[:24], sorted(world.apps)[:12]
    seen = set()
    for user in users:
        body = {"user_id": user, "context": {"hour": 9, "weekday": 2},
                "candidates": [{"item_id": i} for i in items]}
        data = httpx.post(server.url + "/v1/score", json=body).json()
        arm = data["arm"]
        seen.add(arm)
        assert data["experiment"] == "ranker" and data["holdout"] is False
        assert data["model_version"] == version(registry, names[arm])
        expected = direct_scores(registry / names[arm], world.rows(body))
        np.testing.assert_allclose(data["scores"], expected, rtol=0, atol=1e-6)
        again = httpx.post(server.url + "/v1/score", json=body).json()
        assert again["arm"] == arm
        qa = httpx.get(server.url + "/v1/assignment", params={"user_id": user}).json()
        assert (qa["arm"], qa["bucket"]) == (arm, bucket("ranker-1", user))
    assert seen == {"lr", "deepfm"}


def test_forced_user_holdout_and_named_experiment(server, registry, names):
    forced = score(server.url, "qa-deepfm", ["a0001"]).json()
    assert (forced["arm"], forced["model_version"]) == ("deepfm", version(registry,
                                                                          names["deepfm"]))
    users = [f"h{i}" for i in range(40)]
    replies = [score(server.url, u, ["a0001"], experiment="held").json() for u in users]
    for user, data in zip(users, replies, strict=True):
        assert (data["experiment"], data["arm"]) == ("held", "control")
        assert data["holdout"] == (bucket("held-1", user) >= 5000)
        assert data["model_version"] == version(registry, names["lr"])
    assert {d["holdout"] for d in replies} == {True, False}
    unknown = score(server.url, "u1", ["a0001"], experiment="nope")
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == \
        ["body", "experiment"]


def test_experiments_listing_shows_bucket_ranges(server, registry, names):
    data = httpx.get(server.url + "/v1/experiments").json()
    assert (data["buckets"], data["default"]) == (10_000, "ranker")
    ranker, held = data["experiments"]
    assert [(a["name"], a["buckets"], a["control"]) for a in ranker["arms"]] == \
        [("lr", [0, 5000], True), ("deepfm", [5000, 10000], False)]
    assert ranker["arms"][1]["model_version"] == version(registry, names["deepfm"])
    assert ranker["forced"] == {"qa-deepfm": "deepfm"}
    assert (held["holdout_buckets"], held["arms"][0]["buckets"]) == ([5000, 10000], [0, 5000])
    missing = httpx.get(server.url + "/v1/assignment", params={"user_id": "u", "experiment": "x"})
    assert missing.status_code == 404


def test_admin_put_replaces_the_config_only_when_valid(server, names):
    url, key = server.url + "/admin/experiments", {"X-API-Key": API_KEY}
    before = httpx.get(server.url + "/v1/experiments").json()
    assert httpx.put(url, json=two_arms(names, 1.0)).status_code == 401
    assert httpx.put(url, json=two_arms(names, 1.0), headers={"X-API-Key": "no"}
                     ).status_code == 401
    bad = two_arms(names)
    bad["experiments"][0]["arms"][1]["weight"] = 0.7
    invalid = httpx.put(url, json=bad, headers=key)
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "experiments", 0, "arms"]
    broken = two_arms(names)
    broken["experiments"][0]["arms"][1]["bundle"] = "deepfm-broken"
    refused = httpx.put(url, json=broken, headers=key, timeout=60)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "experiments", 0, "arms", 1, "bundle"]
    syntax = httpx.put(url, content=b"{", headers=key)
    assert syntax.status_code == 422
    assert httpx.get(server.url + "/v1/experiments").json() == before
    users = [f"ramp{i}" for i in range(30)]
    try:
        ok = httpx.put(url, content=yaml.safe_dump(two_arms(names, 1.0)), timeout=60,
                       headers=key | {"Content-Type": "application/yaml"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["experiments"][0]["arms"][1]["buckets"] == [0, 10000]
        assert {score(server.url, u, ["a0001"]).json()["arm"] for u in users} == {"deepfm"}
    finally:
        restored = httpx.put(url, json=two_arms(names), headers=key, timeout=60)
    assert restored.status_code == 200
    arms = {score(server.url, u, ["a0001"]).json()["arm"] for u in users}
    assert arms == {"lr", "deepfm"}


def test_switching_to_a_new_bundle_set_unloads_the_old_ones(server, names):
    url, key = server.url + "/admin/experiments", {"X-API-Key": API_KEY}
    only_lr = {"experiments": [{"name": "solo", "salt": "s", "arms": [
        {"name": "lr", "weight": 1, "bundle": names["lr"], "control": True}]}]}
    try:
        assert httpx.put(url, json=only_lr, headers=key, timeout=60).status_code == 200
        assert set(server.app.state.models.models) == {names["lr"]}
        data = score(server.url, "u1", ["a0001"]).json()
        assert (data["experiment"], data["arm"]) == ("solo", "lr")
    finally:
        assert httpx.put(url, json=two_arms(names), headers=key, timeout=60).status_code == 200
    assert set(server.app.state.models.models) == {names["lr"], names["deepfm"]}


def test_cli_serve_refuses_a_bad_experiments_file_in_one_line(registry, names, tmp_path,
                                                              capsys):
    bad = two_arms(names)
    bad["experiments"][0]["arms"][1]["bundle"] = "missing-bundle"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    code = main(["serve", "--registry", str(registry), "--experiments",
                 str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "experiments.0.arms.1.bundle: unknown bundle 'missing-bundle'" in err
