"""`ctrserve retrain`: train a challenger on the logged events, gate it against the champion,
deploy it to the arm when it passes.

Steps (a failure names its step; the champion keeps serving whatever fails):
  champion  the bundle the arm serves now (Redis deployment state) and its manifest
  data      EventLogSource over the drained event log, with the champion's encoder spec
  train     the champion's model type and hyper-parameters on all days but the last two
  export    ONNX export with the parity check, into REGISTRY/.retrain/staging (not served)
  evaluate  challenger and champion through their bundles (encoder + ONNX session) on the
            held-out last day: AUC, logloss, calibration (mean predicted / observed rate)
  gate      AUC >= champion - tolerance, logloss <= champion + tolerance, calibration within
            bounds, export parity passed
  deploy    install the bundle in the registry and `deployments.deploy` it to the arm

Each run is recorded as JSON in REGISTRY/.retrain/<experiment>--<arm>--<last day>.json. A run
key that already has a recorded decision (deployed or rejected) is not trained again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import redis

from ctrserve.errors import UserError

RETRAIN_DIR = ".retrain"
FINAL = ("deployed", "rejected")


class RetrainError(UserError):
    """A retrain step that failed; nothing was deployed."""


@dataclass
class Gate:
    auc_tolerance: float = 0.005
    logloss_tolerance: float = 0.005
    calibration_bounds: tuple[float, float] = (0.8, 1.25)

    def check(self, challenger: dict[str, float], champion: dict[str, float],
              parity: dict[str, Any] | None) -> list[str]:
        """The reasons to reject the challenger (empty: it passes)."""
        reasons = []
        if parity is None or not parity["max_abs_diff"] <= parity["tolerance"]:
            reasons.append(f"export parity failed ({parity})")
        c, p = challenger, champion
        if not c["auc"] >= p["auc"] - self.auc_tolerance:
            reasons.append(f"AUC {c['auc']:.4f} < champion {p['auc']:.4f} - "
                           f"{self.auc_tolerance}")
        if not c["logloss"] <= p["logloss"] + self.logloss_tolerance:
            reasons.append(f"logloss {c['logloss']:.4f} > champion {p['logloss']:.4f} + "
                           f"{self.logloss_tolerance}")
        low, high = self.calibration_bounds
        if not low <= c["calibration"] <= high:
            reasons.append(f"calibration {c['calibration']:.3f} outside [{low}, {high}]")
        return reasons


@dataclass
class RetrainOptions:
    window_days: int = 7
    gate: Gate = field(default_factory=Gate)
    epochs: int | None = None  # default: the champion's
    shuffle_labels: bool = False  # test/diagnostic: a deliberately bad challenger
    who: str = "ctrserve retrain"
    seed: int | None = None  # default: the champion's


def run_key(experiment: str, arm: str, day: str) -> str:
    return f"{experiment}--{arm}--{day}"


def record_path(registry: Path, key: str) -> Path:
    return registry / RETRAIN_DIR / f"{key}.json"


def retrain(experiment: str, arm: str, registry: str | Path, events_dir: str | Path,
            client: redis.Redis, options: RetrainOptions | None = None,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """One retrain of `experiment`/`arm`; returns the run record (also written to disk)."""
    from bundles import load_bundle
    from service.deployments import current

    opts = options or RetrainOptions()
    registry = Path(registry)
    record: dict[str, Any] = {
        "experiment": experiment, "arm": arm, "events": str(events_dir),
        "started_at": _now(), "options": _options(opts), "decision": None}
    steps = _Steps(record, say, registry)

    with steps("champion"):
        champion_name = current(client, experiment, arm)
        if champion_name is None:
            raise RetrainError(f"{experiment}/{arm}: no deployment state in Redis (a scorer "
                               "records its experiments' arms when it starts)")
        champion = load_bundle(registry / champion_name)
        record["champion"] = {"bundle": champion_name, "version": champion.version,
                              "model_type": champion.manifest.model_type}
        say(f"champion: {champion_name}")

    with steps("data"):
        source = _source(champion, experiment, events_dir, client, opts)
        key = run_key(experiment, arm, source.last_day.isoformat())
        record.update(key=key, data=source.describe())
        steps.key = key
        splits = record["data"]["splits"]
        say("data: " + ", ".join(f"{s} {v['first_day']}..{v['last_day']} ({v['rows']} rows, "
                                 f"{v['positives']} positive)" for s, v in splits.items()))
        previous = _read(record_path(registry, key))
        if previous and previous.get("decision") in FINAL:
            say(f"already ran for {key}: {previous['decision']}; nothing to do")
            return {**previous, "skipped": True}

    work = registry / RETRAIN_DIR / "work" / key
    shutil.rmtree(work, ignore_errors=True)
    with steps("train"):
        from models import ModelConfig
        from training.train import TrainConfig, train

        hyper = champion.manifest.hyperparameters
        model_config = ModelConfig.from_dict(hyper["model"])
        train_args = {**hyper.get("train", {}), "device": "cpu"}
        if opts.epochs is not None:
            train_args["epochs"] = opts.epochs
        if opts.seed is not None:
            train_args["seed"] = opts.seed
        train_cfg = TrainConfig(**train_args)
        say(f"train: {model_config.name}, {train_cfg.epochs} epoch(s)")
        info = train(source, model_config, train_cfg, work / "run", progress=False)
        record["train"] = {"model": info["model"], "train": info["train"],
                           "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"],
                           "metrics_torch": info["metrics"]}

    parity = None
    with steps("export"):
        from training.export import ExportError, export_run

        try:
            staged = export_run(work / "run", work / "staging")
        except ExportError as exc:
            staged = None
            record["export_error"] = str(exc)
            say(f"export: {exc}")
        else:
            challenger = load_bundle(staged)
            parity = challenger.manifest.parity.model_dump()
            record["challenger"] = {"bundle": staged.name, "version": challenger.version}
            say(f"export: {staged.name} (parity {parity['max_abs_diff']:.1e})")

    with steps("evaluate"):
        test = pa.concat_tables([c.table for c in source.chunks("test")])
        metrics = {"champion": bundle_metrics(champion, test, source.spec.label)}
        if staged is not None:
            metrics["challenger"] = bundle_metrics(challenger, test, source.spec.label)
        record["metrics"] = metrics
        for who, m in metrics.items():
            say(f"evaluate: {who:<10} AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  "
                f"calibration {m['calibration']:.3f}  ({m['rows']} rows)")

    with steps("gate"):
        if staged is None:
            reasons = ["export parity failed: " + record.get("export_error", "")]
        else:
            reasons = opts.gate.check(metrics["challenger"], metrics["champion"], parity)
        record["gate"] = {"passed": not reasons, "reasons": reasons}
        say("gate: passed" if not reasons else "gate: rejected: " + "; ".join(reasons))

    if reasons:
        record["decision"] = "rejected"
    else:
        with steps("deploy"):
            from service.deployments import deploy

            target = registry / staged.name
            if not target.exists():
                tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=registry))
                shutil.copytree(staged, tmp, dirs_exist_ok=True)
                os.replace(tmp, target)
            c, p = metrics["challenger"], metrics["champion"]
            why = (f"retrain {key}: AUC {c['auc']:.4f} vs {p['auc']:.4f}, logloss "
                   f"{c['logloss']:.4f} vs {p['logloss']:.4f}")
            record["deployment"] = deploy(client, experiment, arm, staged.name, opts.who, why,
                                          registry=registry)
            record["decision"] = "deployed"
            say(f"deploy: {experiment}/{arm} -> {staged.name}")
    shutil.rmtree(work / "staging", ignore_errors=True)
    record["finished_at"] = _now()
    steps.write()
    return record


def bundle_metrics(bundle: Any, table: pa.Table, label: str,
                   batch_rows: int = 50_000) -> dict[str, float]:
    """A bundle's metrics on raw rows: its own encoder and ONNX session, as the scorer runs."""
    from training.evaluate import metrics

    probs = []
    for start in range(0, table.num_rows, batch_rows):
        part = table.slice(start, batch_rows)
        columns = {f: part.column(f).to_pylist() for f in bundle.encoder.spec.names}
        feeds = bundle.encoder.transform(columns)
        probs.append(bundle.session.run(None, feeds)[0].reshape(-1))
    labels = table.column(label).to_numpy().astype(np.float32)
    return metrics(labels, np.concatenate(probs))


def _source(champion: Any, experiment: str, events_dir: str | Path, client: redis.Redis,
            opts: RetrainOptions) -> Any:
    from training.data.events import EventLogSource

    def items(ids: list[str]) -> dict[str, dict[str, Any]]:
        from service.feature_store import item_key

        raws = client.mget([item_key(i) for i in ids]) if ids else []
        return {i: json.loads(r) for i, r in zip(ids, raws, strict=True) if r}

    return EventLogSource(events_dir, opts.window_days, champion.encoder.spec,
                          item_records=items, experiment=experiment,
                          shuffle_labels=opts.shuffle_labels)


class _Steps:
    """Runs the steps: prints which failed and records the failure before re-raising."""

    def __init__(self, record: dict[str, Any], say: Callable[[str], None], registry: Path):
        self.record, self.say, self.registry = record, say, registry
        self.key: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.record["step"] = name
        try:
            yield
        except Exception as exc:
            self.record.update(decision="failed", failed_step=name, error=str(exc),
                               finished_at=_now())
            self.say(f"{name}: FAILED: {exc}")
            self.write()
            if isinstance(exc, UserError):
                raise RetrainError(f"step {name!r} failed: {exc}") from exc
            raise RetrainError(f"step {name!r} failed: {type(exc).__name__}: {exc}") from exc

    def write(self) -> None:
        self.record.pop("step", None)
        key = self.key or run_key(self.record["experiment"], self.record["arm"], "unknown")
        path = record_path(self.registry, key)
        if self.record.get("decision") == "failed" and path.exists():
            previous = _read(path)
            if previous and previous.get("decision") in FINAL:
                return  # never overwrite a finished run with a later failure
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str, sort_keys=True))
        os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _options(opts: RetrainOptions) -> dict[str, Any]:
    return asdict(opts)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
