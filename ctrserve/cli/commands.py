"""What each CLI command does, in terms of the library; returns a JSON-able summary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ctrserve.common.errors import UserError
from ctrserve.features.spec import SpecError

USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)


def synth(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.loadtest.synth_logs import write_synthetic_logs

    summary = write_synthetic_logs(args.out, seed=args.seed, days=args.days,
                                   impressions_per_day=args.impressions_per_day,
                                   progress=not args.no_progress, n_users=args.users,
                                   n_apps=args.apps)
    return {k: v for k, v in summary.items() if k != "files"}


def _configs(args: argparse.Namespace, model: str):
    """ModelConfig and TrainConfig from the shared model and training flags."""
    import torch

    from ctrserve.models import MODELS, ModelConfig
    from ctrserve.models.base import check_embedding_sets
    from ctrserve.training.train import TrainConfig

    if model not in MODELS:
        raise SpecError(f"--model: unknown model {model!r}; expected one of {sorted(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model_cfg = ModelConfig(
            name=model, embedding_dim=args.embedding_dim, mlp=args.mlp,
            dropout=args.dropout, batch_norm=args.batch_norm, apg_rank=args.apg_rank,
            apg_overparam=args.apg_overparam, apg_condition=args.apg_condition,
            apg_condition_fields=args.apg_condition_fields,
            embedding_sets=args.embedding_sets)
        check_embedding_sets(MODELS[model], model_cfg)
        train_cfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
            optimizer=args.optimizer, l2_embedding=args.l2_embedding, patience=args.patience,
            seed=args.seed, buffer_rows=args.buffer_rows, lr_scaling=args.lr_scaling,
            device=args.device)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return model_cfg, train_cfg


def train(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.training.data import open_source
    from ctrserve.training.train import train
    from ctrserve.training.warm_start import WeightMismatch

    model_cfg, train_cfg = _configs(args, args.model)
    source = open_source(args.data)
    warm = _embedding_start(args.init_embeddings) if args.init_embeddings else None
    try:
        info = train(source, model_cfg, train_cfg, args.out, progress=not args.no_progress,
                     warm_start=warm)
    except WeightMismatch as exc:
        raise SpecError(f"--init-embeddings: {exc}") from None
    return {"run": str(args.out), "test": info["metrics"]["test"],
            "best_epoch": info["best_epoch"],
            "train_samples_per_second": round(info["train_samples_per_second"])}


def inspect(args: argparse.Namespace) -> dict[str, Any] | str:
    """`ctrserve inspect`: the data report (training/data/inspect.py), as tables or JSON."""
    from ctrserve.training.data import open_source
    from ctrserve.training.data.inspect import format_report, inspect_source

    report = inspect_source(open_source(args.data))
    return report if args.json else format_report(report)


def _embedding_start(run_dir: Any) -> Any:
    """`--init-embeddings RUN`: start from that run's encoder and embedding table."""
    from ctrserve.training.train import WarmStart
    from ctrserve.training.warm_start import WeightMismatch, run_embeddings

    try:
        encoder, weights = run_embeddings(run_dir)
    except (WeightMismatch, UserError) as exc:
        raise SpecError(f"--init-embeddings: {exc}") from None
    return WarmStart(encoder, weights, require_all=True, source=str(run_dir))


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.training.compare import compare, markdown_table
    from ctrserve.training.data import open_source

    configs = [_configs(args, name) for name in args.models]
    source = open_source(args.data)
    result = compare(source, [m for m, _ in configs], configs[0][1], list(args.seeds), args.out,
                     progress=not args.no_progress)
    print(markdown_table(result["summary"]))
    return {"results": str(args.out / "results.json"), "table": str(args.out / "results.md")}


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from ctrserve.models import MODELS
    from ctrserve.models.base import check_embedding_sets
    from ctrserve.training.data import open_source
    from ctrserve.training.scaling import markdown_table, run_scaling

    if args.embedding_sets != 1:
        raise SpecError("--embedding-sets: scaling sets the number of sets itself (--factors)")
    if not args.factors or min(args.factors) < 1:
        raise SpecError(f"--factors: expected integers >= 1, got {list(args.factors)}")
    base, train_cfg = _configs(args, args.model)
    try:
        check_embedding_sets(MODELS[args.model], replace(base, embedding_sets=max(args.factors)))
    except ValueError as exc:
        raise SpecError(f"--model: {exc}") from None
    source = open_source(args.data)
    result = run_scaling(source, base, train_cfg, list(args.factors), list(args.seeds),
                         args.out, progress=not args.no_progress)
    print(markdown_table(result["summary"]))
    return {"results": str(args.out / "results.json"), "table": str(args.out / "results.md")}


def export(args: argparse.Namespace) -> str:
    """Prints the bundle's path alone, so scripts can capture it."""
    from ctrserve.training.export import export_run

    return str(export_run(args.run_dir, args.registry))


def abundance(args: argparse.Namespace) -> str:
    """Prints the per-field table of information abundance (IA per embedding set), the mean."""
    from ctrserve.training.abundance import format_table, read_abundance

    return format_table(read_abundance(args.run_dir))


def verify(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.bundles import load_bundle

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    return {"bundle": str(bundle.path), "version": m.version, "model_type": m.model_type,
            "parity_max_abs_diff": m.parity.max_abs_diff, "sha256": m.sha256, "ok": True}


def demo(args: argparse.Namespace) -> None:
    """The demo prints its own tables and next steps; its results are in OUT/demo.json."""
    from ctrserve.cli.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, seed=args.seed, days=args.days,
                     impressions_per_day=args.impressions_per_day, models=args.models,
                     epochs=args.epochs, ab_days=args.ab_days,
                     ab_requests_per_day=args.ab_requests_per_day, pre_days=args.pre_days,
                     retrain=not args.no_retrain, port=args.port, once=args.once,
                     progress=not args.no_progress)
    run_demo(cfg)


# ---- the scorer ----------------------------------------------------------------------------
SERVE_FLAGS = ("registry", "bundle", "experiments_file", "host", "port", "workers",
               "load_features",
               "batching", "admission", "inference_thread", "batch_max_rows",
               "batch_max_delay_ms",
               "queue_capacity_rows", "max_candidates", "providers", "ort_threads")


def _settings(**overrides: Any):
    """Scorer settings from CTRSERVE_* variables, overridden by the flags that were given."""
    from pydantic import ValidationError

    from ctrserve.service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"setting {where!r}: {err['msg']}") from None


def serve(args: argparse.Namespace) -> None:
    import logging

    from ctrserve.bundles.load import verify_files
    from ctrserve.service.models import resolve_bundle
    from ctrserve.service.server import serve
    from ctrserve.service.settings import default_workers

    settings = _settings(**{k: getattr(args, k) for k in SERVE_FLAGS})
    if settings.experiments_file:
        _check_experiments(settings)
    elif not settings.bundle:
        raise UserError("--bundle or --experiments (or CTRSERVE_BUNDLE, "
                        "CTRSERVE_EXPERIMENTS_FILE) is required")
    else:
        verify_files(resolve_bundle(settings.registry, settings.bundle, inside_registry=False))
    if settings.load_features:
        from ctrserve.service.feature_store import synth_files

        synth_files(settings.load_features)
    _check_port(settings.host, settings.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    workers = settings.workers or default_workers()
    settings = settings.model_copy(update={"workers": workers})
    if workers > 1:
        from ctrserve.service.workers import serve_workers

        serve_workers(settings, workers, args.log_level)
    else:
        serve(settings)


def _check_port(host: str, port: int) -> None:
    """A port already listened on is a one-line error with the way out, before any loading."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            raise UserError(f"port {port} on {host} is in use (another scorer, or the demo?); "
                            "give another with --port N (or CTRSERVE_PORT)") from None


def _check_experiments(settings: Any) -> None:
    from ctrserve.bundles.load import verify_files
    from ctrserve.service.experiments.config import ExperimentConfigError, load_experiments

    try:
        experiments = load_experiments(settings.experiments_file, settings.registry)
    except ExperimentConfigError as exc:
        raise UserError(f"{settings.experiments_file}: {exc}") from None
    for name in experiments.bundles():
        verify_files(settings.registry / name)


def load_features(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.service.feature_store import load_tables, synth_files
    from ctrserve.service.redis_server import open_sync, stop_embedded

    if not (args.synth or args.users or args.items):
        raise UserError("give --synth DIR, or --users and/or --items files")
    users, items = synth_files(args.synth) if args.synth else (args.users, args.items)
    settings = _settings(registry=args.registry, redis_db=args.redis_db)
    client, embedded = open_sync(settings)
    try:
        meta = load_tables(client, users, items, args.user_id_field, args.item_id_field)
    finally:
        if embedded is not None:
            stop_embedded(embedded)
        else:
            client.close()
    where = settings.redis_url or str(settings.embedded_redis_db())
    return {"redis": where, **{k: v for k, v in meta.items() if k in ("users", "items")}}


def swap(args: argparse.Namespace) -> dict[str, Any]:
    import os
    import urllib.error
    import urllib.request

    key = args.api_key or os.environ.get("CTRSERVE_ADMIN_API_KEY", "")
    body = json.dumps({"bundle": args.bundle, "arm": args.arm}).encode()
    request = urllib.request.Request(f"{args.url.rstrip('/')}/admin/swap", data=body,
                                     headers={"Content-Type": "application/json",
                                              "X-API-Key": key}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read())["detail"][0]["msg"]
        except (ValueError, KeyError, IndexError, TypeError):
            reason = exc.reason
        raise UserError(f"HTTP {exc.code}: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"{args.url}: cannot reach the scorer ({exc})") from None


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """Prints the table per day and arm to stderr; the JSON summary is the result."""
    import sys

    from ctrserve.loadtest.simulator import SimConfig, format_summary, simulate, write_summary

    if not (args.world / "world.json").is_file():
        raise UserError(f"--world: {args.world} holds no world.json (write it with ctrserve synth)")
    if len(args.candidates) != 2:
        raise UserError(f"--candidates: expected MIN,MAX, got {args.candidates}")
    try:
        cfg = SimConfig(url=args.url, days=args.days, requests_per_day=args.requests_per_day,
                        start_day=args.start_day, candidates=args.candidates, top_k=args.top_k,
                        concurrency=args.concurrency, seed=args.seed,
                        duplicate_rate=args.duplicate_rate, events=not args.no_events,
                        event_batch=args.event_batch, experiment=args.experiment,
                        max_seconds=args.max_seconds, progress=not args.no_progress)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    summary = simulate(args.world, cfg)
    print(format_summary(summary), file=sys.stderr)
    if args.out:
        write_summary(summary, args.out)
    return summary


def _with_redis(args: argparse.Namespace, work: Any) -> Any:
    """Run `work(client)` on REDIS_URL or the registry's embedded Redis, then let go of it."""
    from ctrserve.service.redis_server import open_sync, stop_embedded

    settings = _settings(registry=args.registry, redis_db=args.redis_db)
    client, embedded = open_sync(settings)
    try:
        return work(client)
    finally:
        if embedded is not None:
            stop_embedded(embedded)
        else:
            client.close()


def redis_where(args: argparse.Namespace) -> str:
    """The Redis a command reads, in words: REDIS_URL, or the registry's embedded one."""
    settings = _settings(registry=getattr(args, "registry", None),
                         redis_db=getattr(args, "redis_db", None))
    if settings.redis_url:
        return f"the Redis at {settings.redis_url}"
    return (f"the embedded Redis of the registry {settings.registry} "
            f"({settings.embedded_redis_db()})")


def known_experiments_text(client: Any) -> str:
    from ctrserve.common.keys import config_key

    prefix = config_key("")
    names = sorted(k.decode()[len(prefix):] for k in client.scan_iter(match=prefix + "*"))
    names = [n for n in names if ":" not in n]  # ctrserve:exp:E:lists and the like
    return f"experiments there: {names}" if names else "it holds no experiment (serve one once)"


def unknown_experiment(args: argparse.Namespace, client: Any) -> str:
    return (f"no experiment {args.experiment!r} in {redis_where(args)}; "
            f"{known_experiments_text(client)} (or give --experiments FILE, or --registry / "
            "REDIS_URL for another store)")


def report(args: argparse.Namespace) -> dict[str, Any] | str:
    from ctrserve.service.counts import (
        build_report,
        experiment_configs,
        format_full_report,
        load_config,
    )
    from ctrserve.service.experiments.config import ExperimentConfigError, load_experiments

    def work(client: Any) -> dict[str, Any]:
        if args.experiments_file:
            try:
                configs = experiment_configs(load_experiments(args.experiments_file, None))
            except ExperimentConfigError as exc:
                raise UserError(f"{args.experiments_file}: {exc}") from None
            config = configs.get(args.experiment)
        else:
            config = load_config(client, args.experiment)
        if config is None:
            raise UserError(unknown_experiment(args, client))
        return build_report(client, args.experiment, config["control"], config["weights"])

    rep = _with_redis(args, work)
    return rep if args.json else format_full_report(rep)


def drain_events(args: argparse.Namespace) -> dict[str, Any]:
    """The drain's summary; the list metrics of the experiments drained are recomputed too
    (event_log.drain), and expire with the counts (counts_retention_days)."""
    from ctrserve.service.event_log import drain

    if args.chunk < 1:
        raise UserError("--chunk must be at least 1")
    retention = _settings(registry=args.registry, redis_db=args.redis_db).counts_retention_days

    def work(client: Any) -> dict[str, Any]:
        try:
            if args.follow:
                return _follow(client, args, retention)
            return drain(client, args.out, args.chunk, args.limit, retention_days=retention)
        except OSError as exc:
            # a read-only or full disk: one line instead of a traceback; nothing is lost, as a
            # stream is trimmed only up to what a synced file holds
            raise UserError(f"cannot write the logs under {args.out}: "
                            f"{exc.strerror or exc} ({exc.filename or 'no file'}); entries "
                            "not yet written stay in Redis for the next run") from None

    return _with_redis(args, work)


def _follow(client: Any, args: argparse.Namespace, retention_days: int) -> dict[str, Any]:
    """The long-running drainer: a line per pass that moved something or recomputed the list
    metrics, totals at the end."""
    import signal

    from ctrserve.service.drainer_metrics import DrainerMetrics
    from ctrserve.service.event_log import follow

    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    metrics = DrainerMetrics(args.metrics_port)
    totals = {"events": 0, "served": 0, "dead_letters": 0, "passes": 0,
              "list_metrics_recomputed": 0}

    def report(result: dict[str, Any]) -> None:
        metrics.observe(result)
        totals["passes"] += 1
        for key in ("events", "served", "dead_letters"):
            totals[key] += result[key]
        if result["events"] or result["served"] or result["dead_letters"]:
            print(f"drained {result['events']} event(s), {result['served']} served "
                  f"request(s), {result['dead_letters']} dead letter(s); left "
                  f"{result['left']}", file=sys.stderr, flush=True)
        lists(result.get("list_metrics"))

    def lists(done: dict[str, Any] | None) -> None:
        if done and done["experiments"]:
            totals["list_metrics_recomputed"] += 1
            print(f"list metrics of {', '.join(done['experiments'])} recomputed in "
                  f"{done['seconds']:.2f} s", file=sys.stderr, flush=True)

    lists(follow(client, args.out, args.interval, args.chunk, lambda: bool(stopping), report,
                 retention_days=retention_days))
    return totals


# ---- analysis of the Parquet logs (DuckDB) -------------------------------------------------
def _open_logs(args: argparse.Namespace, experiment: str | None) -> tuple[Any, str]:
    """DuckDB over the drained logs of --logs, and the experiment (the only one by default)."""
    try:
        from ctrserve.service.experiments.warehouse import experiments, open_logs
    except ModuleNotFoundError as exc:
        if exc.name != "duckdb":
            raise
        raise UserError("DuckDB is not installed: pip install 'ctrserve[analysis]'") from None
    if not args.logs.is_dir():
        raise UserError(f"--logs: {args.logs} is not a directory (ctrserve drain-events writes "
                        "one)")
    if args.top < 1 or (args.catalogue_size is not None and args.catalogue_size < 1):
        raise UserError("--top and --catalogue-size must be at least 1")
    con = open_logs(args.logs)
    known = experiments(con)
    if experiment is None and len(known) == 1:
        experiment = known[0]
    if experiment not in known:
        which = f"experiment {experiment!r}" if experiment else "a single experiment"
        raise UserError(f"--logs: {args.logs} holds no rows of {which}; it holds "
                        f"{', '.join(known) or 'none'}")
    return con, experiment


def _list_metrics(con: Any, args: argparse.Namespace, experiment: str,
                  arms: list[str] | None = None) -> dict[str, Any]:
    from ctrserve.service.experiments.list_metrics import list_metrics

    try:
        return list_metrics(con, experiment, args.top, args.catalogue_size, arms or ())
    except ValueError as exc:
        raise UserError(f"--catalogue-size: {exc}") from None


def _analysis_config(args: argparse.Namespace) -> dict[str, Any]:
    """{"control", "weights"} of --experiment: from --experiments FILE, else from Redis."""
    from ctrserve.service.counts import experiment_configs, load_config
    from ctrserve.service.experiments.config import ExperimentConfigError, load_experiments

    if args.experiments_file:
        try:
            config = experiment_configs(load_experiments(args.experiments_file, None)).get(
                args.experiment)
        except ExperimentConfigError as exc:
            raise UserError(f"{args.experiments_file}: {exc}") from None
    else:
        config = _with_redis(args, lambda client: load_config(client, args.experiment)
                             or unknown_experiment(args, client))
    if isinstance(config, str):
        raise UserError(config)
    if config is None:
        raise UserError(f"no experiment {args.experiment!r} in {args.experiments_file}")
    return config


def analyze(args: argparse.Namespace) -> dict[str, Any] | str:
    """The A/B report of `ctrserve report` from the Parquet logs, with the list metrics."""
    from ctrserve.service.counts import format_full_report
    from ctrserve.service.experiments.list_metrics import format_list_metrics
    from ctrserve.service.experiments.warehouse import (
        PrePeriodError,
        build_report,
        dead_letters,
        format_cuped_window,
    )

    con, experiment = _open_logs(args, args.experiment)
    config = _analysis_config(args)
    try:
        rep = build_report(con, experiment, config["control"], config["weights"],
                           pre_days=args.pre_days, start=args.start)
    except PrePeriodError as exc:
        raise UserError(f"--pre-days/--start: {exc}") from None
    rep["list_metrics"] = _list_metrics(con, args, experiment, list(rep["total"]["arms"]))
    dead = dead_letters(args.logs, experiment, list(config["weights"]))
    rep["source"] = {"logs": str(args.logs), "engine": "duckdb", "dead_letters": dead}
    if args.json:
        return rep
    # the list metrics come last, after the CUPED lines (format_full_report prints them when
    # the report has them: the online report's)
    lists = rep.pop("list_metrics")
    parts = [f"From the Parquet logs in {args.logs} (DuckDB; the counts equal the online "
             "counters' on the same traffic)", format_full_report(rep),
             *([format_cuped_window(rep["cuped"])] if "cuped" in rep else []),
             format_list_metrics(lists)]
    if dead["events"]:
        parts.append(f"!!! {dead['events']} accepted event(s) of {experiment} are dead letters "
                     f"in {args.logs / 'dead-letter'}: counted online, missing here !!!")
    return "\n\n".join(parts)


def list_metrics(args: argparse.Namespace) -> dict[str, Any] | str:
    from ctrserve.service.experiments.list_metrics import format_list_metrics

    con, experiment = _open_logs(args, args.experiment)
    metrics = _list_metrics(con, args, experiment)
    return metrics if args.json else format_list_metrics(metrics)


# ---- deployments ---------------------------------------------------------------------------
def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _registry(args: argparse.Namespace) -> Any:
    return _settings(registry=args.registry, redis_db=args.redis_db).registry


def deploy(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.service.deployments import check_bundle, check_share
    from ctrserve.service.deployments import deploy as deploy_bundle

    registry = _registry(args)
    if args.canary is not None:
        check_share(args.canary, "--canary")
    check_bundle(registry, args.bundle)  # before starting Redis: a refusal changes nothing
    return _with_redis(args, lambda client: deploy_bundle(
        client, args.experiment, args.arm, args.bundle, _who(), args.why, registry=registry,
        canary=args.canary))


def promote(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.service.deployments import promote as promote_canary

    registry = _registry(args)
    return _with_redis(args, lambda client: promote_canary(
        client, args.experiment, args.arm, _who(), args.why, registry=registry))


def rollback(args: argparse.Namespace) -> dict[str, Any]:
    from ctrserve.service.deployments import rollback as roll_back

    registry = _registry(args)
    return _with_redis(args, lambda client: roll_back(
        client, args.experiment, args.arm, _who(), args.why, registry=registry))


def deployments(args: argparse.Namespace) -> list[dict[str, Any]] | str:
    """The history; as text, followed by a line per active canary."""
    from ctrserve.service.deployments import canaries, format_canaries, format_history, history

    def work(client: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        records = history(client, args.experiment)
        return records, canaries(client, [r["experiment"] for r in records])

    records, active = _with_redis(args, work)
    if args.json:
        return records
    return "\n".join(filter(None, [format_history(records), format_canaries(active)]))


# ---- retrain -------------------------------------------------------------------------------
def retrain(args: argparse.Namespace) -> dict[str, Any]:
    """Progress on stderr, the run record (JSON) on stdout; a rejection is not an error.
    `--arm all` retrains every arm in turn and fails at the end if any failed."""
    from ctrserve.training.retrain import RetrainError, arms_of
    from ctrserve.training.retrain import retrain as run_retrain

    registry, opts = _registry(args), _retrain_options(args)

    def one(client: Any, arm: str) -> dict[str, Any]:
        def say(line: str) -> None:
            print(f"retrain {args.experiment}/{arm}: {line}", file=sys.stderr, flush=True)

        return run_retrain(args.experiment, arm, registry, args.events, client, opts, say)

    def every(client: Any) -> dict[str, Any]:
        arms = arms_of(client, args.experiment)
        if not arms:
            raise UserError(f"--experiment {args.experiment}: no arms in the deployment state "
                            f"of {redis_where(args)}; {known_experiments_text(client)}")
        runs, failed = [], []
        for arm in arms:
            try:
                runs.append(one(client, arm))
            except RetrainError as exc:
                runs.append({"arm": arm, "decision": "failed", "error": str(exc)})
                failed.append(arm)
        if failed:
            print(json.dumps({"experiment": args.experiment, "runs": runs}, default=str))
            raise UserError(f"retrain failed for arm(s) {failed}; the others ran (see above)")
        return {"experiment": args.experiment, "runs": runs}

    def run(client: Any) -> dict[str, Any]:
        if args.drain:
            from ctrserve.service.event_log import drain

            moved = drain(client, args.events)
            print(f"retrain {args.experiment}: drained {moved['events']} event(s) into "
                  f"{args.events}", file=sys.stderr, flush=True)
        return every(client) if args.arm == "all" else one(client, args.arm)

    return _with_redis(args, run)


def _retrain_options(args: argparse.Namespace) -> Any:
    from ctrserve.training.retrain import Gate, RetrainOptions

    low_high = args.calibration_bounds
    if len(low_high) != 2 or low_high[0] > low_high[1]:
        raise UserError(f"--calibration-bounds: expected LOW,HIGH, got {low_high}")
    if args.canary is not None:
        from ctrserve.service.deployments import check_share

        check_share(args.canary, "--canary")
    if args.base_rows is not None and args.base_data is None:
        raise UserError("--base-rows needs --base-data")
    if args.attribution_window < 0:
        raise UserError(f"--attribution-window: seconds >= 0, got {args.attribution_window}")
    return RetrainOptions(
        window_days=args.window_days, epochs=args.epochs, shuffle_labels=args.shuffle_labels,
        gate=Gate(args.auc_tolerance, args.logloss_tolerance, tuple(low_high)),
        attribution_window_s=args.attribution_window or None, own_traffic=args.own_traffic,
        base_data=args.base_data, base_rows=args.base_rows, warm_start=args.warm_start,
        canary=args.canary, progress=not args.no_progress, who=f"retrain:{_who()}")
