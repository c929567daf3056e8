"""The DuckDB report over the drained Parquet logs equals the online counters' report.

Real traffic: a live scorer (uvicorn) on a real embedded Redis, driven by the simulator over
three simulated days (client clock) with duplicate deliveries and a holdout, plus events the
scorer rejects; the logs drained to Parquet (in small chunks, one file then written twice as a
crashed drain would); then `ctrserve analyze` against `ctrserve report`, count for count.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import httpx
import pytest
import yaml

from ctrserve.cli import main
from loadtest.simulator import SimConfig, simulate
from service import counts
from service.event_log import drain, read_log, read_serve_log
from service.experiments import warehouse
from service.experiments.list_metrics import list_metrics
from service.feature_store import load_tables
from service.redis_server import embedded_url, start_embedded, stop_embedded
from service.settings import Settings
from tests.serving import LiveServer, copy_registry

WEIGHTS = {"lr": 0.5, "deepfm": 0.5}


@pytest.fixture(scope="module")
def traffic(bundles, synth_dir, tmp_path_factory):
    """(Redis client, its URL, the experiments file, the drained logs, the simulation)."""
    tmp = tmp_path_factory.mktemp("warehouse")
    store = start_embedded(tmp / "store.rdb")
    load_tables(store, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    registry = copy_registry(bundles, tmp / "registry")
    arms = [{"name": "lr", "weight": 0.5, "bundle": bundles["lr"].name, "control": True},
            {"name": "deepfm", "weight": 0.5, "bundle": bundles["deepfm"].name}]
    config = {"experiments": [{"name": "wh", "salt": "wh-1", "holdout": 0.2, "arms": arms}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(clock="client", registry=registry,
                        experiments_file=tmp / "experiments.yaml", redis_url=embedded_url(store),
                        max_candidates=100, warmup_rounds=1)
    try:
        with LiveServer(settings) as server:
            cfg = SimConfig(url=server.url, days=3, requests_per_day=60, candidates=(12, 20),
                            top_k=6, concurrency=4, seed=11, duplicate_rate=0.15,
                            event_batch=25, experiment="wh", max_seconds=120)
            summary = simulate(synth_dir, cfg)
            rejected = send_rejected_events(server.url)
        logs = tmp / "logs"
        drain(store, logs, chunk=37)
        rewrite_one_file(logs)
        yield store, embedded_url(store), tmp / "experiments.yaml", logs, summary, rejected
    finally:
        stop_embedded(store)


def send_rejected_events(url: str) -> dict:
    """A forged token and an item the request did not serve: rejected, so neither counted nor
    logged; the valid impression beside them is sent twice (the second a duplicate)."""
    body = {"user_id": "u00001", "experiment": "wh", "top_k": 2,  # today, by the server
            "candidates": [{"item_id": "a0001"}, {"item_id": "a0002"}, {"item_id": "a0003"}]}
    data = httpx.post(url + "/v1/score", json=body).json()
    proof = {"attribution": data["attribution"], "user_id": "u00001", "ts": data["ts"] + 1}
    shown = [{"item_id": i, "position": p} for p, i in enumerate(data["item_ids"], 1)]
    unserved = next(c["item_id"] for c in body["candidates"] if c["item_id"]
                    not in data["item_ids"])
    events = [{"event_id": "forged", "type": "impression", **proof, "items": shown,
               "attribution": data["attribution"][:-4] + "AAAA"},
              {"event_id": "unserved", "type": "download", **proof, "item_id": unserved},
              {"event_id": "valid", "type": "impression", **proof, "items": shown}]
    first = httpx.post(url + "/v1/events", json={"events": events}).json()
    again = httpx.post(url + "/v1/events", json={"events": events[2:]}).json()
    return {"first": first, "again": again}


def rewrite_one_file(logs) -> None:
    """A drain that crashed after writing a file and before trimming writes its entries again
    under another name when its next chunk starts elsewhere: the same rows twice."""
    path = sorted(logs.glob("day=*/events-wh-*.parquet"))[0]
    shutil.copy(path, path.with_name(path.stem + "-again.parquet"))


def test_the_traffic_has_what_the_rules_are_about(traffic):
    _, _, _, logs, summary, rejected = traffic
    assert summary["requests"]["answered"] == 180
    assert summary["events"]["duplicate"] > 0 and summary["events"]["rejected"] == 0
    assert rejected["first"]["rejected"] == 2 and rejected["again"]["duplicate"] == 1
    events = read_log(logs)
    assert any(events["holdout"].to_pylist())  # holdout users' events are logged
    assert len(events) > len(set(events["stream_id"].to_pylist()))  # a file drained twice
    assert not set(events["event_id"].to_pylist()) & {"forged", "unserved"}


def test_duckdb_report_equals_the_online_report_per_arm_and_day(traffic):
    client, _, _, logs, _, _ = traffic
    online = counts.build_report(client, "wh", "lr", WEIGHTS)
    offline = warehouse.build_report(warehouse.open_logs(logs), "wh", "lr", WEIGHTS)
    assert len(online["days"]) >= 3
    assert offline == online  # every count, sum and statistic, every day and the total
    arms = online["total"]["arms"]
    assert all(arms[a]["users"] > 0 and arms[a]["downloads"] > 0 for a in WEIGHTS)


def test_analyze_command_equals_report_command(traffic, monkeypatch, capsys):
    _, url, experiments_file, logs, _, _ = traffic
    monkeypatch.setenv("REDIS_URL", url)
    assert main(["report", "--experiment", "wh", "--json"]) == 0
    online = json.loads(capsys.readouterr().out)
    assert main(["analyze", "--logs", str(logs), "--experiment", "wh", "--experiments",
                 str(experiments_file), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert {k: offline[k] for k in online} == online
    assert offline["source"]["dead_letters"] == {"events": 0, "serve": 0}
    # without --experiments, the arms come from the config the scorer left in Redis
    assert main(["analyze", "--logs", str(logs), "--experiment", "wh"]) == 0
    text = capsys.readouterr().out
    assert "wh total" in text and "personalization@L" in text


def test_list_metrics_cover_every_non_holdout_user_of_the_serve_log(traffic):
    _, _, _, logs, _, _ = traffic
    metrics = list_metrics(warehouse.open_logs(logs), "wh", top=10)
    users, longest = defaultdict(set), defaultdict(int)
    for r in read_serve_log(logs).to_pylist():
        if r["experiment"] == "wh" and not r["holdout"]:
            users[(r["day"], r["arm"])].add(r["user_id"])
            longest[(r["day"], r["arm"])] = max(longest[(r["day"], r["arm"])], len(r["items"]))
    got = {(d, a): m for d, by_arm in metrics["days"].items() for a, m in by_arm.items()}
    assert {k: m["users"] for k, m in got.items()} == {k: len(v) for k, v in users.items()}
    # L 10 is capped at the lists' length: top_k 6 in the simulation (2 in the extra request)
    assert {k: m["top"] for k, m in got.items()} == longest
    for m in [*got.values(), *metrics["total"].values()]:
        assert 0 <= m["coverage"] <= 1 and 0 <= m["popularity"] <= 1
        assert m["personalization"] is None or 0 <= m["personalization"] <= 1
