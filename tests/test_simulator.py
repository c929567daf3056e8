"""The traffic simulator against a real scorer with two arms: LR control, DeepFM treatment."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import yaml
from scipy import stats

from ctrserve.cli import main
from ctrserve.loadtest.simulator import SimConfig, default_start_day, event_statuses, simulate
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer

WEIGHTS = {"lr": 0.6, "deepfm": 0.4}
DAYS, PER_DAY, DUPLICATE_RATE = 2, 200, 0.05


@pytest.fixture(scope="module")
def sim_server(bundles, synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim-server")
    registry = tmp / "registry"
    for model in WEIGHTS:
        shutil.copytree(bundles[model], registry / bundles[model].name)
    config = {"experiments": [{"name": "ranker", "salt": "sim-1", "arms": [
        {"name": "lr", "weight": WEIGHTS["lr"], "bundle": bundles["lr"].name, "control": True},
        {"name": "deepfm", "weight": WEIGHTS["deepfm"], "bundle": bundles["deepfm"].name}]}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    redis_server = start_embedded(tmp / "store.rdb")
    load_tables(redis_server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(redis_server), max_candidates=100,
                        warmup_rounds=1)
    try:
        with LiveServer(settings) as live:
            yield live
    finally:
        stop_embedded(redis_server)


@pytest.fixture(scope="module")
def summary(sim_server, synth_dir) -> dict:
    cfg = SimConfig(url=sim_server.url, days=DAYS, requests_per_day=PER_DAY, candidates=(20, 40),
                    top_k=10, concurrency=8, seed=11, duplicate_rate=DUPLICATE_RATE,
                    event_batch=40, max_seconds=60)
    return simulate(synth_dir, cfg)


def test_every_request_is_answered_and_counted_per_arm_and_day(summary, synth_dir):
    req = summary["requests"]
    assert (req["sent"], req["answered"], req["failed"]) == (DAYS * PER_DAY, DAYS * PER_DAY, 0)
    assert not req["stopped_early"]
    start = default_start_day(synth_dir)
    assert summary["start_day"] == start.isoformat()
    assert len(summary["days"]) == DAYS
    arms = summary["arms"]
    assert set(arms) == {"lr", "deepfm"}
    assert sum(a["requests"] for a in arms.values()) == DAYS * PER_DAY
    for name, a in arms.items():
        assert a["weight"] == WEIGHTS[name]
        assert a["impressions"] == 10 * a["requests"]
        assert len(a["model_versions"]) == 1
        assert 0 < a["expected_downloads"] < a["impressions"]
        assert a["true_ctr"] <= a["oracle_ctr"]
        assert a["users"] >= 1
        assert a["requests"] == sum(d[name]["requests"] for d in summary["days"].values())
        assert a["downloads"] == sum(d[name]["downloads"] for d in summary["days"].values())
    # downloads are Bernoulli draws from the truth: their total is close to its expectation
    downloads = sum(a["downloads"] for a in arms.values())
    expected = sum(a["expected_downloads"] for a in arms.values())
    assert abs(downloads - expected) < 4 * expected**0.5 + 1


def test_arm_shares_follow_the_configured_weights(summary):
    arms = summary["arms"]
    users = [arms["lr"]["users"], arms["deepfm"]["users"]]
    # users are the unit of assignment: a chi-square over users per arm, as the SRM check does
    expected = [sum(users) * WEIGHTS["lr"], sum(users) * WEIGHTS["deepfm"]]
    assert stats.chisquare(users, expected).pvalue > 0.001
    # requests follow too, more loosely: a few very active users carry many requests
    assert abs(arms["lr"]["request_share"] - WEIGHTS["lr"]) < 0.15


def test_event_replies_match_the_duplicate_rate(summary):
    events = summary["events"]
    # the scorer has POST /v1/events: a 404 (the simulator would tolerate it) is a failure here
    assert events["endpoint"] == "ok", events
    arms = summary["arms"]
    requests = sum(a["requests"] for a in arms.values())
    downloads = sum(a["downloads"] for a in arms.values())
    assert events["sent"] == requests + downloads  # one impression per request + downloads
    assert events["lost"] == 0 and events["post_errors"] == {}
    assert events["rejected"] == 0, events["rejected_reasons"]
    assert events["accepted"] == events["sent"]
    assert events["duplicate"] == events["resent"]
    low, high = stats.binom.interval(0.999, events["sent"], DUPLICATE_RATE)
    assert low <= events["resent"] <= high
    assert events["by_type"]["impression"]["accepted"] == requests
    assert events["by_type"].get("download", {}).get("accepted", 0) == downloads


def test_event_statuses_reads_per_event_results():
    batch = [{"event_id": "a", "type": "impression"}, {"event_id": "b", "type": "download"}]
    reply = {"results": [{"event_id": "a", "status": "accepted"},
                         {"status": "rejected", "reason": "unknown request_id"}]}
    assert event_statuses(reply, batch) == [("accepted", "a", ""),
                                            ("rejected", "b", "unknown request_id")]


def test_config_refuses_non_loopback_urls_and_bad_values():
    with pytest.raises(ValueError, match="loopback"):
        SimConfig(url="http://example.com:8000")
    with pytest.raises(ValueError, match="top_k"):
        SimConfig(top_k=20, candidates=(10, 30))
    with pytest.raises(ValueError, match="duplicate_rate"):
        SimConfig(duplicate_rate=1.5)


def test_cli_writes_the_json_summary(sim_server, synth_dir, tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = main(["simulate", "--url", sim_server.url, "--world", str(synth_dir), "--days", "1",
                 "--requests-per-day", "20", "--candidates", "20,30", "--concurrency", "4",
                 "--seed", "3", "--duplicate-rate", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    written = json.loads(out.read_text())
    assert json.loads(captured.out)["requests"] == written["requests"]
    assert written["requests"]["answered"] == 20
    assert "lr" in captured.err and "true_ctr" in captured.err
    bad = main(["simulate", "--url", "http://10.0.0.1:80", "--world", str(synth_dir)])
    assert bad == 2 and "loopback" in capsys.readouterr().err
    missing = main(["simulate", "--world", str(tmp_path)])
    assert missing == 2 and "world.json" in capsys.readouterr().err


def test_the_scorer_is_still_healthy(sim_server):
    assert httpx.get(sim_server.url + "/healthz").status_code == 200
