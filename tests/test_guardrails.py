"""Guardrails per arm (service/experiments/guardrails.py): the config block, the judgement,
the percentile against Prometheus' own, and a real scorer on a real redis-server counting its
requests, failures (a frozen Redis) and returned scores into the report, the dashboard and
/metrics alike."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ctrserve.cli import main
from ctrserve.loadtest.redis_servers import LocalRedis
from ctrserve.service.counts import format_full_report
from ctrserve.service.dashboard.page import experiment_page
from ctrserve.service.experiments import guardrails
from ctrserve.service.experiments.config import ExperimentConfigError, parse_experiments
from ctrserve.service.experiments.guardrails import (
    LATENCY_BUCKETS_S,
    MIN_DOWNLOADS,
    MIN_REQUESTS,
    GuardSums,
    evaluate,
    quantile,
    section,
)
from ctrserve.service.feature_store import load_tables
from ctrserve.service.settings import Settings
from tests.conftest import train_cli
from tests.serving import LiveServer
from tests.test_prometheus import _promtool
from tests.waiting import latest_when

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"
DEFAULTS = {"latency_p99_ms": 250.0, "error_share": 0.01, "calibration": [0.8, 1.25]}
ITEMS = [f"a{i:04d}" for i in range(1, 41)]
FACTORS = {"lr": 1, "lr2": 4}  # predicted over observed downloads, as the client reports them


def experiments(guard: dict | None = None, bundle: str = "b") -> dict:
    """Experiment `ranker`: arms lr (control) and lr2 on one bundle, 20% held out."""
    arms = [{"name": "lr", "weight": 0.5, "bundle": bundle, "control": True},
            {"name": "lr2", "weight": 0.5, "bundle": bundle}]
    experiment = {"name": "ranker", "salt": "ranker-1", "holdout": 0.2, "arms": arms}
    if guard is not None:
        experiment["guardrails"] = guard
    return {"experiments": [experiment]}


# ---- the config ----------------------------------------------------------------------------

def test_guardrails_default_and_errors_name_the_field() -> None:
    config = parse_experiments(experiments(), None).config.experiments[0]
    assert guardrails.thresholds_of(config.guardrails.model_dump()) == DEFAULTS
    partial = parse_experiments(experiments({"error_share": 0.05}), None).config.experiments[0]
    assert guardrails.thresholds_of(partial.guardrails.model_dump()) == {
        **DEFAULTS, "error_share": 0.05}
    cases = {
        "latency_p99": (100, "experiments.0.guardrails.latency_p99: Extra inputs"),
        "latency_p99_ms": (0, "experiments.0.guardrails.latency_p99_ms: Input should be "
                              "greater than 0"),
        "error_share": (1, "experiments.0.guardrails.error_share: Input should be less than 1"),
        "calibration": ([1.1, 2], "experiments.0.guardrails.calibration: calibration band "
                                  "[1.1, 2] must have 0 < low <= 1 <= high"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ExperimentConfigError) as err:
            parse_experiments(experiments({name: value}), None)
        assert message in str(err.value), str(err.value)
    with pytest.raises(ExperimentConfigError, match=r"calibration\.1: Input should be a finite"):
        parse_experiments(experiments({"calibration": [0.5, math.inf]}), None)


# ---- the judgement -------------------------------------------------------------------------

def sums(requests: int, errors: int = 0, seconds: float = 0.02, items: int = 0,
         probability: float = 0.0) -> GuardSums:
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    buckets[next(i for i, b in enumerate([*LATENCY_BUCKETS_S, math.inf]) if seconds <= b)] = \
        requests
    return GuardSums(requests, errors, items, probability, buckets)


def test_each_guardrail_is_judged_against_its_threshold_from_the_minimum_sample() -> None:
    # 200 requests of 0.3-0.4 s, 4 failed; 1000 items predicted at 0.2 on average, shown with
    # 100 downloads of 1000 impressions: calibration 2
    slow = evaluate(sums(200, 4, 0.35, 1000, 200.0), 1000, 100, DEFAULTS)
    assert slow["latency_p99_ms"] == {"value": pytest.approx(399.0), "threshold": 250.0,
                                      "breached": True}
    assert slow["error_share"] == {"value": 0.02, "threshold": 0.01, "breached": True}
    assert slow["calibration"] == {"value": pytest.approx(2.0), "threshold": [0.8, 1.25],
                                   "breached": True, "predicted": 0.2, "observed": 0.1}
    fine = evaluate(sums(MIN_REQUESTS, 0, 0.02, 1000, 95.0), 1000, MIN_DOWNLOADS, DEFAULTS)
    assert [fine[g]["breached"] for g in guardrails.NAMES] == [False, False, False]
    # one request short, a download short: values shown, nothing judged
    few = evaluate(sums(MIN_REQUESTS - 1, 50, 2.0, 1000, 500.0), 1000, MIN_DOWNLOADS - 1,
                   DEFAULTS)
    assert [few[g]["breached"] for g in guardrails.NAMES] == [None, None, None]
    assert few["error_share"]["value"] == pytest.approx(50 / 99)
    # nothing at all: no value, no verdict
    empty = evaluate(GuardSums(), 0, 0, DEFAULTS)
    assert all(empty[g]["value"] is None and empty[g]["breached"] is None
               for g in guardrails.NAMES)


def test_section_lists_the_days_breaches_and_sums_the_total() -> None:
    days = {"2026-01-01": {"lr": (sums(150, 0, 0.02), 0, 0), "t": (sums(150, 30), 0, 0)},
            "2026-01-02": {"lr": (sums(150, 0, 0.6), 0, 0), "t": (sums(150), 0, 0)}}
    total = {arm: (days["2026-01-01"][arm][0] + days["2026-01-02"][arm][0], 0, 0)
             for arm in ("lr", "t")}
    guard = section(days, total, DEFAULTS)
    assert guard["breached"] == [
        {"day": "2026-01-01", "arm": "t", "guardrail": "error_share", "value": 0.2,
         "threshold": 0.01},
        {"day": "2026-01-02", "arm": "lr", "guardrail": "latency_p99_ms",
         "value": pytest.approx(747.5), "threshold": 250.0}]
    assert guard["total"]["t"]["requests"] == 300 and guard["total"]["t"]["errors"] == 30
    text = "\n".join(guardrails.format_section(guard))
    assert "20.00% !" in text and "747.5 !" in text and "calibration" in text


def test_percentile_is_prometheus_histogram_quantile(tmp_path: Path) -> None:
    """Random histograms over the buckets, the report's quantile() against the p99 that the
    recording rule computes from the same counts in promtool."""
    rng = random.Random(5)
    series, checks = [], []
    for h in range(25):
        counts = [rng.choice([0, 0, 1, 3, 10, 60]) for _ in range(len(LATENCY_BUCKETS_S) + 1)]
        counts[rng.randrange(len(counts))] += 1  # never empty
        cumulative = 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], counts, strict=True):
            cumulative += n
            labels = f'experiment="e",arm="h{h}",le="{bound}",instance="s1:8000",job="ctrserve"'
            series.append({"series": f"ctrserve_arm_request_duration_seconds_bucket{{{labels}}}",
                           "values": f"0+{cumulative}x20"})
        expected = quantile(0.99, LATENCY_BUCKETS_S, counts)
        p99 = ('experiment_arm:ctrserve_arm_request_duration_seconds:p99_rate5m'
               f'{{experiment="e",arm="h{h}"}}')
        checks.append({"expr": f"abs({p99} - {expected!r}) < bool 1e-9", "eval_time": "10m",
                       "exp_samples": [{"labels": f'{{experiment="e",arm="h{h}"}}',
                                        "value": 1}]})
    test = {"rule_files": [str(PROM / "recording_rules.yml")], "evaluation_interval": "1m",
            "tests": [{"name": "p99", "interval": "1m", "input_series": series,
                       "promql_expr_test": checks}]}
    (tmp_path / "p99_test.yml").write_text(yaml.safe_dump(test))
    _promtool("test", "rules", "p99_test.yml", cwd=tmp_path)


def test_dashboard_flags_breached_arms_even_before_any_count() -> None:
    day = "2026-01-01"
    guard = section({day: {"lr": (sums(150, 0), 0, 0), "t": (sums(150, 150), 0, 0)}},
                    {"lr": (sums(150, 0), 0, 0), "t": (sums(150, 150), 0, 0)}, DEFAULTS)
    rep = {"experiment": "ranker", "control": "lr", "weights": {"lr": 0.5, "t": 0.5},
           "days": {}, "total": {"confidence": 0.95}, "guardrails": guard}
    serving = {"arms": [], "holdout": 0}
    html = experiment_page(rep, serving, [])
    assert 'id="no-data"' in html and 'id="guardrail-summary" data-breached="true"' in html
    assert '<tr data-guard-arm="t" data-breached="error_share">' in html
    assert '<tr data-guard-arm="lr" data-breached="">' in html
    assert f'class="breached" data-guardrail="error_share">100.00%<br><span>{day}' in html


# ---- a real scorer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lr_registry(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, registry = tmp_path_factory.mktemp("lr-run"), tmp_path_factory.mktemp("registry")
    assert train_cli(synth_dir, run, "lr") == 0
    assert main(["export", str(run), "--registry", str(registry)]) == 0
    return registry


@pytest.fixture(scope="module")
def redis_server(redis_binaries: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("guard-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def scorer(lr_registry: Path, redis_server: LocalRedis, synth_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Experiment ranker on a real redis-server with thresholds that give known verdicts:
    any latency breaches 1 µs, 0.1% of errors is allowed, calibration must be within [0.5, 2]."""
    with redis.Redis.from_url(redis_server.url) as client:
        load_tables(client, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    bundle = next(p.name for p in lr_registry.iterdir() if p.name.startswith("lr-"))
    path = tmp_path_factory.mktemp("guard-config") / "experiments.yaml"
    guard = {"latency_p99_ms": 0.001, "error_share": 0.001, "calibration": [0.5, 2.0]}
    path.write_text(yaml.safe_dump(experiments(guard, bundle)))
    settings = Settings(registry=lr_registry, experiments_file=path,
                        redis_url=redis_server.url, redis_timeout_s=0.3, warmup_rounds=1,
                        max_candidates=50)
    with LiveServer(settings) as live:
        yield live


def _score(url: str, user: str) -> httpx.Response:
    body = {"user_id": user, "experiment": "ranker", "top_k": 30, "context": {"hour": 9},
            "candidates": [{"item_id": i} for i in ITEMS]}
    return httpx.post(url + "/v1/score", json=body, timeout=10)


def _events(reply: dict[str, Any], user: str, downloads: int) -> list[dict[str, Any]]:
    proof = {"request_id": reply["request_id"], "attribution": reply["attribution"],
             "user_id": user}
    shown = [{"item_id": i, "position": p} for p, i in enumerate(reply["item_ids"], 1)]
    events = [{"event_id": f"i-{reply['request_id']}", "type": "impression", **proof,
               "ts": time.time(), "items": shown}]
    return events + [{"event_id": f"d-{reply['request_id']}-{k}", "type": "download", **proof,
                      "item_id": reply["item_ids"][k], "ts": time.time() + 1}
                     for k in range(downloads)]


def _serve_traffic(url: str) -> dict[str, dict[str, float]]:
    """Score until each arm answered 110 non-holdout requests whose predictions add up to 130
    downloads for lr and 4 x 130 for lr2; report impressions of every returned item and
    downloads that make lr calibrated (its predicted downloads happen) and lr2 predict 4x what
    happens. Returns what the client saw per arm, holdout included."""
    seen: dict[str, dict[str, float]] = {}
    replies: list[tuple[str, dict[str, Any]]] = []
    for n in range(1000):
        user = f"u{n % 400:05d}"
        reply = _score(url, user)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        arm = "holdout" if data["holdout"] else data["arm"]
        got = seen.setdefault(arm, {"requests": 0, "items": 0, "probability": 0.0})
        got["requests"] += 1
        got["items"] += len(data["scores"])
        got["probability"] += sum(data["scores"])
        replies.append((user, data))
        if all(seen.get(a, {}).get("requests", 0) >= 110
               and seen[a]["probability"] >= 130 * factor for a, factor in FACTORS.items()):
            break
    owed = {"lr": 0.0, "lr2": 0.0, "holdout": 0.0}
    for user, data in replies:
        arm = "holdout" if data["holdout"] else data["arm"]
        owed[arm] += sum(data["scores"]) / FACTORS.get(arm, 1)
        k = min(int(owed[arm]), len(data["item_ids"]))  # the downloads due so far
        owed[arm] -= k
        result = httpx.post(url + "/v1/events", json={"events": _events(data, user, k)}).json()
        assert result["rejected"] == 0, result
    return seen


def _frozen_requests(url: str, pid: int) -> int:
    """Three score requests of lr2 users while redis-server is stopped: each a 503."""
    users = [u for u in (f"frozen-{i}" for i in range(200))
             if (a := httpx.get(url + "/v1/assignment", params={
                 "user_id": u, "experiment": "ranker"}).json())["arm"] == "lr2"
             and not a["holdout"]][:3]
    os.kill(pid, signal.SIGSTOP)
    try:
        statuses = [_score(url, u).status_code for u in users]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert statuses == [503, 503, 503]
    return len(users)


def _report_when(url: str, ready: Any, timeout_s: float = 20.0) -> dict[str, Any]:
    """The report once `ready(report)` holds (the scorers add their sums every second)."""
    return latest_when(lambda: httpx.get(url + "/v1/experiments/ranker/report",
                                         timeout=10).json(), ready, timeout_s, interval_s=0.2)


def _metric(text: str, name: str, arm: str) -> float:
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == name and s.labels.get("arm") == arm
                and s.labels.get("experiment") == "ranker")


def test_a_scorer_counts_its_arms_guardrails_into_report_dashboard_and_metrics(
        scorer: LiveServer, redis_server: LocalRedis) -> None:
    url = scorer.url
    seen = _serve_traffic(url)
    failed = _frozen_requests(url, redis_server.procs[0].pid)
    expected = {arm: seen[arm]["requests"] + (failed if arm == "lr2" else 0)
                for arm in ("lr", "lr2")}
    rep = _report_when(url, lambda r: {a: e["requests"] for a, e in
                                       r["guardrails"]["total"].items()} == expected)
    guard = rep["guardrails"]
    assert guard["thresholds"] == {"latency_p99_ms": 0.001, "error_share": 0.001,
                                   "calibration": [0.5, 2.0]}
    total = guard["total"]
    # every non-holdout request counted once, the frozen ones as errors of their arm (3 of
    # some 500: above 0.1%)
    assert {a: e["requests"] for a, e in total.items()} == expected
    assert {a: e["errors"] for a, e in total.items()} == {"lr": 0, "lr2": failed}
    for arm in ("lr", "lr2"):
        entry, counts = total[arm], rep["total"]["arms"][arm]
        assert entry["returned_items"] == seen[arm]["items"] == counts["impressions"]
        predicted = seen[arm]["probability"] / seen[arm]["items"]
        assert entry["calibration"]["predicted"] == pytest.approx(predicted, rel=1e-9)
        assert entry["calibration"]["observed"] == counts["downloads"] / counts["impressions"]
        assert entry["latency_p99_ms"]["breached"] is True  # any latency exceeds 1 µs
    assert total["lr"]["calibration"]["value"] == pytest.approx(1.0, abs=0.1)
    assert total["lr2"]["calibration"]["value"] == pytest.approx(4.0, rel=0.1)
    assert [total[a]["calibration"]["breached"] for a in ("lr", "lr2")] == [False, True]
    assert [total[a]["error_share"]["breached"] for a in ("lr", "lr2")] == [False, True]
    # per day the same (one day, unless the test ran over UTC midnight)
    if len(guard["days"]) == 1:
        assert next(iter(guard["days"].values())) == total
        assert {(b["arm"], b["guardrail"]) for b in guard["breached"]} == {
            ("lr", "latency_p99_ms"), ("lr2", "latency_p99_ms"), ("lr2", "error_share"),
            ("lr2", "calibration")}
    # the dashboard flags them, the text report lists them
    html = httpx.get(url + "/dashboard/ranker").text
    assert 'id="guardrail-summary" data-breached="true"' in html
    assert '<tr data-guard-arm="lr2" data-breached="latency_p99_ms error_share calibration">' \
        in html
    assert "Guardrails (p99 <= 0.001 ms" in format_full_report(rep)
    # /metrics: the same counts per arm, and the thresholds
    text = httpx.get(url + "/metrics").text
    for arm in ("lr", "lr2"):
        assert _metric(text, "ctrserve_arm_request_duration_seconds_count", arm) == expected[arm]
        assert _metric(text, "ctrserve_arm_request_errors_total", arm) == total[arm]["errors"]
        assert _metric(text, "ctrserve_arm_returned_items_total", arm) == seen[arm]["items"]
        assert _metric(text, "ctrserve_arm_returned_probability_total", arm) == \
            pytest.approx(seen[arm]["probability"], rel=1e-9)
    thresholds = {s.labels["guardrail"]: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == "ctrserve_guardrail_threshold"}
    assert thresholds == {"latency_p99_seconds": 1e-6, "error_share": 0.001,
                          "calibration_min": 0.5, "calibration_max": 2.0}
