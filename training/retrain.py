"""`ctrserve retrain`: train a challenger on the logged events, gate it against the champion,
deploy it to the arm when it passes.

Steps (a failure names its step; the champion keeps serving whatever fails):
  champion  the bundle the arm serves now (Redis deployment state) and its manifest
  data      EventLogSource over the drained event log, with the champion's encoder spec and
            the attribution window; optionally behind a base dataset (MixedSource)
  train     the champion's model type and hyper-parameters on all days but the last two;
            warm-started from the champion's weights and encoder when asked
  export    ONNX export with the parity check, into REGISTRY/.retrain/work/<key> (not served)
  evaluate  challenger and champion through their bundles (encoder + ONNX session) on the
            held-out last day: AUC, logloss, calibration (mean predicted / observed rate)
  gate      AUC >= champion - tolerance, logloss <= champion + tolerance, calibration within
            bounds, export parity passed
  deploy    install the bundle in the registry (one atomic rename) and `deployments.deploy`
            it to the arm (one Lua script), or as a canary to a share of the arm

Each run is recorded as JSON in REGISTRY/.retrain/<experiment>--<arm>--<last day>.json:
"running" when it starts, then deployed, rejected or failed. A key whose record is deployed
or rejected is not trained again. One retrain per arm runs at a time (a file lock the OS
releases when the process dies); a run that finds a "running" record whose lock is free says
the earlier run was interrupted and starts over. Nothing an interrupted run wrote is served:
the challenger only reaches the registry by a rename and the arm only by the Lua script.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import redis

from ctrserve.common.errors import UserError

RETRAIN_DIR = ".retrain"
STAGING = ".staging-"  # + pid: a bundle being copied into the registry
FINAL = ("deployed", "rejected")
Say = Callable[[str], None]


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
    attribution_window_s: float | None = 86_400.0  # None: every logged download counts
    own_traffic: bool = False  # only the arm's own impressions (default: every arm's)
    base_data: str | None = None  # a data SOURCE mixed in ahead of the logged days
    base_rows: int | None = None  # the most recent rows of it (default: all)
    warm_start: bool = False  # start from the champion's weights, keep its encoder
    canary: float | None = None  # deploy as a canary to this share of the arm's users
    progress: bool = False  # the training epochs' progress bars (stderr)
    shuffle_labels: bool = False  # test/diagnostic: a deliberately bad challenger
    who: str = "ctrserve retrain"
    seed: int | None = None  # default: the champion's


def run_key(experiment: str, arm: str, day: str) -> str:
    return f"{experiment}--{arm}--{day}"


def record_path(registry: Path, key: str) -> Path:
    return registry / RETRAIN_DIR / f"{key}.json"


def arms_of(client: redis.Redis, experiment: str) -> list[str]:
    """The arms with deployment state in Redis, in name order."""
    from ctrserve.service import state

    return state.arms_of(client, experiment)


def retrain(experiment: str, arm: str, registry: str | Path, events_dir: str | Path,
            client: redis.Redis, options: RetrainOptions | None = None,
            say: Say = print, sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """One retrain of `experiment`/`arm`; returns the run record (also written to disk).

    `sources`, a dict the caller keeps for one round of retrains over the same logs (every arm
    after a day), shares the data built from them between arms that read the same rows with
    the same spec; the caller drops it when the logs or the feature store change."""
    registry = Path(registry)
    with arm_lock(registry, experiment, arm):
        run = _Run(experiment, arm, registry, Path(events_dir), client,
                   options or RetrainOptions(), say, sources)
        return run.execute()


@contextmanager
def arm_lock(registry: Path, experiment: str, arm: str) -> Iterator[None]:
    """Hold the arm's retrain lock (flock: released by the OS if the process dies)."""
    path = registry / RETRAIN_DIR / f"{run_key(experiment, arm, 'lock')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainError(f"{experiment}/{arm}: another retrain is running (pid "
                               f"{_holder(handle)}); nothing done") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    return handle.read().strip() or "unknown"


class _Run:
    """The steps of one retrain, sharing the record they fill in."""

    def __init__(self, experiment: str, arm: str, registry: Path, events: Path,
                 client: redis.Redis, opts: RetrainOptions, say: Say,
                 sources: dict[str, Any] | None = None):
        self.experiment, self.arm, self.registry, self.events = experiment, arm, registry, events
        self.client, self.opts, self.say = client, opts, say
        self.sources = {} if sources is None else sources
        self.record: dict[str, Any] = {
            "experiment": experiment, "arm": arm, "events": str(events), "pid": os.getpid(),
            "started_at": _now(), "options": asdict(opts), "decision": None}
        self.steps = _Steps(self.record, say, registry)

    def execute(self) -> dict[str, Any]:
        with self.steps("champion"):
            self.champion = self._champion()
        with self.steps("data"):
            self.source = self._data()
            previous = _read(record_path(self.registry, self.key))
            if previous and previous.get("decision") in FINAL:
                self.say(f"already ran for {self.key}: {previous['decision']}; nothing to do")
                return {**previous, "skipped": True}
            if previous and previous.get("decision") == "running":
                self.say(f"an earlier run for {self.key} (pid {previous.get('pid')}) was "
                         f"interrupted in step {previous.get('step')!r}; starting over")
                self.record["interrupted_run"] = previous.get("started_at")
            for name in sweep_staging(self.registry):
                self.say(f"removed {name}, left by an interrupted install")
            self.record["decision"] = "running"
            self.steps.write()
        self.work = self.registry / RETRAIN_DIR / "work" / self.key
        shutil.rmtree(self.work, ignore_errors=True)
        with self.steps("train"):
            self._train()
        with self.steps("export"):
            self.staged = self._export()
        with self.steps("evaluate"):
            metrics = self._evaluate()
        with self.steps("gate"):
            reasons = self._gate(metrics)
        if reasons:
            self.record["decision"] = "rejected"
        else:
            with self.steps("deploy"):
                self._deploy(metrics)
        shutil.rmtree(self.work, ignore_errors=True)
        self.record["finished_at"] = _now()
        self.steps.write()
        return self.record

    @property
    def key(self) -> str:
        return self.steps.key

    def _champion(self) -> Any:
        from ctrserve.bundles import load_bundle
        from ctrserve.service.state import current

        name = current(self.client, self.experiment, self.arm)
        if name is None:
            raise RetrainError(f"{self.experiment}/{self.arm}: no deployment state in Redis (a "
                               "scorer records its experiments' arms when it starts)")
        champion = load_bundle(self.registry / name)
        self.record["champion"] = {"bundle": name, "version": champion.version,
                                   "model_type": champion.manifest.model_type}
        self.say(f"champion: {name}")
        return champion

    def _data(self) -> Any:
        key = json.dumps([self.champion.encoder.spec.to_dict(), str(self.events.resolve()),
                          self.experiment, self.arm if self.opts.own_traffic else None,
                          asdict(self.opts)], sort_keys=True, default=str)
        if key not in self.sources:
            self.sources[key] = _source(self.champion, self.experiment, self.arm, self.events,
                                        self.client, self.opts)
        source = self.sources[key]
        self.steps.key = run_key(self.experiment, self.arm, source.last_day.isoformat())
        self.record.update(key=self.key, data=source.describe())
        splits = self.record["data"]["splits"]
        self.say("data: " + ", ".join(
            f"{s} {v.get('first_day', '-')}..{v.get('last_day', '-')} ({v['rows']} rows, "
            f"{v['positives']} positive)" for s, v in splits.items()))
        if "base" in self.record["data"]:
            self.say(f"data: base {self.opts.base_data}: "
                     f"{self.record['data']['base']['rows']} rows ahead of the logged days")
        return source

    def _train(self) -> None:
        from ctrserve.models import ModelConfig
        from ctrserve.training.train import TrainConfig, WarmStart, train
        from ctrserve.training.warm_start import bundle_weights

        hyper = self.champion.manifest.hyperparameters
        model_config = ModelConfig.from_dict(hyper["model"])
        args = {**hyper.get("train", {}), "device": "cpu"}
        for name in ("epochs", "seed"):
            if getattr(self.opts, name) is not None:
                args[name] = getattr(self.opts, name)
        cfg = TrainConfig(**args)
        warm = None
        if self.opts.warm_start:
            warm = WarmStart(self.champion.encoder, bundle_weights(self.champion.path))
        self.say(f"train: {model_config.name}, {cfg.epochs} epoch(s)"
                 + (", warm start from the champion" if warm else ""))
        # a day's window of events always has users and days train never saw: the warnings
        # are the retrain's lines (and in its run's inspect), not stderr's
        info = train(self.source, model_config, cfg, self.work / "run",
                     progress=self.opts.progress, warm_start=warm, warn=False)
        for warning in info.get("inspect", {}).get("warnings", []):
            self.say(f"data: {warning}")
        self.record["train"] = {
            "model": info["model"], "train": info["train"], "best_epoch": info["best_epoch"],
            "epochs_run": info["epochs_run"], "metrics_torch": info["metrics"],
            "warm_start": info["warm_start"],
            "samples_per_second": round(info["train_samples_per_second"])}

    def _export(self) -> Path | None:
        from ctrserve.bundles import load_bundle
        from ctrserve.training.export import ExportError, export_run

        try:
            staged = export_run(self.work / "run", self.work / "staging")
        except ExportError as exc:
            self.record["export_error"] = str(exc)
            self.say(f"export: {exc}")
            return None
        self.challenger = load_bundle(staged)
        self.parity = self.challenger.manifest.parity.model_dump()
        self.record["challenger"] = {"bundle": staged.name, "version": self.challenger.version}
        self.say(f"export: {staged.name} (parity {self.parity['max_abs_diff']:.1e})")
        return staged

    def _evaluate(self) -> dict[str, dict[str, float]]:
        test = pa.concat_tables([c.table for c in self.source.chunks("test")],
                                promote_options="permissive")
        label = self.source.spec.label
        metrics = {"champion": bundle_metrics(self.champion, test, label)}
        if self.staged is not None:
            metrics["challenger"] = bundle_metrics(self.challenger, test, label)
        self.record["metrics"] = metrics
        for who, m in sorted(metrics.items()):  # challenger, then champion: as in the tables
            self.say(f"evaluate: {who:<10} AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  "
                     f"calibration {m['calibration']:.3f}  ({m['rows']} rows)")
        return metrics

    def _gate(self, metrics: dict[str, dict[str, float]]) -> list[str]:
        if self.staged is None:
            reasons = ["export parity failed: " + self.record.get("export_error", "")]
        else:
            reasons = self.opts.gate.check(metrics["challenger"], metrics["champion"],
                                           self.parity)
        self.record["gate"] = {"passed": not reasons, "reasons": reasons}
        self.say("gate: passed" if not reasons else "gate: rejected: " + "; ".join(reasons))
        return reasons

    def _deploy(self, metrics: dict[str, dict[str, float]]) -> None:
        from ctrserve.service.state import deploy

        name = install_bundle(self.staged, self.registry)
        c, p = metrics["challenger"], metrics["champion"]
        why = (f"retrain {self.key}: AUC {c['auc']:.4f} vs {p['auc']:.4f}, logloss "
               f"{c['logloss']:.4f} vs {p['logloss']:.4f}")
        kwargs = {"canary": self.opts.canary} if self.opts.canary else {}
        self.record["deployment"] = deploy(self.client, self.experiment, self.arm, name,
                                           self.opts.who, why, registry=self.registry,
                                           **kwargs)
        self.record["decision"] = "deployed"
        share = f" as a canary to {self.opts.canary:.0%} of it" if self.opts.canary else ""
        self.say(f"deploy: {self.experiment}/{self.arm} -> {name}{share}")


def install_bundle(staged: Path, registry: Path) -> str:
    """Copy a staged bundle into the registry with one atomic rename; returns its name."""
    target = registry / staged.name
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=registry))
        try:
            shutil.copytree(staged, tmp, dirs_exist_ok=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return staged.name


def sweep_staging(registry: Path) -> list[str]:
    """Remove the staging copies that retrains which died mid-install left in the registry."""
    removed = []
    for path in registry.glob(f"{STAGING}*"):
        pid = path.name[len(STAGING):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bundle_metrics(bundle: Any, table: pa.Table, label: str,
                   batch_rows: int = 50_000) -> dict[str, float]:
    """A bundle's metrics on raw rows: its own encoder and ONNX session, as the scorer runs."""
    from ctrserve.training.evaluate import metrics

    probs = []
    for start in range(0, table.num_rows, batch_rows):
        part = table.slice(start, batch_rows)
        columns = {f: part.column(f).to_pylist() for f in bundle.encoder.spec.names}
        feeds = bundle.encoder.transform(columns)
        probs.append(bundle.session.run(None, feeds)[0].reshape(-1))
    labels = table.column(label).to_numpy().astype(np.float32)
    return metrics(labels, np.concatenate(probs))


def _source(champion: Any, experiment: str, arm: str, events_dir: Path, client: redis.Redis,
            opts: RetrainOptions) -> Any:
    from ctrserve.training.data import open_source
    from ctrserve.training.data.events import EventLogSource
    from ctrserve.training.data.mixed import MixedSource

    def items(ids: list[str]) -> dict[str, dict[str, Any]]:
        from ctrserve.service.state import item_records

        return item_records(client, ids)

    events = EventLogSource(events_dir, opts.window_days, champion.encoder.spec,
                            item_records=items, experiment=experiment,
                            arms=[arm] if opts.own_traffic else None,
                            shuffle_labels=opts.shuffle_labels,
                            attribution_window_s=opts.attribution_window_s,
                            min_days=2 if opts.base_data else 3)
    if opts.base_data is None:
        return events
    return MixedSource(events, open_source(opts.base_data), opts.base_rows)


class _Steps:
    """Runs the steps: prints which failed and records the failure before re-raising."""

    def __init__(self, record: dict[str, Any], say: Say, registry: Path):
        self.record, self.say, self.registry = record, say, registry
        self.key = run_key(record["experiment"], record["arm"], "unknown")

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.record["step"] = name
        if self.record.get("decision") == "running":
            self.write()
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
        if self.record.get("decision") in FINAL:
            self.record.pop("step", None)
        path = record_path(self.registry, self.key)
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
