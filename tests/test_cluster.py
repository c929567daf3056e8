"""The online state on a real three-master Redis Cluster, against one plain Redis.

The same simulated traffic (same seed, same request ids, client clock) runs through a scorer on
a standalone Debian redis-server and through one on a local Redis Cluster
(`CTRSERVE_REDIS_CLUSTER=1`); both reports must be equal. Drain, report, retrain, deploy and
rollback then run through the CLI against the cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from ctrserve.cli import main
from ctrserve.common.keys import arm_tag
from ctrserve.loadtest.simulator import SimConfig, simulate
from ctrserve.service.event_log import read_log, read_serve_log
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import sync_client
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry
from tests.waiting import latest_when, wait_until

LOOSE = ["--auc-tolerance", "0.5", "--logloss-tolerance", "0.5", "--calibration-bounds",
         "0.2,5"]


def _run(bundles, synth_dir: Path, tmp: Path, url: str, cluster: bool):
    registry = copy_registry(bundles, tmp / "registry")
    client = sync_client(url, cluster)
    load_tables(client, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    client.close()
    config = {"experiments": [{"name": "parity", "salt": "parity-1", "arms": [
        {"name": "lr", "weight": 0.5, "bundle": bundles["lr"].name, "control": True},
        {"name": "deepfm", "weight": 0.5, "bundle": bundles["deepfm"].name}]}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=url, redis_cluster=cluster, clock="client",
                        deploy_poll_s=0.2, max_candidates=100, warmup_rounds=1)
    return registry, settings


@pytest.fixture(scope="module")
def runs(bundles, synth_dir, redis_cluster, redis_server_url, tmp_path_factory):
    """{"single"|"cluster": {"url", "registry", "redis_url", "report", "summary"}}, live."""
    targets = {"single": (redis_server_url, False), "cluster": (redis_cluster.url, True)}
    out, servers = {}, []
    try:
        for name, (url, cluster) in targets.items():
            registry, settings = _run(bundles, synth_dir, tmp_path_factory.mktemp(name), url,
                                      cluster)
            live = LiveServer(settings).__enter__()
            servers.append(live)
            cfg = SimConfig(url=live.url, days=3, requests_per_day=120, candidates=(20, 30),
                            top_k=8, concurrency=4, seed=11, duplicate_rate=0.05,
                            event_batch=30, run_id="parity", experiment="parity",
                            max_seconds=90)
            summary = simulate(synth_dir, cfg)
            report = settled_report(live.url, summary["requests"]["answered"])
            out[name] = {"url": live.url, "registry": registry, "redis_url": url,
                         "report": report, "summary": summary}
        yield out
    finally:
        for live in servers:
            live.__exit__(None)


def test_the_cluster_reports_what_one_redis_reports(runs, redis_cluster):
    single, cluster = runs["single"], runs["cluster"]
    assert cluster["summary"]["requests"]["failed"] == 0
    assert cluster["summary"]["events"]["rejected"] == 0
    assert len(cluster["report"]["days"]) == 3
    # guardrails hold each run's own latencies (and sums a scorer adds once a second): the
    # counts and statistics are what must agree
    assert without_guardrails(cluster["report"]) == without_guardrails(single["report"])
    assert set(cluster["report"]["guardrails"]["total"]) == {"lr", "deepfm"}
    assert cluster["report"]["total"]["arms"]["lr"]["impressions"] > 0
    # the arms' state lives in different slots, so the cluster spreads the experiment
    client = sync_client(redis_cluster.url, cluster=True)
    slots = {arm: client.keyslot(arm_tag("parity", arm)) for arm in ("lr", "deepfm")}
    client.close()
    assert slots["lr"] != slots["deepfm"]


def test_drain_report_retrain_deploy_and_rollback_on_the_cluster(runs, monkeypatch, capsys,
                                                                 tmp_path):
    run = runs["cluster"]
    monkeypatch.setenv("REDIS_URL", run["redis_url"])
    monkeypatch.setenv("CTRSERVE_REDIS_CLUSTER", "1")
    registry, events = str(run["registry"]), tmp_path / "events"
    assert main(["drain-events", "--out", str(events), "--registry", registry]) == 0
    drained = json.loads(capsys.readouterr().out)
    assert drained["events"] == len(read_log(events)) > 0
    assert drained["served"] == len(read_serve_log(events)) == 360
    assert drained["left"] == {"events": 0, "serve": 0}
    assert main(["report", "--experiment", "parity", "--json", "--registry", registry]) == 0
    after = json.loads(capsys.readouterr().out)
    # the drain added the list metrics of the drained logs (stored on the cluster), and
    # changed no count
    lists = after.pop("list_metrics")
    assert run["report"]["list_metrics"] is None
    assert after == {k: v for k, v in run["report"].items() if k != "list_metrics"}
    assert main(["list-metrics", "--logs", str(events), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert {k: lists[k] for k in offline} == offline

    assert main(["retrain", "--experiment", "parity", "--arm", "lr", "--events", str(events),
                 "--epochs", "1", "--registry", registry, *LOOSE]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["decision"] == "deployed", record
    assert served(run["url"], record["challenger"]["version"])
    assert main(["rollback", "--experiment", "parity", "--arm", "lr", "--why", "test",
                 "--registry", registry]) == 0
    capsys.readouterr()
    assert served(run["url"], record["challenger"]["version"], present=False)
    assert main(["deployments", "--experiment", "parity", "--registry", registry]) == 0
    history = capsys.readouterr().out
    assert history.count("parity") >= 2


def settled_report(url: str, requests: int, timeout_s: float = 15) -> dict:
    """The report once the scorer's guardrail sums (written once a second) hold every request."""
    return latest_when(lambda: httpx.get(url + "/v1/experiments/parity/report").json(),
                       lambda r: sum(a["requests"] for a in r["guardrails"]["total"].values())
                       >= requests, timeout_s)


def served(url: str, version: str, present: bool = True, timeout_s: float = 15) -> bool:
    """The scorer comes to serve (or no longer serve) `version` within timeout_s."""
    def now() -> bool:
        models = httpx.get(url + "/v1/models").json()["models"]
        return (version in {m["version"] for m in models}) == present

    return wait_until(now, f"version {version} {'served' if present else 'gone'}", timeout_s)


def without_guardrails(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "guardrails"}
