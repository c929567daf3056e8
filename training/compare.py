"""`ctrserve compare`: several models x several seeds on one data split, one table.

Every model trains on the same source with the same training settings; the table gives
test AUC and logloss as mean and standard deviation over seeds, calibration, the best epoch
of each seed, and training throughput; a line per finished run goes to stderr.
Writes results.json (every run) and results.md (the table) to the output directory.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ctrserve.models import ModelConfig
from ctrserve.training.data.source import DataSource
from ctrserve.training.evaluate import metrics
from ctrserve.training.train import TrainConfig, train


def compare(source: DataSource, models: list[ModelConfig], train_cfg: TrainConfig,
            seeds: list[int], out: Path, progress: bool = True) -> dict[str, Any]:
    runs = []
    for model in models:
        for seed in seeds:
            if progress:
                print(f"== {model.name} seed {seed} ==", flush=True)
            run_dir = out / "runs" / f"{model.name}-seed{seed}"
            started = time.perf_counter()
            info = train(source, model, replace(train_cfg, seed=seed), run_dir, progress=progress)
            runs.append({"model": model.name, "seed": seed, "run": str(run_dir),
                         "test": info["metrics"]["test"], "best_epoch": info["best_epoch"],
                         "samples_per_second": info["train_samples_per_second"]})
            print(run_line(runs[-1], time.perf_counter() - started), file=sys.stderr,
                  flush=True)  # with or without bars: a long comparison is never silent
    summary = [_summarise(model.name, [r for r in runs if r["model"] == model.name])
               for model in models]
    if hasattr(source, "true_probabilities"):  # a synthetic world knows the ceiling
        labels, truth = source.true_probabilities("test")
        oracle = metrics(labels, truth)
        summary.append({"model": "oracle (true probability)", "auc": oracle["auc"],
                        "auc_std": 0.0, "logloss": oracle["logloss"], "logloss_std": 0.0,
                        "calibration": oracle["calibration"],
                        "samples_per_second": float("nan"), "seeds": 0})
    result = {"source": source.describe(), "train": asdict(train_cfg),
              "models": [m.to_dict() for m in models], "seeds": seeds,
              "summary": summary, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "results.md").write_text(markdown_table(summary) + "\n")
    return result


def run_line(run: dict[str, Any], seconds: float) -> str:
    t = run["test"]
    return (f"{run['model']} seed {run['seed']}: test AUC {t['auc']:.4f}, logloss "
            f"{t['logloss']:.4f}, calibration {t['calibration']:.3f}, best epoch "
            f"{run['best_epoch']} ({seconds:.0f} s)")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    auc, auc_sd = mean_sd([r["test"]["auc"] for r in runs])
    ll, ll_sd = mean_sd([r["test"]["logloss"] for r in runs])
    speed, _ = mean_sd([r["samples_per_second"] for r in runs])
    calibration, _ = mean_sd([r["test"]["calibration"] for r in runs])
    return {"model": name, "auc": auc, "auc_std": auc_sd, "logloss": ll, "logloss_std": ll_sd,
            "calibration": calibration, "best_epochs": [r["best_epoch"] for r in runs],
            "samples_per_second": speed, "seeds": len(runs)}


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """Calibration: mean predicted probability over the observed click rate (1 is right)."""
    lines = ["| model | test AUC | test logloss | calibration | best epoch | train samples/s "
             "| seeds |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        calibration = f"{s['calibration']:.3f}" if "calibration" in s else "-"
        epochs = ", ".join(str(e) for e in s.get("best_epochs", [])) or "-"
        lines.append(f"| {s['model']} | {s['auc']:.4f} ± {s['auc_std']:.4f} | "
                     f"{s['logloss']:.4f} ± {s['logloss_std']:.4f} | {calibration} | {epochs} | "
                     f"{_speed(s['samples_per_second'])} | {s['seeds'] or '-'} |")
    return "\n".join(lines)


def _speed(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"
