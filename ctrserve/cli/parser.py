"""The `ctrserve` command line. Heavy imports (torch) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ctrserve.cli import commands


def _numbers(kind: type, what: str) -> Callable[[str], tuple]:
    """An argparse type for comma-separated values of `kind`."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            msg = f"expected comma-separated {what}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    return parse


_ints = _numbers(int, "integers")
_floats = _numbers(float, "numbers")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic app-store world and its impression logs")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--days", type=int, default=10, help="days of impression logs")
    p.add_argument("--impressions-per-day", type=int, default=50_000)
    p.add_argument("--users", type=int, default=20_000, help="number of users in the world")
    p.add_argument("--apps", type=int, default=2_000, help="number of apps in the world")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=commands.synth)


DATA_HELP = ("synth:DIR, movielens:DIR, frappe:DIR, criteo:PATH, libfm:PATH or a dataset "
             "spec file (.yaml/.json); an empty DIR means $CTR_DATA_DIR's folder for that "
             "dataset")


def _model_and_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="SOURCE", help=DATA_HELP)
    m = p.add_argument_group("model")
    m.add_argument("--embedding-dim", type=int, default=16)
    m.add_argument("--mlp", type=_ints, default=(400, 400, 400), help="hidden sizes, e.g. 400,400")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--batch-norm", action="store_true")
    m.add_argument("--apg-rank", type=int, default=32, help="K of the K x K matrix S_i")
    m.add_argument("--apg-overparam", type=int, default=64, help="inner width P of U_l U_r (0=off)")
    m.add_argument("--apg-condition", choices=("self", "group", "mix"), default="self")
    m.add_argument("--apg-condition-fields", type=_names, default=(),
                   help="comma-separated fields for group/mix conditions")
    m.add_argument("--embedding-sets", type=int, default=1, metavar="M",
                   help="multi-embedding: M independent embedding sets, each with its own "
                        "interaction, averaged (deepfm, ipnn; 1 = the plain model)")
    t = p.add_argument_group("training")
    t.add_argument("--optimizer", choices=("adam", "adagrad"), default="adam")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    t.add_argument("--l2-embedding", type=float, default=0.0, help="L2 on looked-up embeddings")
    t.add_argument("--batch-size", type=int, default=1024, help="rows per step per process")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--patience", type=int, default=2, help="epochs without valid AUC gain")
    t.add_argument("--seed", type=int, default=2026)
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--lr-scaling", choices=("none", "sqrt", "linear"), default="none",
                   help="scale the learning rate with the number of torchrun processes")
    t.add_argument("--buffer-rows", type=int, default=1_000_000,
                   help="shuffle buffer; larger splits stream chunk by chunk")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run directory")
    p.add_argument("--model", required=True,
                   help="lr, fm, deepfm, apg-deepfm, ipnn, opnn, pnn-star, deepfm-ipnn, "
                        "deepfm-opnn, deepfm-pnn-star, fnn, ffm, ccpm, kpnn, pin, kfm or nifm")
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--init-embeddings", type=Path, metavar="RUN_DIR",
                   help="start from this run's encoder and embedding table (FNN's FM "
                        "pre-training: train --model fm first)")
    _model_and_training_flags(p)
    p.set_defaults(func=commands.train)


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="rows and click rate per split, per field cardinality "
                                       "and unseen-in-train rates, and warnings")
    p.add_argument("--data", required=True, metavar="SOURCE", help=DATA_HELP)
    p.add_argument("--json", action="store_true", help="the report as JSON instead of tables")
    p.set_defaults(func=commands.inspect)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="train several models over several seeds, one table")
    p.add_argument("--models", type=_names, default=("lr", "fm", "deepfm", "apg-deepfm"))
    p.add_argument("--seeds", type=_ints, default=(1, 2, 3))
    p.add_argument("--out", required=True, type=Path, help="directory for runs and results")
    _model_and_training_flags(p)
    p.set_defaults(func=commands.compare)


def _scaling_parser(sub) -> None:
    p = sub.add_parser("scaling", help="the embedding-collapse scaling experiment: k-times "
                                       "wider single embedding against k embedding sets")
    p.add_argument("--model", default="deepfm", help="a multi-embedding model: deepfm or ipnn")
    p.add_argument("--factors", type=_ints, default=(1, 2, 4),
                   help="embedding size factors k (1 = the plain model)")
    p.add_argument("--seeds", type=_ints, default=(1, 2, 3))
    p.add_argument("--out", required=True, type=Path, help="directory for runs and results")
    _model_and_training_flags(p)
    p.set_defaults(func=commands.scaling)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run to an ONNX bundle in a registry")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--registry", required=True, type=Path)
    p.set_defaults(func=commands.export)


def _abundance_parser(sub) -> None:
    p = sub.add_parser("abundance", help="information abundance of a run's embeddings, per "
                                         "field and embedding set")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=commands.abundance)


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify a bundle (hash, parity record, ONNX session)")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=commands.verify)


def _demo_parser(sub) -> None:
    from ctrserve.cli.demo import DemoConfig as D

    p = sub.add_parser("demo", help="the main job: synthetic world, train, export, report")
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--days", type=int, default=D.days)
    p.add_argument("--impressions-per-day", type=int, default=D.impressions_per_day)
    p.add_argument("--epochs", type=int, default=D.epochs)
    p.add_argument("--models", type=_names, default=D.models,
                   help="each becomes an A/B arm (lr, the control, must be one)")
    p.add_argument("--ab-days", type=int, default=D.ab_days,
                   help="simulated A/B days (0 skips the A/B test)")
    p.add_argument("--ab-requests-per-day", type=int, default=D.ab_requests_per_day)
    p.add_argument("--pre-days", type=int, default=D.pre_days,
                   help="days served by LR alone before the A/B days (CUPED's pre-period)")
    p.add_argument("--no-retrain", action="store_true",
                   help="no daily retrain between the simulated days")
    p.add_argument("--port", type=int, default=D.port,
                   help="the scorer's loopback port (a free one when it is taken)")
    p.add_argument("--once", action="store_true",
                   help="exit after the report (default: keep serving until Ctrl-C)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=commands.demo)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the scorer (HTTP API) on a bundle of a registry",
                       description="Flags override CTRSERVE_* environment variables; the "
                                   "README lists every setting.")
    p.add_argument("--registry", type=Path, help="registry directory of bundles")
    p.add_argument("--bundle", help="bundle to serve: a name in the registry or a path")
    p.add_argument("--experiments", type=Path, dest="experiments_file", metavar="FILE",
                   help="A/B experiments config (YAML or JSON): arms, weights, their bundles")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="scorer processes sharing the port (default: one "
                   "per usable core; see README)")
    p.add_argument("--features", type=Path, dest="load_features", metavar="SYNTH_DIR",
                   help="load users.parquet and apps.parquet of a synth dir at start")
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--admission", action=argparse.BooleanOptionalAction, default=None,
                   help="shed past the adaptive in-flight limit before reading a request")
    p.add_argument("--inference-thread", action=argparse.BooleanOptionalAction, default=None,
                   help="onnxruntime on a thread beside the event loop (default with one "
                        "worker) or on the loop (default with several)")
    p.add_argument("--batch-max-rows", type=int)
    p.add_argument("--batch-max-delay-ms", type=float)
    p.add_argument("--queue-capacity-rows", type=int)
    p.add_argument("--max-candidates", type=int)
    p.add_argument("--providers", help="comma-separated, e.g. cuda,cpu")
    p.add_argument("--ort-threads", type=int)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=commands.serve)


def _load_features_parser(sub) -> None:
    p = sub.add_parser("load-features", help="load user and item feature records into Redis")
    p.add_argument("--synth", type=Path, metavar="DIR",
                   help="a synth dir: its users.parquet and apps.parquet")
    p.add_argument("--users", type=Path, help="user records (parquet or csv)")
    p.add_argument("--items", type=Path, help="item records (parquet or csv)")
    p.add_argument("--user-id-field")
    p.add_argument("--item-id-field")
    p.add_argument("--registry", type=Path,
                   help="the embedded Redis lives in REGISTRY/.redis (ignored with REDIS_URL)")
    p.add_argument("--redis-db", type=Path, help="embedded Redis file instead")
    p.set_defaults(func=commands.load_features)


def _swap_parser(sub) -> None:
    p = sub.add_parser("swap", help="hot-swap the bundle a running scorer serves")
    p.add_argument("--bundle", required=True, help="a bundle name in the scorer's registry")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the scorer's base URL")
    p.add_argument("--arm", help="default: the scorer's only arm")
    p.add_argument("--api-key", help="default: $CTRSERVE_ADMIN_API_KEY")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds")
    p.set_defaults(func=commands.swap)


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="drive a running scorer with the synthetic world's users: "
                                        "score, show, download, report events")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the scorer (loopback only)")
    p.add_argument("--world", required=True, type=Path, metavar="DIR", help="a synth dir")
    p.add_argument("--days", type=int, default=1, help="simulated days")
    p.add_argument("--requests-per-day", type=int, default=1000)
    p.add_argument("--start-day", type=_date, help="default: the day after the world's logs")
    p.add_argument("--candidates", type=_ints, default=(50, 100), metavar="MIN,MAX")
    p.add_argument("--top-k", type=int, default=10, help="slots shown per request")
    p.add_argument("--concurrency", type=int, default=8, help="score requests in flight")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--duplicate-rate", type=float, default=0.02,
                   help="share of events delivered twice")
    p.add_argument("--event-batch", type=int, default=100, help="events per POST /v1/events")
    p.add_argument("--no-events", action="store_true", help="do not report events")
    p.add_argument("--experiment", help="default: the scorer's default experiment")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="wall-clock bound")
    p.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=commands.simulate)


def _date(text: str):
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _redis_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path,
                   help="the embedded Redis lives in REGISTRY/.redis (ignored with REDIS_URL)")
    p.add_argument("--redis-db", type=Path, help="embedded Redis file instead")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="A/B report of an experiment from the counts in Redis")
    p.add_argument("--experiment", required=True)
    _redis_flags(p)
    p.add_argument("--experiments", type=Path, dest="experiments_file", metavar="FILE",
                   help="arms and weights from this config instead of the scorer's last one")
    p.add_argument("--json", action="store_true", help="the JSON of GET .../report instead")
    p.set_defaults(func=commands.report)


def _drain_parser(sub) -> None:
    p = sub.add_parser("drain-events", help="move the event and serve logs (Redis streams) "
                                            "into day-partitioned Parquet files")
    p.add_argument("--out", type=Path, required=True,
                   help="OUT/day=YYYY-MM-DD/{events,serve}-*.parquet, OUT/dead-letter/")
    _redis_flags(p)
    p.add_argument("--chunk", type=int, default=10_000, help="entries per read and file")
    p.add_argument("--limit", type=int, help="move at most this many entries per stream")
    p.add_argument("--follow", action="store_true",
                   help="keep draining until SIGTERM/SIGINT (the long-running drainer)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="with --follow: pause after a pass that found nothing")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="with --follow: serve ctrserve_drain_* metrics on this port")
    p.set_defaults(func=commands.drain_events)


def _log_analysis_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logs", type=Path, required=True, metavar="DIR",
                   help="the drain-events directory (DIR/day=YYYY-MM-DD/*.parquet)")
    p.add_argument("--top", type=int, default=10, metavar="L",
                   help="list metrics over the first L items of each user's last list")
    p.add_argument("--catalogue-size", type=int, metavar="N",
                   help="items in the catalogue, for coverage@L (default: the distinct items "
                        "served in the logs' period)")
    p.add_argument("--json", action="store_true", help="JSON instead of tables")


def _analysis_parsers(sub) -> None:
    p = sub.add_parser("analyze", help="the A/B report and list metrics from the Parquet logs, "
                                       "with DuckDB (the counts equal `ctrserve report`'s)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--experiments", type=Path, dest="experiments_file", metavar="FILE",
                   help="arms and weights from this config (default: the scorer's last one, "
                        "read from Redis)")
    p.add_argument("--pre-days", type=int, default=7, metavar="N",
                   help="CUPED: adjust the total's uplifts for each user's activity in the N "
                        "days before the start (default 7; 0: no CUPED)")
    p.add_argument("--start", metavar="YYYY-MM-DD",
                   help="the experiment's first day, for CUPED's pre-period (default: its "
                        "first served day in the logs)")
    _redis_flags(p)
    _log_analysis_flags(p)
    p.set_defaults(func=commands.analyze)
    p = sub.add_parser("list-metrics", help="personalization@L, coverage@L and popularity@L "
                                            "per arm and day, from the Parquet logs (DuckDB)")
    p.add_argument("--experiment", help="default: the only experiment in the logs")
    _log_analysis_flags(p)
    p.set_defaults(func=commands.list_metrics)


def _deploy_parsers(sub) -> None:
    p = sub.add_parser("deploy", help="make an arm serve a bundle of the registry (every "
                                      "scorer follows within seconds)")
    _arm_flags(p)
    p.add_argument("--bundle", required=True, help="a bundle name in the registry")
    p.add_argument("--canary", type=float, metavar="SHARE",
                   help="serve the bundle to this share (0 < SHARE < 1) of the arm's users "
                        "only, beside the arm's bundle, until promote or rollback")
    p.add_argument("--why", default="", help="recorded in the history")
    _redis_flags(p)
    p.set_defaults(func=commands.deploy)
    p = sub.add_parser("promote", help="make an arm's canary bundle serve all its users")
    _arm_flags(p)
    p.add_argument("--why", default="", help="recorded in the history")
    _redis_flags(p)
    p.set_defaults(func=commands.promote)
    p = sub.add_parser("rollback", help="remove an arm's canary, or else return the arm to the "
                                        "bundle it served before its last deploy")
    _arm_flags(p)
    p.add_argument("--why", default="", help="recorded in the history")
    _redis_flags(p)
    p.set_defaults(func=commands.rollback)
    p = sub.add_parser("deployments", help="the history of deploys, canaries, promotes and "
                                           "rollbacks, then the active canaries")
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("--json", action="store_true", help="the records as JSON")
    _redis_flags(p)
    p.set_defaults(func=commands.deployments)


def _arm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--arm", required=True)


def _retrain_parser(sub) -> None:
    p = sub.add_parser("retrain", help="train a challenger on the event log, gate it against "
                                       "the arm's champion, deploy it when it passes")
    p.add_argument("--experiment", required=True)
    p.add_argument("--arm", required=True, help="an arm, or 'all': each arm of the experiment "
                                                "in turn")
    p.add_argument("--events", type=Path, required=True, help="the drain-events directory")
    p.add_argument("--drain", action="store_true",
                   help="first move the accepted events from Redis into --events (what "
                        "`ctrserve drain-events` does): the daily job in one command")
    _redis_flags(p)
    p.add_argument("--window-days", type=int, default=7,
                   help="last N days of the log: the last is held out (test), the one before "
                        "it is validation, the rest train")
    p.add_argument("--attribution-window", type=float, default=86_400, metavar="SECONDS",
                   help="a download labels an impression when it came within this many "
                        "seconds of it (0: every logged download counts)")
    p.add_argument("--own-traffic", action="store_true",
                   help="train on the arm's own impressions only (default: every arm's)")
    p.add_argument("--base-data", metavar="SOURCE",
                   help="a data source (e.g. synth:DIR) whose rows train ahead of the logged "
                        "days; then two logged days suffice (valid, test)")
    p.add_argument("--base-rows", type=int, help="only the most recent N rows of --base-data")
    p.add_argument("--warm-start", action="store_true",
                   help="start from the champion's weights and keep its encoder (new ids map "
                        "to OOV until a cold retrain)")
    p.add_argument("--canary", type=float, metavar="SHARE",
                   help="deploy a passing challenger as a canary to this share of the arm's "
                        "users (promote it with `ctrserve promote`)")
    p.add_argument("--auc-tolerance", type=float, default=0.005)
    p.add_argument("--logloss-tolerance", type=float, default=0.005)
    p.add_argument("--calibration-bounds", type=_floats, default=(0.8, 1.25), metavar="LOW,HIGH",
                   help="mean predicted over observed download rate must lie within")
    p.add_argument("--epochs", type=int, help="default: the champion's")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars for the training epochs (step lines still print)")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="test/diagnostic only: shuffle the training labels to produce a "
                        "deliberately bad challenger (the gate must reject it)")
    p.set_defaults(func=commands.retrain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_synth_parser, _train_parser, _inspect_parser, _compare_parser, _scaling_parser,
                _export_parser,
                _abundance_parser, _verify_parser,
                _demo_parser, _serve_parser, _load_features_parser, _swap_parser,
                _simulate_parser, _report_parser, _drain_parser, _analysis_parsers,
                _deploy_parsers,
                _retrain_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], dict | list | str | None] = args.func
    try:
        result = func(args)
    except commands.USER_ERRORS as exc:
        print(f"ctrserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=1, default=str))
    return 0
