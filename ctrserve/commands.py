"""What each CLI command does, in terms of the library; returns a JSON-able summary."""

from __future__ import annotations

import argparse
from typing import Any

from ctrserve.errors import UserError
from features.spec import SpecError

USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)


def synth(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.synth_logs import write_synthetic_logs

    summary = write_synthetic_logs(args.out, seed=args.seed, days=args.days,
                                   impressions_per_day=args.impressions_per_day,
                                   progress=not args.no_progress, n_users=args.users,
                                   n_apps=args.apps)
    return {k: v for k, v in summary.items() if k != "files"}


def _configs(args: argparse.Namespace, model: str):
    """ModelConfig and TrainConfig from the shared model and training flags."""
    import torch

    from models import MODELS, ModelConfig
    from training.train import TrainConfig

    if model not in MODELS:
        raise SpecError(f"--model: unknown model {model!r}; expected one of {sorted(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model_cfg = ModelConfig(
            name=model, embedding_dim=args.embedding_dim, mlp=args.mlp,
            dropout=args.dropout, batch_norm=args.batch_norm, apg_rank=args.apg_rank,
            apg_overparam=args.apg_overparam, apg_condition=args.apg_condition,
            apg_condition_fields=args.apg_condition_fields)
        train_cfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
            optimizer=args.optimizer, l2_embedding=args.l2_embedding, patience=args.patience,
            seed=args.seed, buffer_rows=args.buffer_rows, lr_scaling=args.lr_scaling,
            device=args.device)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return model_cfg, train_cfg


def train(args: argparse.Namespace) -> dict[str, Any]:
    from training.data import open_source
    from training.train import train

    model_cfg, train_cfg = _configs(args, args.model)
    source = open_source(args.data)
    info = train(source, model_cfg, train_cfg, args.out, progress=not args.no_progress)
    return {"run": str(args.out), "test": info["metrics"]["test"],
            "best_epoch": info["best_epoch"],
            "train_samples_per_second": round(info["train_samples_per_second"])}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from training.compare import compare, markdown_table
    from training.data import open_source

    configs = [_configs(args, name) for name in args.models]
    source = open_source(args.data)
    result = compare(source, [m for m, _ in configs], configs[0][1], list(args.seeds), args.out,
                     progress=not args.no_progress)
    print(markdown_table(result["summary"]))
    return {"results": str(args.out / "results.json"), "table": str(args.out / "results.md")}


def export(args: argparse.Namespace) -> str:
    """Prints the bundle's path alone, so scripts can capture it."""
    from training.export import export_run

    return str(export_run(args.run_dir, args.registry))


def verify(args: argparse.Namespace) -> dict[str, Any]:
    from bundles import load_bundle

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    return {"bundle": str(bundle.path), "version": m.version, "model_type": m.model_type,
            "parity_max_abs_diff": m.parity.max_abs_diff, "sha256": m.sha256, "ok": True}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, seed=args.seed, days=args.days,
                     impressions_per_day=args.impressions_per_day, models=args.models,
                     epochs=args.epochs, progress=not args.no_progress)
    return run_demo(cfg)
