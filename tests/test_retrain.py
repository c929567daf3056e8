"""`ctrserve retrain` end to end: simulated traffic -> drained event log -> gated deploy."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from ctrserve.cli import main
from ctrserve.loadtest.simulator import SimConfig, simulate
from ctrserve.service.deployments import HISTORY_KEY, canary, state_key
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from ctrserve.training.data.events import EventLogSource, event_day
from ctrserve.training.data.source import DataError
from ctrserve.training.retrain import Gate, arm_lock
from tests.serving import LiveServer, World, copy_registry
from tests.waiting import wait_until

DAYS, PER_DAY = 3, 150
LOOSE = ["--auc-tolerance", "0.5", "--logloss-tolerance", "0.5", "--calibration-bounds",
         "0.2,5"]


def settings_for(registry: Path, redis_server) -> Settings:
    return Settings(registry=registry, experiments_file=registry.parent / "experiments.yaml",
                    redis_url=embedded_url(redis_server), deploy_poll_s=0.2, clock="client",
                    max_candidates=100, warmup_rounds=1)


@pytest.fixture(scope="module")
def logged(bundles, synth_dir, tmp_path_factory) -> dict:
    """Built once, never changed: DAYS simulated days against a scorer with two arms (lr,
    deepfm), drained into an event log. Kept as files: the registry, the Redis store (saved
    when its server stopped) and the event log; `world` gives each test its own copy."""
    tmp = tmp_path_factory.mktemp("retrain")
    registry = copy_registry(bundles, tmp / "registry")
    config = {"experiments": [{"name": "ranker", "salt": "rt-1", "arms": [
        {"name": "lr", "weight": 0.5, "bundle": bundles["lr"].name, "control": True},
        {"name": "deepfm", "weight": 0.5, "bundle": bundles["deepfm"].name}]}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    db = tmp / "redis" / "store.rdb"
    redis_server = start_embedded(db)
    try:
        load_tables(redis_server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
        with LiveServer(settings_for(registry, redis_server)) as live:
            cfg = SimConfig(url=live.url, days=DAYS, requests_per_day=PER_DAY,
                            candidates=(20, 30), top_k=10, concurrency=8, seed=5,
                            duplicate_rate=0.02, event_batch=40, max_seconds=60)
            summary = simulate(synth_dir, cfg)
        w = {"registry": registry, "db": db, "events": tmp / "events", "summary": summary,
             "tmp": tmp}
        assert cli(w, "drain-events", "--out", str(w["events"])) == 0
    finally:
        stop_embedded(redis_server)  # SHUTDOWN SAVE: the store is all in its files now
    return w


@pytest.fixture
def world(logged, tmp_path) -> Iterator[dict]:
    """A copy of `logged` of the test's own (registry, Redis store, event log) and a scorer
    on it: what one test deploys, drains or records is seen by no other."""
    shutil.copytree(logged["tmp"], tmp_path / "world")
    tmp = tmp_path / "world"
    registry, db = tmp / "registry", tmp / "redis" / "store.rdb"
    redis_server = start_embedded(db)
    try:
        with LiveServer(settings_for(registry, redis_server)) as live:
            yield {"server": live, "registry": registry, "db": db, "redis": redis_server,
                   "events": tmp / "events", "summary": logged["summary"], "tmp": tmp}
    finally:
        stop_embedded(redis_server)


def cli(world: dict, *args: str) -> int:
    return main([*args, "--registry", str(world["registry"]), "--redis-db", str(world["db"])])


def retrain_cli(world: dict, arm: str, *extra: str) -> int:
    return cli(world, "retrain", "--experiment", "ranker", "--arm", arm, "--events",
               str(world["events"]), "--epochs", "2", *extra)


def served_version(url: str, arm_bundle_version: str, timeout_s: float = 10) -> bool:
    return wait_until(lambda: arm_bundle_version in {
        m["version"] for m in httpx.get(url + "/v1/models").json()["models"]},
        f"version {arm_bundle_version} served", timeout_s)


def test_event_log_source_rows_labels_and_days(logged, bundles, synth_dir):
    spec = json.loads((bundles["lr"] / "manifest.json").read_text())["encoder"]["dataset"]
    source = EventLogSource(logged["events"], 7, spec, experiment="ranker",
                            item_records=World(synth_dir).apps)
    assert [len(source.days[s]) for s in ("train", "valid", "test")] == [DAYS - 2, 1, 1]
    summary = logged["summary"]
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
        EventLogSource(logged["tmp"] / "nothing", 7, spec)
    assert event_day("2026-01-05T23:59:59+00:00").isoformat() == "2026-01-05"
    assert event_day(1767600000).isoformat() == "2026-01-05"


def test_event_log_rows_do_not_depend_on_the_order_events_arrived(logged, bundles, synth_dir,
                                                                   tmp_path):
    """Concurrent clients log in a different order each run; the training rows must not."""
    import pyarrow.parquet as pq

    shuffled = tmp_path / "events"
    rng = np.random.default_rng(0)
    for path in sorted(logged["events"].glob("day=*/*.parquet")):
        table = pq.read_table(path)
        target = shuffled / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(rng.permutation(table.num_rows)), target)
    spec = json.loads((bundles["lr"] / "manifest.json").read_text())["encoder"]["dataset"]
    apps = World(synth_dir).apps
    sources = [EventLogSource(root, 7, spec, experiment="ranker", item_records=apps)
               for root in (logged["events"], shuffled)]
    for split in ("train", "valid", "test"):
        a, b = ([c.table for c in source.chunks(split)] for source in sources)
        assert len(a) == len(b) and all(x.equals(y) for x, y in zip(a, b, strict=True))


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
    assert retrain_cli(world, "lr", *LOOSE) == 0  # the first run: trained, deployed
    first = json.loads(capsys.readouterr().out)
    assert first["decision"] == "deployed", first
    history = world["redis"].llen(HISTORY_KEY)
    assert retrain_cli(world, "lr", *LOOSE) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert again["skipped"] is True and again["key"] == first["key"]
    assert "already ran" in captured.err and "train:" not in captured.err
    assert world["redis"].llen(HISTORY_KEY) == history
    assert world["redis"].hget(state_key("ranker"), "lr").decode() == first["challenger"][
        "bundle"]


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


def spec_of(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["encoder"]["dataset"]


def positives(source: EventLogSource) -> int:
    return sum(int(pa.compute.sum(c.table.column("label")).as_py() or 0)
               for s in ("train", "valid", "test") for c in source.chunks(s))


def test_downloads_label_impressions_only_within_the_attribution_window(logged, bundles):
    # the simulator reports a download 9 s + 5 s per slot after its impression
    def labelled(window):
        return positives(EventLogSource(logged["events"], 7, spec_of(bundles["lr"]),
                                        experiment="ranker", attribution_window_s=window))

    everything = labelled(None)
    assert everything == sum(a["downloads"] for a in logged["summary"]["arms"].values())
    assert labelled(5) == 0
    assert 0 < labelled(12) < everything  # only the downloads in the first slot


def simulate_day(world, synth_dir, index: int, requests: int = 150, **kw) -> dict:
    start = dt.date.fromisoformat(min(world["summary"]["days"])) + dt.timedelta(days=index)
    cfg = SimConfig(url=world["server"].url, days=1, requests_per_day=requests,
                    candidates=(20, 30), top_k=10, concurrency=4, seed=100 + index,
                    start_day=start, event_batch=40, max_seconds=60, **kw)
    return simulate(synth_dir, cfg)


class Traffic(threading.Thread):
    """Simulated days back to back until stopped: what a scorer sees during a retrain."""

    def __init__(self, world, synth_dir, first_day: int):
        super().__init__(daemon=True)
        self.world, self.synth_dir, self.day = world, synth_dir, first_day
        self.summaries: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.summaries.append(simulate_day(self.world, self.synth_dir, self.day, 60))
            self.day += 1

    def total(self, key: str) -> int:
        return sum(a[key] for s in self.summaries for a in s["arms"].values())

    def versions(self, arm: str) -> set[str]:
        return {v for s in self.summaries for v in s["arms"].get(arm, {}).get(
            "model_versions", [])}


def report_impressions(url: str) -> int:
    arms = httpx.get(url + "/v1/experiments/ranker/report").json()["total"]["arms"]
    return sum(a["impressions"] for a in arms.values())


def test_every_arm_retrains_and_swaps_under_live_traffic_with_no_failed_request(
        world, trained_runs, synth_dir, capsys):
    simulate_day(world, synth_dir, DAYS)  # a fourth day, then drain it
    assert cli(world, "drain-events", "--out", str(world["events"])) == 0
    client, url = world["redis"], world["server"].url
    before = {arm: client.hget(state_key("ranker"), arm).decode() for arm in ("lr", "deepfm")}
    versions_before = {m["version"] for m in httpx.get(url + "/v1/models").json()["models"]}
    impressions_before = report_impressions(url)
    capsys.readouterr()
    traffic = Traffic(world, synth_dir, DAYS + 1)
    traffic.start()
    try:
        code = retrain_cli(world, "all", "--warm-start", "--base-data", f"synth:{synth_dir}",
                           "--base-rows", "20000", *LOOSE)
        out = json.loads(capsys.readouterr().out)
        new = {r["arm"]: r["challenger"]["version"] for r in out["runs"]}
        for version in new.values():
            assert served_version(url, version, timeout_s=60)
        # traffic on the new versions too: a simulated day that was answered by them
        deadline = time.monotonic() + 120
        while not all(v in traffic.versions(arm) for arm, v in new.items()):
            assert time.monotonic() < deadline and traffic.is_alive(), "no traffic on them"
            time.sleep(0.1)
    finally:
        traffic.stop.set()
        traffic.join(timeout=120)
    assert code == 0
    assert [r["decision"] for r in out["runs"]] == ["deployed", "deployed"], out
    for r in out["runs"]:
        # a strict warm start: the challenger (the champion's model type, hyper-parameters and
        # encoder) starts from every one of the champion's weights, embedding tables included
        champion_state = torch.load(trained_runs[r["arm"]] / "model.pt", weights_only=True)
        assert r["train"]["warm_start"]["fresh"] == [], r["train"]["warm_start"]
        assert r["train"]["warm_start"]["loaded"] == len(champion_state)
        assert r["data"]["base"]["rows"] == 20000
        assert r["data"]["splits"]["valid"]["days"] == 1
        assert client.hget(state_key("ranker"), r["arm"]).decode() != before[r["arm"]]
    assert traffic.total("requests") > 0
    assert sum(s["requests"]["failed"] for s in traffic.summaries) == 0
    for arm, version in new.items():  # the swap happened while traffic flowed
        assert version in traffic.versions(arm)
        assert traffic.versions(arm) & versions_before
    assert report_impressions(url) - impressions_before == traffic.total("impressions")


def test_an_interrupted_retrain_leaves_nothing_half_deployed(world, synth_dir, capsys):
    client, registry = world["redis"], world["registry"]
    serving = client.hget(state_key("ranker"), "deepfm")
    history = client.llen(HISTORY_KEY)
    # the run's record folder (.retrain) is the only thing an interrupted run adds
    bundles_before = sorted({*(p.name for p in registry.iterdir()), ".retrain"})
    cmd = [sys.executable, "-m", "ctrserve", "retrain", "--experiment", "ranker", "--arm",
           "deepfm", "--events", str(world["events"]), "--epochs", "20", "--registry",
           str(registry), "--redis-db", str(world["db"]), *LOOSE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "train:" in line:  # said once the run's record names the step (20 epochs follow)
            break
    records = sorted((registry / ".retrain").glob("ranker--deepfm--*.json"))
    assert [json.loads(r.read_text())["step"] for r in records] == ["train"]
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert client.hget(state_key("ranker"), "deepfm") == serving
    assert client.llen(HISTORY_KEY) == history
    assert sorted(p.name for p in registry.iterdir()) == bundles_before
    records = sorted((registry / ".retrain").glob("ranker--deepfm--*.json"))
    running = json.loads(records[-1].read_text())
    assert (running["decision"], running["step"]) == ("running", "train")

    with arm_lock(registry, "ranker", "deepfm"):  # a second retrain of the arm waits its turn
        assert retrain_cli(world, "deepfm", *LOOSE) == 2
    assert "another retrain is running" in capsys.readouterr().err

    assert retrain_cli(world, "deepfm", "--drain", "--canary", "0.5", *LOOSE) == 0
    captured = capsys.readouterr()
    assert "drained" in captured.err
    assert "was interrupted in step 'train'; starting over" in captured.err
    record = json.loads(captured.out)
    assert record["decision"] == "deployed", record
    # a canary: half the arm's users get the challenger, the champion keeps the rest
    assert client.hget(state_key("ranker"), "deepfm") == serving
    assert canary(client, "ranker", "deepfm") == {"bundle": record["challenger"]["bundle"],
                                                  "share": 0.5}
    assert "as a canary to 50%" in captured.err


def constant_run(run: Path, out: Path) -> Path:
    """A copy of a trained run with every weight but the biases zeroed: the model scores every
    row alike, so it ranks at chance, the champion that any real retrain clearly beats."""
    shutil.copytree(run, out)
    state = torch.load(out / "model.pt", weights_only=True)
    torch.save({k: v if k.endswith("bias") else torch.zeros_like(v) for k, v in state.items()},
               out / "model.pt")
    return out


def test_the_default_gate_deploys_a_clearly_better_challenger(world, trained_runs, synth_dir,
                                                               tmp_path, capsys):
    """The gate at its defaults (no tolerance loosened) passes a challenger that is clearly
    better than the champion. Realistic volume: three days of 1,000 requests (10,000
    impressions each) served by the champion train (one day), validate and test it, so that
    its calibration is measured on a held-out day of the traffic it was trained on."""
    client, url = world["redis"], world["server"].url
    assert main(["export", str(constant_run(trained_runs["lr"], tmp_path / "constant")),
                 "--registry", str(world["registry"])]) == 0
    champion = Path(capsys.readouterr().out.strip()).name
    assert cli(world, "deploy", "--experiment", "ranker", "--arm", "lr", "--bundle", champion,
               "--why", "a champion at chance") == 0
    # the champion serves the arm before its days begin
    constant = json.loads((world["registry"] / champion / "manifest.json").read_text())
    assert served_version(url, constant["version"], timeout_s=60)
    for index in range(DAYS, DAYS + 3):
        simulate_day(world, synth_dir, index, requests=1000)
    assert cli(world, "drain-events", "--out", str(world["events"])) == 0
    capsys.readouterr()
    assert retrain_cli(world, "lr", "--window-days", "3") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["options"]["gate"] == json.loads(json.dumps(dataclasses.asdict(Gate())))
    assert record["champion"]["bundle"] == champion
    challenger, held = record["metrics"]["challenger"], record["metrics"]["champion"]
    assert held["auc"] == pytest.approx(0.5) and held["rows"] == 10_000
    assert record["data"]["splits"]["train"]["rows"] == 10_000
    assert challenger["auc"] > held["auc"] + 0.05 and challenger["logloss"] < held["logloss"]
    assert record["gate"] == {"passed": True, "reasons": []}, record["metrics"]
    assert record["decision"] == "deployed"
    assert client.hget(state_key("ranker"), "lr").decode() == record["challenger"]["bundle"]
    assert served_version(url, record["challenger"]["version"], timeout_s=60)


def test_a_round_of_retrains_shares_the_data_built_from_the_same_logs(world):
    """The arms of one round read the same rows with the same spec: given one `sources` dict,
    the data is built once, and the second arm trains, gates and deploys on it as well."""
    from ctrserve.training.retrain import RetrainOptions, retrain

    opts = RetrainOptions(epochs=1, gate=Gate(auc_tolerance=0.5, logloss_tolerance=0.5,
                                              calibration_bounds=(0.2, 5.0)))
    sources: dict = {}
    records = [retrain("ranker", arm, world["registry"], world["events"], world["redis"],
                       dataclasses.replace(opts), [].append, sources)
               for arm in ("lr", "deepfm")]
    assert len(sources) == 1
    assert records[0]["data"] == records[1]["data"]
    assert records[0]["data"]["splits"]["train"]["rows"] > 0
    for record in records:
        assert record["decision"] == "deployed", record
        assert record["challenger"]["version"] != record["champion"]["version"]
