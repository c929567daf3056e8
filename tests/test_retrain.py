"""`ctrserve retrain` end to end: simulated traffic -> drained event log -> gated deploy."""

from __future__ import annotations

import json
import time

import httpx
import pyarrow as pa
import pytest
import yaml

from ctrserve.cli import main
from loadtest.simulator import SimConfig, simulate
from service.deployments import HISTORY_KEY, state_key
from service.feature_store import load_tables
from service.redis_server import embedded_url, start_embedded, stop_embedded
from service.settings import Settings
from tests.serving import LiveServer, World, copy_registry
from training.data.events import EventLogSource, event_day
from training.data.source import DataError

DAYS, PER_DAY = 3, 150
LOOSE = ["--auc-tolerance", "0.5", "--logloss-tolerance", "0.5", "--calibration-bounds",
         "0.2,5"]


@pytest.fixture(scope="module")
def world(bundles, synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    registry = copy_registry(bundles, tmp / "registry")
    db = tmp / "store.rdb"
    redis_server = start_embedded(db)
    load_tables(redis_server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    config = {"experiments": [{"name": "ranker", "salt": "rt-1", "arms": [
        {"name": "lr", "weight": 0.5, "bundle": bundles["lr"].name, "control": True},
        {"name": "deepfm", "weight": 0.5, "bundle": bundles["deepfm"].name}]}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(redis_server), deploy_poll_s=0.2,
                        max_candidates=100, warmup_rounds=1)
    try:
        with LiveServer(settings) as live:
            cfg = SimConfig(url=live.url, days=DAYS, requests_per_day=PER_DAY,
                            candidates=(20, 30), top_k=10, concurrency=8, seed=5,
                            duplicate_rate=0.02, event_batch=40, max_seconds=60)
            summary = simulate(synth_dir, cfg)
            w = {"server": live, "registry": registry, "db": db, "redis": redis_server,
                 "events": tmp / "events", "summary": summary, "tmp": tmp}
            assert cli(w, "drain-events", "--out", str(w["events"])) == 0
            yield w
    finally:
        stop_embedded(redis_server)


def cli(world: dict, *args: str) -> int:
    return main([*args, "--registry", str(world["registry"]), "--redis-db", str(world["db"])])


def retrain_cli(world: dict, arm: str, *extra: str) -> int:
    return cli(world, "retrain", "--experiment", "ranker", "--arm", arm, "--events",
               str(world["events"]), "--epochs", "2", *extra)


def served_version(url: str, arm_bundle_version: str, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(url + "/v1/models").json()["models"]
        if arm_bundle_version in {m["version"] for m in models}:
            return True
        time.sleep(0.1)
    return False


def test_event_log_source_rows_labels_and_days(world, bundles, synth_dir):
    spec = json.loads((bundles["lr"] / "manifest.json").read_text())["encoder"]["dataset"]
    source = EventLogSource(world["events"], 7, spec, experiment="ranker",
                            item_records=World(synth_dir).apps)
    assert [len(source.days[s]) for s in ("train", "valid", "test")] == [DAYS - 2, 1, 1]
    summary = world["summary"]
    rows = sum(c.table.num_rows for s in ("train", "valid", "test") for c in source.chunks(s))
    positives = sum(int(pa.compute.sum(c.table.column("label")).as_py() or 0)
                    for s in ("train", "valid", "test") for c in source.chunks(s))
    arms = summary["arms"].values()
    assert rows == sum(a["impressions"] for a in arms)
    assert positives == sum(a["downloads"] for a in arms)
    test = next(source.chunks("test")).table
    assert set(test.column("slot").to_pylist()) == set(range(1, 11))
    assert test.column("category").null_count == 0  # item records joined
    assert source.last_day.isoformat() == max(summary["days"])
    with pytest.raises(DataError, match="no such event log"):
        EventLogSource(world["tmp"] / "nothing", 7, spec)
    assert event_day("2026-01-05T23:59:59+00:00").isoformat() == "2026-01-05"
    assert event_day(1767600000).isoformat() == "2026-01-05"


def test_retrain_deploys_a_challenger_and_the_scorer_serves_it(world, bundles, capsys):
    assert retrain_cli(world, "lr", *LOOSE) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["decision"] == "deployed", record
    for step in ("champion:", "data:", "train:", "export:", "evaluate:", "gate: passed",
                 "deploy:"):
        assert step in captured.err
    name = record["challenger"]["bundle"]
    client = world["redis"]
    assert client.hget(state_key("ranker"), "lr").decode() == name
    last = json.loads(client.lindex(HISTORY_KEY, -1))
    assert (last["from"], last["to"]) == (bundles["lr"].name, name)
    assert record["key"] in last["why"]
    assert set(record["metrics"]) == {"champion", "challenger"}
    saved = world["registry"] / ".retrain" / f"{record['key']}.json"
    assert json.loads(saved.read_text())["decision"] == "deployed"
    assert served_version(world["server"].url, record["challenger"]["version"])


def test_the_same_retrain_twice_does_not_train_or_deploy_twice(world, capsys):
    history = world["redis"].llen(HISTORY_KEY)
    assert retrain_cli(world, "lr", *LOOSE) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] is True
    assert "already ran" in captured.err and "train:" not in captured.err
    assert world["redis"].llen(HISTORY_KEY) == history


def test_a_challenger_on_shuffled_labels_is_rejected_and_the_champion_keeps_serving(
        world, bundles, capsys):
    client = world["redis"]
    history = client.llen(HISTORY_KEY)
    assert retrain_cli(world, "deepfm", "--shuffle-labels") == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["decision"] == "rejected" and record["gate"]["reasons"], record
    assert "gate: rejected" in captured.err
    assert client.hget(state_key("ranker"), "deepfm").decode() == bundles["deepfm"].name
    assert client.llen(HISTORY_KEY) == history
    assert not (world["registry"] / record["challenger"]["bundle"]).exists()
    champion = json.loads((bundles["deepfm"] / "manifest.json").read_text())["version"]
    assert served_version(world["server"].url, champion, timeout_s=1)


def test_a_failing_step_is_named(world, capsys):
    code = cli(world, "retrain", "--experiment", "ranker", "--arm", "nope", "--events",
               str(world["events"]))
    assert code == 2 and "step 'champion' failed" in capsys.readouterr().err
