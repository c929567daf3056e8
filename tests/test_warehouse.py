"""The DuckDB report over the drained Parquet logs equals the online counters' report.

Real traffic: a live scorer (uvicorn) on a real embedded Redis, driven by the simulator over
three simulated days (client clock) with duplicate deliveries and a holdout, plus events the
scorer rejects; the logs drained to Parquet (in small chunks, one file then written twice as a
crashed drain would); then `ctrserve analyze` against `ctrserve report`, count for count, and
the list metrics the drain stored for the online report against `ctrserve list-metrics`.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ctrserve.cli import main
from ctrserve.loadtest.simulator import SimConfig, simulate
from ctrserve.service import counts
from ctrserve.service.event_log import drain, read_log, read_serve_log
from ctrserve.service.experiments import warehouse
from ctrserve.service.experiments.list_metrics import list_metrics
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

WEIGHTS = {"lr": 0.5, "deepfm": 0.5}


@dataclass
class Traffic:
    client: Any  # the Redis
    redis_url: str
    experiments_file: Path
    logs: Path
    summary: dict
    rejected: dict
    drained: dict  # the drain's result
    url: str  # the scorer, still serving


@pytest.fixture(scope="module")
def traffic(bundles, synth_dir, tmp_path_factory):
    """Three simulated days of experiment `wh` served, counted and drained, the scorer kept
    running for its report."""
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
            drained = drain(store, logs, chunk=37)
            rewrite_one_file(logs)
            yield Traffic(store, embedded_url(store), tmp / "experiments.yaml", logs, summary,
                          rejected, drained, server.url)
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
    summary, rejected = traffic.summary, traffic.rejected
    assert summary["requests"]["answered"] == 180
    assert summary["events"]["duplicate"] > 0 and summary["events"]["rejected"] == 0
    assert rejected["first"]["rejected"] == 2 and rejected["again"]["duplicate"] == 1
    events = read_log(traffic.logs)
    assert any(events["holdout"].to_pylist())  # holdout users' events are logged
    assert len(events) > len(set(events["stream_id"].to_pylist()))  # a file drained twice
    assert not set(events["event_id"].to_pylist()) & {"forged", "unserved"}


def test_duckdb_report_equals_the_online_report_per_arm_and_day(traffic):
    online = counts.build_report(traffic.client, "wh", "lr", WEIGHTS)
    con = warehouse.open_logs(traffic.logs)
    offline = warehouse.build_report(con, "wh", "lr", WEIGHTS)
    assert len(online["days"]) >= 3
    # the guardrails need the scorers' latency and errors, which the logs do not hold
    assert online.pop("guardrails")["total"]
    # the list metrics the drain stored, against the same SQL over the logs as they are now
    # (one file of which was written a second time after the drain)
    stored = online.pop("list_metrics")
    assert stored.pop("computed")["logs"] == str(traffic.logs)
    assert stored == list_metrics(con, "wh", arms=list(WEIGHTS))
    assert list(stored["total"]) == list(WEIGHTS)  # the control first, as in the report
    assert set(stored["days"]) == set(online["days"])
    assert offline == online  # every count, sum and statistic, every day and the total
    arms = online["total"]["arms"]
    assert all(arms[a]["users"] > 0 and arms[a]["downloads"] > 0 for a in WEIGHTS)


def test_analyze_command_equals_report_command(traffic, monkeypatch, capsys):
    logs = traffic.logs
    monkeypatch.setenv("REDIS_URL", traffic.redis_url)
    assert main(["report", "--experiment", "wh", "--json"]) == 0
    online = json.loads(capsys.readouterr().out)
    assert main(["analyze", "--logs", str(logs), "--experiment", "wh", "--experiments",
                 str(traffic.experiments_file), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert "cuped" in offline["total"]["arms"]["deepfm"]["uplift"]["ctr"]  # --pre-days 7
    offline = without_cuped(offline)  # what CUPED adds: the online report has no pre-period
    online.pop("guardrails")  # the scorers' latency and errors: not in the logs
    assert online["list_metrics"].pop("computed")["logs"] == str(logs)  # when and where from
    assert online["list_metrics"]["total"]["deepfm"]["users"] > 1
    assert {k: offline[k] for k in online} == online  # the list metrics included
    assert offline["source"]["dead_letters"] == {"events": 0, "serve": 0}
    # without --experiments, the arms come from the config the scorer left in Redis
    assert main(["analyze", "--logs", str(logs), "--experiment", "wh"]) == 0
    text = capsys.readouterr().out
    assert "wh total" in text and text.count("personalization@L") == 1
    # the text report prints the stored list metrics' table the same way
    assert main(["report", "--experiment", "wh"]) == 0
    text = capsys.readouterr().out
    lists = text[text.index("wh list metrics"):]
    assert "personalization@L" in lists and f"from the logs in {logs}, at the last drain" in lists


def test_api_report_list_metrics_equal_the_list_metrics_command(traffic, capsys):
    """What GET .../report serves after the drain is what `ctrserve list-metrics` computes on
    the same logs, day by day and in total."""
    assert traffic.drained["experiments"] == ["wh"]
    assert traffic.drained["list_metrics"]["experiments"] == ["wh"]
    api = httpx.get(traffic.url + "/v1/experiments/wh/report").json()["list_metrics"]
    assert main(["list-metrics", "--logs", str(traffic.logs), "--experiment", "wh",
                 "--json"]) == 0
    command = json.loads(capsys.readouterr().out)
    computed = api.pop("computed")
    assert computed["logs"] == str(traffic.logs) and computed["at"].endswith("+00:00")
    assert api == command
    assert len(api["days"]) >= 3 and set(api["total"]) == set(WEIGHTS)
    assert all(m["users"] > 1 and m["personalization"] is not None
               for m in api["total"].values())


def test_list_metrics_cover_every_non_holdout_user_of_the_serve_log(traffic):
    logs = traffic.logs
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


# ---- CUPED in the warehouse path: hand-written Parquet logs with a known pre-period ----------

PRE_DAYS = [f"2026-01-{d:02d}" for d in range(1, 10)]  # before the experiment: another one
AB_DAYS = ["2026-01-10", "2026-01-11", "2026-01-12"]


class LogWriter:
    """Event-log rows in the drained layout, one file per (day, experiment, arm)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
        self.next_id = 0

    def add(self, day: str, experiment: str, arm: str, user: str, kind: str,
            items: int = 0, holdout: bool = False) -> None:
        self.next_id += 1
        shown = [f"a{i:04d}" for i in range(items)] if kind == "impression" else None
        self.rows[(day, experiment, arm)].append({
            "stream_id": f"{self.next_id}-0", "event_id": f"e{self.next_id}", "type": kind,
            "request_id": f"r{self.next_id}", "user_id": user, "ts": f"{day}T12:00:00Z",
            "item_id": "a0001" if kind == "download" else None, "items": shown,
            "positions": list(range(1, items + 1)) if shown else None,
            "experiment": experiment, "arm": arm, "model_version": "v1", "day": day,
            "holdout": holdout, "request_ts": 0.0})

    def write(self, logs) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ctrserve.service.event_log import EVENTS_SCHEMA

        for (day, experiment, arm), rows in self.rows.items():
            path = logs / f"day={day}" / f"events-{experiment}-{arm}-{rows[0]['stream_id']}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA), path)


@pytest.fixture(scope="module")
def pre_period_logs(tmp_path_factory):
    """(logs, experiments file, {arm: per-user arrays}) of experiment "ab" (arms c and t, days
    01-10..12) whose users were active before it in "default": 70% of them on 01-03..01-09 (the
    7 days before the start), some only on 01-01 (outside them), the rest new. The same per-user
    CTR propensity drives both periods, the treatment multiplies it by 1.2."""
    import numpy as np

    rng = np.random.default_rng(3)
    log, expected = LogWriter(), defaultdict(lambda: defaultdict(list))
    for u in range(800):
        user, arm = f"u{u:04d}", ("c", "t")[u % 2]
        p0, activity = rng.beta(2.0, 18.0), rng.exponential(15.0)
        kind = rng.choice(["window", "old", "new"], p=[0.7, 0.1, 0.2])
        pre = (0, 0)
        if kind != "new":
            day = rng.choice(PRE_DAYS[2:] if kind == "window" else PRE_DAYS[:1])
            pre = write_user(log, rng, day, "default", "control", user, activity, p0)
        p = p0 * (1.2 if arm == "t" else 1.0)
        x = y = 0
        for day in rng.choice(AB_DAYS, size=rng.integers(1, 3), replace=False):
            dx, dy = write_user(log, rng, day, "ab", arm, user, activity, p)
            x, y = x + dx, y + dy
        has_pre = kind == "window"
        for key, value in zip(("x", "y", "pre_x", "pre_y", "has_pre"),
                              (x, y, *(pre if has_pre else (0, 0)), int(has_pre)), strict=True):
            expected[arm][key].append(value)
    log.add(AB_DAYS[0], "ab", "c", "held-out", "impression", items=5, holdout=True)
    tmp = tmp_path_factory.mktemp("cuped-logs")
    log.write(tmp / "logs")
    first = sorted((tmp / "logs").glob("day=2026-01-10/events-ab-c-*.parquet"))[0]
    shutil.copy(first, first.with_name(first.stem + "-again.parquet"))  # drained twice
    config = {"experiments": [{"name": "ab", "salt": "ab-1", "arms": [
        {"name": "c", "weight": 0.5, "bundle": "lr-x", "control": True},
        {"name": "t", "weight": 0.5, "bundle": "deepfm-x"}]}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    return tmp / "logs", tmp / "experiments.yaml", expected


def write_user(log: LogWriter, rng, day: str, experiment: str, arm: str, user: str,
               activity: float, p: float) -> tuple[int, int]:
    """One visit: an impression of 1 + Poisson(activity) items and Binomial(items, p) downloads."""
    items = 1 + int(rng.poisson(activity))
    downloads = int(rng.binomial(items, min(p, 1.0)))
    log.add(day, experiment, arm, user, "impression", items=items)
    for _ in range(downloads):
        log.add(day, experiment, arm, user, "download")
    return items, downloads


def test_cuped_sums_are_the_users_with_their_pre_period(pre_period_logs):
    from ctrserve.service.experiments.cuped import CupedStats

    logs, _, expected = pre_period_logs
    con = warehouse.open_logs(logs)
    assert warehouse.first_day(con, "ab") == "2026-01-10"
    window = warehouse.cuped_window(con, "ab", 7)
    assert window == {"start": "2026-01-10", "pre_start": "2026-01-03",
                      "pre_end": "2026-01-09", "pre_days": 7}
    sums = warehouse.cuped_sums(con, "ab", window["start"], window["pre_start"])
    assert sums == {arm: CupedStats.from_user_arrays(**cols) for arm, cols in expected.items()}
    assert 0.6 < sums["c"].has_pre / sums["c"].users < 0.8  # the 01-01 users are not in it


def test_report_with_a_pre_period_carries_cuped_and_keeps_the_rest(pre_period_logs):
    logs, _, _ = pre_period_logs
    con = warehouse.open_logs(logs)
    plain = warehouse.build_report(con, "ab", "c", {"c": 0.5, "t": 0.5})
    rep = warehouse.build_report(con, "ab", "c", {"c": 0.5, "t": 0.5}, pre_days=7)
    assert without_cuped(rep) == plain
    assert rep["cuped"]["start"] == "2026-01-10"
    assert rep["total"]["methods"]["cuped"].startswith("CUPED")
    for metric in ("ctr", "cvr"):
        up = rep["total"]["arms"]["t"]["uplift"][metric]
        cuped = up["cuped"]
        print(metric, "plain", up["value"], up["lo"], up["hi"], "cuped", cuped["value"],
              cuped["lo"], cuped["hi"], "reduction", cuped["variance_reduction"])
        assert cuped["variance_reduction"] > 0.15
        assert cuped["hi"] - cuped["lo"] < up["hi"] - up["lo"]
        assert cuped["users_with_pre_period"] == sum(
            a["users_with_pre_period"] for a in rep["cuped"]["arms"].values())
        assert cuped["unadjusted"] == pytest.approx({k: up[k] for k in cuped["unadjusted"]},
                                                    rel=1e-9)
        assert cuped["sequential"]["lo"] < cuped["lo"] and cuped["pre_period"]["p_value"] > 0.001
    # a start the logs do not reach: nobody has activity in the 7 days before 01-20
    late = warehouse.build_report(con, "ab", "c", {"c": 0.5, "t": 0.5}, pre_days=7,
                                  start="2026-01-01")
    assert late["total"]["arms"]["t"]["uplift"]["ctr"]["cuped"]["variance_reduction"] == 0.0


def without_cuped(rep: dict) -> dict:
    """The report without what CUPED adds (the online report has no pre-period)."""
    out = json.loads(json.dumps(rep))
    out.pop("cuped", None)
    for period in [*out["days"].values(), out["total"]]:
        period["methods"].pop("cuped", None)
        for arm in period["arms"].values():
            for up in (arm["uplift"] or {}).values():
                up.pop("cuped", None)
    return out


def test_analyze_command_reports_cuped(pre_period_logs, capsys):
    logs, experiments_file, _ = pre_period_logs
    argv = ["analyze", "--logs", str(logs), "--experiment", "ab", "--experiments",
            str(experiments_file)]
    assert main([*argv, "--json"]) == 0  # --pre-days 7 by default
    rep = json.loads(capsys.readouterr().out)
    assert rep["cuped"]["pre_days"] == 7
    assert rep["total"]["arms"]["t"]["uplift"]["cvr"]["cuped"]["variance_reduction"] > 0.15
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "CUPED pre-period: 2026-01-03 to 2026-01-09" in text and "variance -" in text
    assert main([*argv, "--json", "--pre-days", "0"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "cuped" not in rep and rep == without_cuped(rep)
    assert main([*argv, "--start", "10/01/2026"]) == 2
    assert "--start: not a day YYYY-MM-DD" in capsys.readouterr().err
