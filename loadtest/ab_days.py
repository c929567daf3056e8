"""Simulated A/B days with the daily retrain between them, against a running scorer.

Each day: the simulator's users use the scorer for one day of simulated time; the event log is
drained; every arm is retrained on the logged days (its challenger gated against the champion
on the day just served, and deployed when it passes); the scorer is given until it serves the
deployed versions before the next day starts. The record per day holds each arm's online
figures from the simulator (CTR observed, and the true CTR of what it showed, from the world's
hidden probabilities) and each arm's retrain decision with both models' held-out AUC.
This is the DeepFM paper's seven-day online test with daily model updates, in miniature.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import redis

from ctrserve.loadtest.simulator import SimConfig, default_start_day, simulate
from ctrserve.training.retrain import RetrainError, RetrainOptions, arms_of, retrain

Say = Callable[[str], None]


@dataclass
class ABDays:
    url: str
    world_dir: Path
    registry: Path
    events_dir: Path
    experiment: str = "ranker"
    days: int = 7
    requests_per_day: int = 1500
    seed: int = 2026
    retrain: RetrainOptions | None = field(default_factory=RetrainOptions)  # None: no retrains
    progress: bool = False
    # days served by `pre_experiment` before the A/B days: the users' activity before the
    # experiment, CUPED's covariate (`ctrserve analyze --pre-days N`)
    pre_days: int = 0
    pre_experiment: str = "baseline"


def run_days(cfg: ABDays, client: redis.Redis, say: Say = print) -> list[dict[str, Any]]:
    """Serve, drain and retrain day by day; one record per day."""
    from ctrserve.service.event_log import drain

    first = default_start_day(cfg.world_dir)
    for index in range(cfg.pre_days):
        day = first + dt.timedelta(days=index)
        summary = simulate(cfg.world_dir, _one_day(cfg, day, cfg.pre_experiment,
                                                   cfg.seed + PRE_SEEDS + index))
        drain(client, cfg.events_dir)
        say(f"pre-period {day}: {summary['requests']['answered']:,} requests served by "
            f"experiment {cfg.pre_experiment}")
    start = first + dt.timedelta(days=cfg.pre_days)
    records = []
    for index in range(cfg.days):
        day = start + dt.timedelta(days=index)
        summary = simulate(cfg.world_dir, _one_day(cfg, day, cfg.experiment, cfg.seed + index))
        drain(client, cfg.events_dir)
        record = {"day": day.isoformat(), "arms": _online(summary),
                  "failed_requests": summary["requests"]["failed"]}
        say(format_online(record))
        needed = 2 if cfg.retrain and cfg.retrain.base_data else 3  # logged days
        if cfg.retrain is not None and needed <= index + 1 < cfg.days:
            record["retrains"] = _retrain_all(cfg, client, say)
            _await_versions(cfg.url, record["retrains"])
        records.append(record)
    return records


PRE_SEEDS = 1000  # the pre-period's days draw other requests than the A/B days


def _one_day(cfg: ABDays, day: dt.date, experiment: str, seed: int) -> SimConfig:
    return SimConfig(url=cfg.url, days=1, requests_per_day=cfg.requests_per_day, seed=seed,
                     start_day=day, experiment=experiment, progress=cfg.progress)


def _online(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = ("requests", "impressions", "downloads", "users", "ctr", "true_ctr", "cvr",
            "model_versions")
    return {arm: {k: a[k] for k in keys} for arm, a in summary["arms"].items()}


def _retrain_all(cfg: ABDays, client: redis.Redis, say: Say) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    sources: dict[str, Any] = {}  # this round's data, shared by arms that read the same rows
    for arm in arms_of(client, cfg.experiment):
        def tell(line: str, arm: str = arm) -> None:
            if cfg.progress:
                say(f"  retrain {arm}: {line}")

        try:
            run = retrain(cfg.experiment, arm, cfg.registry, cfg.events_dir, client,
                          replace(cfg.retrain), tell, sources)
        except RetrainError as exc:
            out[arm] = {"decision": "failed", "error": str(exc)}
            continue
        out[arm] = _decision(run)
        say(format_decision(arm, out[arm]))
    return out


def _decision(run: dict[str, Any]) -> dict[str, Any]:
    metrics = run.get("metrics", {})
    return {"decision": run["decision"], "reasons": run.get("gate", {}).get("reasons", []),
            "champion_auc": metrics.get("champion", {}).get("auc"),
            "challenger_auc": metrics.get("challenger", {}).get("auc"),
            "challenger_calibration": metrics.get("challenger", {}).get("calibration"),
            "test_rows": metrics.get("champion", {}).get("rows"),
            "version": run.get("challenger", {}).get("version"),
            "seconds": _seconds(run)}


def _seconds(run: dict[str, Any]) -> float | None:
    try:
        start = dt.datetime.fromisoformat(run["started_at"])
        return (dt.datetime.fromisoformat(run["finished_at"]) - start).total_seconds()
    except (KeyError, ValueError):
        return None


def _await_versions(url: str, retrains: dict[str, dict[str, Any]],
                    timeout_s: float = 60) -> None:
    """Until the scorer serves every version just deployed (it polls the state in Redis)."""
    wanted = {r["version"] for r in retrains.values() if r["decision"] == "deployed"}
    deadline = time.monotonic() + timeout_s
    while wanted and time.monotonic() < deadline:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
        if wanted <= {m["version"] for m in models}:
            return
        time.sleep(0.2)
    if wanted:
        raise RuntimeError(f"the scorer did not load {sorted(wanted)} within {timeout_s:.0f} s")


def format_online(record: dict[str, Any]) -> str:
    return f"{record['day']}  " + "  ".join(
        f"{arm}: CTR {a['ctr']:.4f} (true {a['true_ctr']:.4f}, {a['impressions']} shown)"
        for arm, a in record["arms"].items())


def format_decision(arm: str, d: dict[str, Any]) -> str:
    if d["decision"] == "failed":
        return f"  retrain {arm}: failed: {d['error']}"
    auc = (f"AUC champion {d['champion_auc']:.4f} challenger {d['challenger_auc']:.4f}"
           if d.get("challenger_auc") is not None else "")
    why = f" ({'; '.join(d['reasons'])})" if d["reasons"] else ""
    return f"  retrain {arm}: {auc} -> {d['decision']}{why}"


RETRAIN_HEAD = "retrain: new vs old AUC"


def format_days(records: list[dict[str, Any]], control: str) -> str:
    """A table per day: each arm's online CTR (observed, true) and its retrain decision."""
    arms = list(records[0]["arms"]) if records else []
    head = f"{'day':<11}" + "".join(f"{a + ' CTR':>14}{'true':>8}{RETRAIN_HEAD:>30}"
                                    for a in arms)
    lines = [head, "-" * len(head)]
    for r in records:
        cells = []
        for arm in arms:
            a, d = r["arms"].get(arm, {}), r.get("retrains", {}).get(arm)
            cells.append(f"{a.get('ctr') or 0:>14.4f}{a.get('true_ctr') or 0:>8.4f}"
                         f"{_short(d):>30}")
        lines.append(f"{r['day']:<11}" + "".join(cells))
    lines.append(_uplift_line(records, arms, control))
    return "\n".join(lines)


def _short(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    if d.get("challenger_auc") is None:
        return d["decision"]
    return f"{d['decision']} {d['challenger_auc']:.3f} vs {d['champion_auc']:.3f}"


def _uplift_line(records: list[dict[str, Any]], arms: list[str], control: str) -> str:
    def true_ctr(arm: str) -> float:
        shown = sum(r["arms"][arm]["impressions"] for r in records if arm in r["arms"])
        expected = sum(r["arms"][arm]["true_ctr"] * r["arms"][arm]["impressions"]
                       for r in records if arm in r["arms"])
        return expected / shown if shown else 0.0

    base = true_ctr(control) if control in arms else 0.0
    parts = [f"{arm} {true_ctr(arm) / base - 1:+.1%}" for arm in arms if arm != control and base]
    return f"true CTR over the days vs {control}: " + ", ".join(parts)
