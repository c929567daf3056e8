"""CTRSERVE_CLOCK: which clock dates a scored request for its A/B day bucket.

Two scorers on one real embedded Redis, one with clock=client and one with the default server
clock; each test uses its own experiment so their counts stay apart.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from ctrserve.common.keys import log_key
from ctrserve.loadtest.simulator import SimConfig, default_start_day, simulate
from ctrserve.service.attribution import utc_day
from ctrserve.service.event_log import drain, read_log
from ctrserve.service.experiments.stats import ArmStats, report
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

ITEMS = [f"a{i:04d}" for i in range(1, 11)]
# the request's `ts` as sent, and the UTC day it stands for
WHEN = {"2026-01-05": 1767607200,  # 2026-01-05T10:00:00Z as epoch seconds
        "2026-01-06": "2026-01-07T01:30:00+02:00",  # 23:30Z the day before
        "2026-01-07": "2026-01-07T12:00:00Z"}
# (day, user, items shown, downloads among them)
PLAN = [("2026-01-05", "u00001", 3, 1), ("2026-01-05", "u00002", 2, 0),
        ("2026-01-05", "u00001", 4, 2), ("2026-01-06", "u00001", 1, 0),
        ("2026-01-06", "u00003", 3, 1), ("2026-01-07", "u00004", 5, 2),
        ("2026-01-07", "u00002", 2, 1), ("2026-01-07", "u00005", 3, 0)]


@pytest.fixture(scope="module")
def store(synth_dir, tmp_path_factory):
    server = start_embedded(tmp_path_factory.mktemp("clock-redis") / "store.rdb")
    load_tables(server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    yield server
    stop_embedded(server)


@pytest.fixture(scope="module")
def scorers(bundles, store, tmp_path_factory):
    """{"client": url, "server": url}: the same experiments, the two clocks."""
    tmp = tmp_path_factory.mktemp("clock")
    registry = copy_registry(bundles, tmp / "registry")
    arms = [{"name": "lr", "weight": 0.5, "bundle": bundles["lr"].name, "control": True},
            {"name": "deepfm", "weight": 0.5, "bundle": bundles["deepfm"].name}]
    config = {"experiments": [{"name": n, "salt": f"{n}-1", "arms": arms}
                              for n in ("week", "today", "sim")]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    common = dict(registry=registry, experiments_file=tmp / "experiments.yaml",
                  redis_url=embedded_url(store), max_candidates=100, warmup_rounds=1)
    with (LiveServer(Settings(clock="client", **common)) as client,
          LiveServer(Settings(**common)) as server):
        yield {"client": client.url, "server": server.url}


def replay(url: str, experiment: str) -> tuple[dict, list[tuple[str, dict]]]:
    """PLAN scored and reported on `experiment`: expected {day: {arm: counts}}, the replies."""
    expected: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(
        lambda: {"impressions": 0, "downloads": 0, "users": set()}))
    replies = []
    for n, (day, user, shown, downloads) in enumerate(PLAN):
        body = {"user_id": user, "experiment": experiment, "top_k": shown, "ts": WHEN[day],
                "candidates": [{"item_id": i} for i in ITEMS]}
        reply = httpx.post(url + "/v1/score", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        # events follow the request by the clock that dated it (the reply's ts)
        proof = {"attribution": data["attribution"], "request_id": data["request_id"],
                 "user_id": user, "ts": data["ts"] + 1}
        items = data["item_ids"]
        events = [{"event_id": f"{experiment}-{n}-i", "type": "impression", **proof,
                   "items": [{"item_id": i, "position": p} for p, i in enumerate(items, 1)]}]
        events += [{"event_id": f"{experiment}-{n}-d{j}", "type": "download", **proof,
                    "item_id": items[j]} for j in range(downloads)]
        out = httpx.post(url + "/v1/events", json={"events": events}).json()
        assert out["accepted"] == len(events), out
        counts = expected[day][data["arm"]]
        counts["impressions"] += shown
        counts["downloads"] += downloads
        counts["users"].add(user)
        per_user = expected["all"][data["arm"]].setdefault("per_user", defaultdict(
            lambda: [0, 0]))
        per_user[user][0] += shown
        per_user[user][1] += downloads
        replies.append((day, data))
    return expected, replies


def served_records(store, experiment: str) -> dict[str, dict]:
    """request id -> its serve-log record, from the arms' streams (not yet drained)."""
    records = {}
    for arm in ("lr", "deepfm"):
        for _, fields in store.xrange(log_key(experiment, arm, "serve")):
            record = json.loads(fields[b"r"])
            records[record["request_id"]] = record
    return records


def arm_counts(rep: dict) -> dict[str, tuple[int, int, int]]:
    return {arm: (a["impressions"], a["downloads"], a["users"]) for arm, a in rep["arms"].items()}


def test_client_clock_counts_each_request_in_its_own_day(scorers, store, tmp_path):
    expected, replies = replay(scorers["client"], "week")
    rep = httpx.get(scorers["client"] + "/v1/experiments/week/report").json()
    assert sorted(rep["days"]) == sorted(WHEN)
    # over the days, each user once: exactly the user-level sums of the users' totals
    totals = expected.pop("all")
    stats = {arm: ArmStats.from_user_arrays([x for x, _ in totals[arm]["per_user"].values()],
                                            [y for _, y in totals[arm]["per_user"].values()])
             for arm in ("lr", "deepfm")}
    assert rep["total"] == report(stats, "lr", {"lr": 0.5, "deepfm": 0.5})
    for day, by_arm in expected.items():
        got = arm_counts(rep["days"][day])
        for arm in ("lr", "deepfm"):
            c = by_arm.get(arm, {"impressions": 0, "downloads": 0, "users": set()})
            assert got[arm] == (c["impressions"], c["downloads"], len(c["users"])), (day, arm)
    total = arm_counts(rep["total"])
    for arm in ("lr", "deepfm"):
        days = [rep["days"][d]["arms"][arm] for d in WHEN]
        assert total[arm][:2] == (sum(d["impressions"] for d in days),
                                  sum(d["downloads"] for d in days))
        assert total[arm][2] == len({u for d in expected.values() for u in d[arm]["users"]})
    assert sum(t[0] for t in total.values()) == sum(shown for _, _, shown, _ in PLAN)
    # the serve log carries the client's time; the logs are partitioned by its day
    records = served_records(store, "week")
    for day, data in replies:
        record = records[data["request_id"]]
        assert record["day"] == day == utc_day(record["ts"]) == utc_day(data["ts"])
        assert record["client_ts"] == record["ts"]
    drain(store, tmp_path / "log")
    log = [r for r in read_log(tmp_path / "log").to_pylist() if r["experiment"] == "week"]
    by_request = {data["request_id"]: day for day, data in replies}
    assert {(r["request_id"], r["day"]) for r in log} == set(by_request.items())
    assert {p.name for p in (tmp_path / "log").iterdir()} >= {f"day={d}" for d in WHEN}


def test_server_clock_counts_today_and_records_the_client_ts(scorers, store):
    before = utc_day(time.time())
    started = time.time()
    _, replies = replay(scorers["server"], "today")
    after = utc_day(time.time())
    rep = httpx.get(scorers["server"] + "/v1/experiments/today/report").json()
    assert set(rep["days"]) <= {before, after}
    total = arm_counts(rep["total"])
    assert sum(t[0] for t in total.values()) == sum(shown for _, _, shown, _ in PLAN)
    records = served_records(store, "today")
    for day, data in replies:
        record = records[data["request_id"]]
        sent = WHEN[day]
        client_ts = sent if isinstance(sent, int) else dt.datetime.fromisoformat(sent).timestamp()
        assert record["client_ts"] == client_ts
        assert record["day"] in {before, after} and started <= record["ts"] <= time.time()


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "-Infinity", "1e400", "-1", "1e20", "true",
                                '"yesterday"', '"1767607200"', '"2026-01-05T10:00:00"',
                                '"2026-01-05"', "[1767607200]"])
def test_bad_ts_is_a_422_naming_ts(scorers, ts):
    body = '{"user_id": "u00001", "candidates": [{"item_id": "a0001"}], "ts": ' + ts + "}"
    for url in scorers.values():
        reply = httpx.post(url + "/v1/score", content=body.encode(),
                           headers={"content-type": "application/json"})
        assert reply.status_code == 422, reply.text
        assert ["body", "ts"] in [d["loc"] for d in reply.json()["detail"]], reply.json()


def test_client_clock_refuses_a_request_dated_in_the_future(scorers):
    """A far-future ts would become an A/B day and the retrain's test day (issue 12)."""
    body = {"user_id": "u00001", "candidates": [{"item_id": "a0001"}],
            "ts": "9999-12-31T00:00:00Z"}
    reply = httpx.post(scorers["client"] + "/v1/score", json=body)
    assert reply.status_code == 422 and "future" in reply.text
    assert reply.json()["detail"][0]["loc"] == ["body", "ts"]
    assert httpx.post(scorers["server"] + "/v1/score", json=body).status_code == 200


def test_clock_setting_reads_the_environment(monkeypatch):
    assert Settings().clock == "server"
    monkeypatch.setenv("CTRSERVE_CLOCK", "client")
    assert Settings().clock == "client"
    monkeypatch.setenv("CTRSERVE_CLOCK", "local")
    with pytest.raises(ValidationError, match="clock"):
        Settings()


def test_simulated_days_match_the_server_report_day_by_day(scorers, synth_dir: Path):
    cfg = SimConfig(url=scorers["client"], days=2, requests_per_day=40, candidates=(20, 30),
                    top_k=5, concurrency=4, seed=5, duplicate_rate=0.05, event_batch=20,
                    experiment="sim", max_seconds=60)
    summary = simulate(synth_dir, cfg)
    assert summary["requests"]["answered"] == 80 and summary["events"]["rejected"] == 0
    start = default_start_day(synth_dir)
    days = [(start + dt.timedelta(days=i)).isoformat() for i in range(2)]
    rep = httpx.get(scorers["client"] + "/v1/experiments/sim/report").json()
    assert sorted(rep["days"]) == sorted(summary["days"]) == days
    for day in days:
        for arm, server in rep["days"][day]["arms"].items():
            client = summary["days"][day].get(arm, {})
            got = (server["impressions"], server["downloads"], server["users"])
            assert got == tuple(client.get(k, 0) for k in ("impressions", "downloads",
                                                           "users")), (day, arm)
