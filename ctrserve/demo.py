"""The README's main job on the embedded default: synthesize, train, export, report.

Grows with the product: later steps serve the bundles and simulate an A/B test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    seed: int = 2026
    days: int = 10
    impressions_per_day: int = 50_000
    models: tuple[str, ...] = ("lr", "fm", "deepfm", "apg-deepfm")
    epochs: int = 5
    progress: bool = True


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from loadtest.synth_logs import write_synthetic_logs
    from models import ModelConfig
    from training.data.synthetic import SyntheticSource
    from training.export import export_run
    from training.train import train

    data_dir = cfg.out / "data"
    if not (data_dir / "world.json").exists():
        write_synthetic_logs(data_dir, seed=cfg.seed, days=cfg.days,
                             impressions_per_day=cfg.impressions_per_day, progress=cfg.progress)
    source = SyntheticSource(str(data_dir))
    rows = []
    for name in cfg.models:
        _say(cfg, f"== training {name} ==")
        run_dir = cfg.out / "runs" / name
        info = train(source, ModelConfig(name=name), _train_config(cfg), run_dir,
                     progress=cfg.progress)
        bundle = export_run(run_dir, cfg.out / "registry")
        rows.append(_row(name, info, bundle))
    table = format_table(rows)
    _say(cfg, table)
    return {"data": str(data_dir), "models": rows}


def _train_config(cfg: DemoConfig):
    from training.train import TrainConfig

    # the settings of the README's model comparison on this world (lr and L2 chosen there)
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


def _say(cfg: DemoConfig, text: str) -> None:
    if cfg.progress:
        print(text, flush=True)
