"""The main job (`make demo`) on the embedded default: synthesize, train, export, then serve LR
(control), DeepFM and APG-DeepFM as A/B arms to simulated users for several days with the daily
retrain of every arm between the days, and print the per-day table and the per-arm report.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PRE_EXPERIMENT = "baseline"
RETRAIN_BASE_ROWS = 20_000  # rows of the synthetic world mixed into each retrain


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    seed: int = 2026
    days: int = 10
    impressions_per_day: int = 50_000
    models: tuple[str, ...] = ("lr", "deepfm", "apg-deepfm")
    # one epoch, five A/B days: the dashboard within 3 minutes on 2 cores (docs/experiments.md,
    # "The demo's simulated week"); DeepFM and APG-DeepFM peak on validation after the first
    # epoch here, LR gains 0.004 AUC from a second
    epochs: int = 1
    ab_days: int = 5  # simulated A/B days (LR control against the others); 0 skips it
    ab_requests_per_day: int = 1500
    pre_days: int = 2  # days served by LR alone before them: CUPED's pre-period
    retrain: bool = True  # the daily retrain of every arm between the days
    port: int = 8000  # the scorer's loopback port (a free one when it is taken)
    once: bool = False  # exit after the report instead of serving until interrupted
    progress: bool = True


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from ctrserve.loadtest.synth_logs import write_synthetic_logs
    from ctrserve.models import ModelConfig
    from ctrserve.training.data.synthetic import SyntheticSource
    from ctrserve.training.export import export_run
    from ctrserve.training.train import train

    data_dir = cfg.out / "data"
    if not (data_dir / "world.json").exists():
        write_synthetic_logs(data_dir, seed=cfg.seed, days=cfg.days,
                             impressions_per_day=cfg.impressions_per_day, progress=cfg.progress)
    source = SyntheticSource(str(data_dir))
    rows = []
    for name in cfg.models:
        _say(f"== training {name} ==")
        run_dir = cfg.out / "runs" / name
        info = train(source, ModelConfig(name=name), _train_config(cfg), run_dir,
                     progress=cfg.progress)
        bundle = export_run(run_dir, cfg.out / "registry")
        rows.append(_row(name, info, bundle))
    _say(format_table(rows))
    result: dict[str, Any] = {"data": str(data_dir), "models": rows}
    bundles = {r["model"]: Path(r["bundle"]).name for r in rows}
    ab_test = bool(cfg.ab_days and "lr" in bundles and len(bundles) > 1)
    if ab_test:
        result["ab_test"] = str(cfg.out / "ab_test.json")
    _write_json(cfg.out / "demo.json", result)  # before the A/B step, which may serve for hours
    if ab_test:
        run_ab_test(cfg, bundles)
    return result


def _write_json(path: Path, data: Any) -> None:
    import json

    path.write_text(json.dumps(data, indent=1) + "\n")


def run_ab_test(cfg: DemoConfig, bundles: dict[str, str]) -> dict[str, Any]:
    """Serve every model as an arm (LR the control, equal weights), simulate users day by day
    with the daily retrain between days, print the per-day table and the report; the days and
    the report go to OUT/ab_test.json before the scorer serves on until interrupted."""
    from ctrserve.loadtest.ab_days import ABDays, format_days, run_days
    from ctrserve.service.counts import format_full_report
    from ctrserve.service.redis_server import open_sync, stop_embedded
    from ctrserve.service.settings import Settings
    from ctrserve.training.retrain import RetrainOptions

    experiments = cfg.out / "experiments.yaml"
    experiments.write_text(experiments_yaml(bundles))
    arms = ", ".join(bundles)
    _say(f"== A/B test: {arms} (lr is the control), {cfg.ab_days} day(s) of "
              f"{cfg.ab_requests_per_day} requests" + (", daily retrains" if cfg.retrain else ""))
    retrain = RetrainOptions(warm_start=True, base_data=f"synth:{cfg.out / 'data'}",
                             base_rows=RETRAIN_BASE_ROWS, epochs=1) if cfg.retrain else None
    with _scorer(cfg, experiments) as scorer:
        url = scorer.url
        _say(f"the scorer is up: the dashboard fills in as the days run, "
             f"{url}/dashboard/ranker")
        client, embedded = open_sync(Settings(registry=cfg.out / "registry"))
        try:
            days = run_days(ABDays(url=url, world_dir=cfg.out / "data",
                                   registry=cfg.out / "registry", events_dir=cfg.out / "events",
                                   days=cfg.ab_days, requests_per_day=cfg.ab_requests_per_day,
                                   seed=cfg.seed, retrain=retrain, pre_days=cfg.pre_days,
                                   pre_experiment=PRE_EXPERIMENT), client,
                            _say)
        finally:
            stop_embedded(embedded)  # leaves the scorer's server running
        report = httpx.get(f"{url}/v1/experiments/ranker/report", timeout=30).json()
        _say(format_days(days, control="lr"))
        _say(format_full_report(report))
        result = {"experiments": str(experiments), "days": days, "report": report}
        _write_json(cfg.out / "ab_test.json", result)
        _say(f"results: {cfg.out / 'demo.json'}, {cfg.out / 'ab_test.json'}; scorer log: "
                  f"{scorer.log}")
        if not cfg.once:
            _say(next_steps(cfg, url))
            scorer.serve_until_interrupted()
    if cfg.once:
        _say(serve_again(cfg, experiments))
    return result


def next_steps(cfg: DemoConfig, url: str) -> str:
    registry = "" if cfg.out == Path("demo") else f" --registry {cfg.out / 'registry'}"
    return "\n".join([
        f"open the dashboard: {url}/dashboard/ranker   (API docs: {url}/docs)",
        "try next, in another terminal (source .venv/bin/activate first):",
        f"  ctrserve report --experiment ranker{registry}",
        f"  ctrserve analyze --experiment ranker --logs {cfg.out / 'events'} "
        f"--pre-days {cfg.pre_days}{registry}   # from the logs, with CUPED",
        f"  curl -s {url}/v1/experiments/ranker/report",
        f"  curl -s {url}/v1/models"])


def serve_again(cfg: DemoConfig, experiments: Path) -> str:
    """--once: the scorer has stopped; the command that serves the demo's arms again."""
    return ("the scorer has stopped (--once). To serve the demo's arms again:\n"
            f"  ctrserve serve --registry {cfg.out / 'registry'} --experiments {experiments} "
            f"--features {cfg.out / 'data'}\n"
            "then open http://127.0.0.1:8000/dashboard/ranker")


def experiments_yaml(bundles: dict[str, str]) -> str:
    """The experiment `ranker`: an arm per model at equal weights, LR the control; and
    `baseline`, LR alone, which serves the days before it (CUPED's pre-period)."""
    weights = [round(1 / len(bundles), 4)] * (len(bundles) - 1)
    weights.append(round(1 - sum(weights), 4))  # the weights add up to exactly 1
    arms = "\n".join(f"      - {{name: {model}, weight: {weight}, bundle: {name}"
                     f"{', control: true' if model == 'lr' else ''}}}"
                     for (model, name), weight in zip(bundles.items(), weights, strict=True))
    baseline = (f"  - name: {PRE_EXPERIMENT}\n    salt: baseline-demo\n    arms:\n"
                f"      - {{name: lr, weight: 1.0, bundle: {bundles['lr']}, control: true}}\n"
                if "lr" in bundles else "")
    return (f"experiments:\n  - name: ranker\n    salt: ranker-demo\n    arms:\n{arms}\n"
            + baseline)


@dataclass
class _Scorer:
    url: str
    log: Path
    proc: subprocess.Popen

    def serve_until_interrupted(self) -> None:
        print(f"serving at {self.url} until Ctrl-C", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            self.proc.wait()


@contextlib.contextmanager
def _scorer(cfg: DemoConfig, experiments: Path) -> Iterator[_Scorer]:
    """`ctrserve serve` in a subprocess on loopback, its log in OUT/scorer.log, stopped with
    SIGTERM. It binds cfg.port itself; where that port is taken it binds a free one (port 0)
    and its start-up line names it: no port is probed and handed over, which could be taken
    in between."""
    cmd = [sys.executable, "-m", "ctrserve", "serve", "--registry", str(cfg.out / "registry"),
           "--experiments", str(experiments), "--features", str(cfg.out / "data"),
           "--host", "127.0.0.1"]
    log = cfg.out / "scorer.log"
    proc, url = _start(cmd + ["--port", str(cfg.port)], log)
    if url is None and "is in use" in log.read_text():
        proc, url = _start(cmd + ["--port", "0"], log)
    try:
        if url is None:
            raise RuntimeError(f"the scorer exited: {log.read_text()[-1000:]}")
        _wait_ready(proc, url, log)
        yield _Scorer(url, log, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# uvicorn's start-up line with one worker, the parent's ("... with N workers") with more
RUNNING = re.compile(r"(?:Uvicorn|ctrserve) running on (http://127\.0\.0\.1:\d+)")


def _start(cmd: list[str], log: Path, timeout_s: float = 120
           ) -> tuple[subprocess.Popen, str | None]:
    """Start the scorer; its URL once its start-up line is logged, None if it exited first."""
    # the simulated days are the report's days: counts go by each request's own timestamp
    env = {**os.environ, "CTRSERVE_CLOCK": "client"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := RUNNING.search(log.read_text(errors="replace")):
            return proc, match.group(1)
        if proc.poll() is not None:
            return proc, None
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the scorer did not start within {timeout_s:.0f} s: "
                       f"{log.read_text()[-1000:]}")


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the scorer exited: {log.read_text()[-1000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the scorer was not ready within {timeout_s:.0f} s")


def _train_config(cfg: DemoConfig):
    from ctrserve.training.train import TrainConfig

    # the settings of the model comparison on this world (docs/training.md, "Results")
    return TrainConfig(epochs=cfg.epochs, seed=cfg.seed, learning_rate=3e-3, l2_embedding=1e-3)


def _row(name: str, info: dict[str, Any], bundle: Path) -> dict[str, Any]:
    import json

    manifest = json.loads((bundle / "manifest.json").read_text())
    test = info["metrics"]["test"]
    return {"model": name, "test_auc": test["auc"], "test_logloss": test["logloss"],
            "calibration": test["calibration"], "best_epoch": info["best_epoch"],
            "samples_per_second": info["train_samples_per_second"],
            "parity": manifest["parity"]["max_abs_diff"], "bundle": str(bundle)}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<12}{'test AUC':>10}{'logloss':>10}{'calib.':>8}{'samples/s':>11}"
            f"{'parity':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<12}{r['test_auc']:>10.4f}{r['test_logloss']:>10.4f}"
                     f"{r['calibration']:>8.3f}{r['samples_per_second']:>11,.0f}"
                     f"{r['parity']:>10.1e}")
    return "\n".join(lines)


def _say(text: str) -> None:
    """The demo's tables and next steps (--no-progress turns off only the progress bars)."""
    print(text, flush=True)
