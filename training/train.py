"""The training loop: fit the encoder, train with early stopping on validation AUC, write a run."""

from __future__ import annotations

import copy
import json
import platform
import random
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ctrserve.features import FeatureEncoder
from ctrserve.models import CTRModel, ModelConfig, build_model
from ctrserve.training.abundance import write_abundance
from ctrserve.training.batches import BatchStream, Encoded, encode_split
from ctrserve.training.data.inspect import inspect_source
from ctrserve.training.data.source import DataSource, checked_chunks
from ctrserve.training.distributed import World, init_world, leave, scaled_lr, wrap
from ctrserve.training.evaluate import evaluate
from ctrserve.training.run_dir import write_run
from ctrserve.training.warm_start import load_weights

OPTIMIZERS = ("adam", "adagrad")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    l2_embedding: float = 0.0
    patience: int = 2
    seed: int = 2026
    buffer_rows: int = 1_000_000
    lr_scaling: str = "none"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(source: DataSource, model_config: ModelConfig, cfg: TrainConfig, out: Path,
          progress: bool = True, warm_start: WarmStart | None = None,
          warn: bool = True) -> dict[str, Any]:
    """Train on `source`, evaluate the best epoch on its test split, write the run to `out`.

    With `warm_start`, its encoder is used as it is (not refitted) and the model starts from
    its weights (training/warm_start.py). The data's warnings go to stderr unless `warn` is
    false (they are in the run's `inspect` either way)."""
    world = init_world(cfg.device)
    try:
        return _train(source, model_config, cfg, out, world, progress and world.is_main,
                      warm_start, warn)
    finally:
        leave(world)


@dataclass
class WarmStart:
    encoder: FeatureEncoder
    weights: dict[str, np.ndarray]
    require_all: bool = False  # every weight given must fit (a run's embedding table)
    source: str | None = None  # recorded in run.json's warm_start


def _train(source: DataSource, model_config: ModelConfig, cfg: TrainConfig, out: Path,
           world: World, progress: bool, warm: WarmStart | None, warn: bool
           ) -> dict[str, Any]:
    seed_everything(cfg.seed)
    report = _data_report(source, warn) if world.is_main else None
    encoder, positive_rate = _fit_encoder(source, warm.encoder if warm else None)
    model = build_model(model_config, encoder.layout())
    model.set_prior(positive_rate)
    warm_info = load_weights(model, warm.weights, warm.require_all) if warm else None
    if warm_info and warm.source:
        warm_info["source"] = warm.source
    model = model.to(cfg.device)
    valid, test = encode_split(source, "valid", encoder), encode_split(source, "test", encoder)
    stream = BatchStream(source, encoder, cfg.batch_size, cfg.seed, cfg.buffer_rows,
                         world.rank, world.size)
    trainer = _Trainer(model, cfg, world)
    curve, best, best_state, stale = [], -1.0, None, 0
    for epoch in range(1, cfg.epochs + 1):
        loss, seconds, samples = trainer.epoch(stream, epoch, progress)
        scores = evaluate(model, valid)
        curve.append({"epoch": epoch, "train_loss": loss, "valid_auc": scores["auc"],
                      "valid_logloss": scores["logloss"], "seconds": seconds,
                      "samples_per_second": samples / seconds})
        if progress:
            tqdm.write(f"epoch {epoch}: loss {loss:.4f}  valid AUC {scores['auc']:.4f}  "
                       f"logloss {scores['logloss']:.4f}  {samples / seconds:,.0f} samples/s",
                       file=sys.stderr)  # progress on stderr: stdout is the command's result
        if scores["auc"] > best:
            best, best_state, stale = scores["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    info = _run_info(source, model_config, cfg, world, curve, model, valid, test)
    info["warm_start"] = warm_info
    if report is not None:
        info["inspect"] = {k: v for k, v in report.items() if k != "data"}  # data: info's own
    if world.is_main:
        write_run(out, info, curve, encoder, model.cpu(), test)
        write_abundance(out, model, encoder.layout())
    return info


_REPORTS: weakref.WeakKeyDictionary[DataSource, dict[str, Any]] = weakref.WeakKeyDictionary()


def _data_report(source: DataSource, warn: bool) -> dict[str, Any]:
    """`ctrserve inspect`'s numbers for run.json, its warnings on stderr before training.
    Once per source: compare and scaling train one source many times."""
    if source not in _REPORTS:
        _REPORTS[source] = report = inspect_source(source)
        for warning in report["warnings"] if warn else ():
            print(f"warning: data: {warning}", file=sys.stderr, flush=True)
    return _REPORTS[source]


def _fit_encoder(source: DataSource, fitted: FeatureEncoder | None = None
                 ) -> tuple[FeatureEncoder, float]:
    """One pass over the training split: encoder state (`fitted` when given) and the
    positive rate."""
    counts = np.zeros(2)

    def columns():
        for chunk in checked_chunks(source, "train"):
            labels = chunk.table.column(source.spec.label).to_numpy()
            counts[:] += (labels.sum(), len(labels))
            yield {name: chunk.table.column(name) for name in source.spec.names}

    if fitted is not None:
        for _ in columns():
            pass
        return fitted, float(counts[0] / counts[1])
    encoder = FeatureEncoder.fit(source.spec, columns())
    return encoder, float(counts[0] / counts[1])


class _Trainer:
    """One model's optimiser state and the epoch loop (DDP-wrapped when world > 1)."""

    def __init__(self, model: CTRModel, cfg: TrainConfig, world: World):
        self.model, self.cfg, self.world = model, cfg, world
        self.net = wrap(model, world, cfg.device)
        lr = scaled_lr(cfg.learning_rate, cfg.lr_scaling, world)
        opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.Adagrad
        self.optimizer = opt(model.parameters(), lr=lr)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def epoch(self, stream: BatchStream, epoch: int, progress: bool) -> tuple[float, float, int]:
        self.model.train()
        total, steps, samples = 0.0, 0, 0
        start = time.perf_counter()
        # disable=None: no bar where stderr is not a terminal (a log file gets no bar lines)
        bar = tqdm(stream, desc=f"epoch {epoch}", unit="batch",
                   disable=None if progress else True, leave=False)
        for inputs, labels in bar:
            loss = self.step(inputs, labels)
            total, steps = total + loss, steps + 1
            samples += len(labels) * self.world.size
            if steps % 50 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        return total / max(steps, 1), time.perf_counter() - start, samples

    def step(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        device = self.cfg.device
        inputs = tuple(x.to(device, non_blocking=True) for x in inputs)
        labels = labels.to(device, non_blocking=True)
        logits = self.net(*inputs)
        loss = self.loss_fn(logits, labels)
        if self.cfg.l2_embedding > 0:
            penalty = sum(e.pow(2).sum() for e in self.model.regularized_embeddings())
            loss = loss + self.cfg.l2_embedding * penalty / len(labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _run_info(source: DataSource, model_config: ModelConfig, cfg: TrainConfig, world: World,
              curve: list[dict[str, Any]], model: CTRModel, valid: Encoded,
              test: Encoded) -> dict[str, Any]:
    best_epoch = max(curve, key=lambda e: e["valid_auc"])["epoch"]
    seconds = sum(e["seconds"] for e in curve)
    samples = sum(e["samples_per_second"] * e["seconds"] for e in curve)
    return {
        "model": model_config.to_dict(),
        "train": asdict(cfg),
        "data": json.loads(json.dumps(source.describe(), default=str)),
        "metrics": {"valid": evaluate(model, valid), "test": evaluate(model, test)},
        "best_epoch": best_epoch,
        "epochs_run": len(curve),
        "train_samples_per_second": samples / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": world.size,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "device": cfg.device},
    }
