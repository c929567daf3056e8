"""One scorer process against several on one port: `ctrserve serve --workers N`.

    python -m ctrserve.loadtest.bench_workers --registry demo/registry
        [--workers 1,default,2:thread] [--candidates 10,100,500] [--concurrency 16,64]
        [--duration 10] [--out FILE]

Scorers with each worker count (`default`: no --workers flag, the scorer's own choice of one
per usable core) as subprocesses (bench_serving.Server: embedded Redis loaded
from the synth dir), driven closed loop by wrk (or the Python client) cell by cell, the
worker counts alternating (ABBA). Reports answered requests/s, candidates/s and their ratio
to the machine's in-process onnxruntime limit (the best rows/s of the bundle at any batch
size with one thread and with all cores' threads), p50/p99, and server and client CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ctrserve.loadtest.bench_serving import (
    BODIES_PER_SIZE,
    Server,
    make_bodies,
    measure,
    newest_bundle,
    ort_limit,
    records,
    write_result,
)
from ctrserve.service.settings import default_workers


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = args.bundle or newest_bundle(args.registry, "deepfm")
    features = args.features or args.registry.parent / "data"
    client = "wrk" if shutil.which("wrk") else "python"
    users, apps = records(features)
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    limits = {t: ort_limit(args.registry / bundle, users, apps, 2.0, threads=t)
              for t in sorted({1, os.cpu_count() or 1})}
    best = max(v["best_rows_per_s"] for v in limits.values())
    servers = {v: Server(f"w{v.replace(':', '-')}", args.registry, bundle, features, workdir,
                         variant_flags(v)) for v in args.workers}
    cells = []
    try:
        for server in servers.values():
            server.wait_ready()
        for n in args.candidates:
            bodies_file = workdir / f"bodies-{n}.jsonl"
            bodies_file.write_text("\n".join(make_bodies(users, apps, n, BODIES_PER_SIZE)))
            for i, c in enumerate(args.concurrency):
                order = list(servers.items()) if i % 2 == 0 else list(servers.items())[::-1]
                for variant, server in order:
                    cell = measure(client, server, bodies_file, n, n, c, args.duration,
                                   200_000, workdir)
                    cell.update(workers=worker_count(variant), variant=variant,
                                ratio_to_limit=round(cell["candidates_per_s"] / best, 3),
                                ratio_to_one_thread=round(
                                    cell["candidates_per_s"] / limits[1]["best_rows_per_s"], 3))
                    cells.append(cell)
                    print(row(cell), file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {"bundle": bundle, "client": client, "cores": os.cpu_count(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ort_limit": {str(t): v for t, v in limits.items()}, "best_rows_per_s": best,
            "cells": cells, "targets": targets(cells)}


TARGET_CANDIDATES, TARGET_RATIO = 100, 0.75


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 13's: with the default workers, at 100 candidates, at least 0.75 of the
    machine's in-process limit (the best cell over the connection counts)."""
    got = [c["ratio_to_limit"] for c in cells
           if c["variant"] == "default" and c["candidates"] == TARGET_CANDIDATES]
    best = max(got) if got else None
    return {"default_workers_ratio": {"target": TARGET_RATIO, "candidates": TARGET_CANDIDATES,
                                      "best": best, "met": best is not None and
                                      best >= TARGET_RATIO}}


def target_line(result: dict[str, Any]) -> str:
    t = (result.get("targets") or targets(result["cells"]))["default_workers_ratio"]
    if t["best"] is None:
        return (f"Target: the default workers at {t['candidates']} candidates >= "
                f"{t['target']} of the limit: not measured (no such cell).")
    return (f"Target: the default workers ({default_count(result)}) at {t['candidates']} "
            f"candidates >= {t['target']} of the limit: best {t['best']:.2f} "
            f"({'met' if t['met'] else 'not met'}).")


def default_count(result: dict[str, Any]) -> int | None:
    return next((c["workers"] for c in result["cells"] if c["variant"] == "default"), None)


HEADER = (f"{'workers':>8} {'cand':>5} {'conc':>5} {'req/s':>8} {'cand/s':>9} {'limit':>6} "
          f"{'1-thr':>6} {'p50 ms':>7} {'p99 ms':>7} {'server':>6} {'client':>6} "
          f"{'ort ms':>7} {'other':>7} {'redis':>7}")


def row(c: dict[str, Any]) -> str:
    cpu = c["cpu_ms_per_request"]
    return (f"{c['variant']:>8} {c['candidates']:>5} {c['concurrency']:>5} "
            f"{c['requests_per_s']:>8,.0f} {c['candidates_per_s']:>9,} "
            f"{c['ratio_to_limit']:>6.2f} {c['ratio_to_one_thread']:>6.2f} {c['p50_ms']:>7.1f} "
            f"{c['p99_ms']:>7.1f} {c['server_cpu_cores']:>6.2f} {c['client_cpu_cores']:>6.2f} "
            f"{cpu['inference']:>7.3f} {cpu['scorer_other']:>7.3f} {cpu['redis_server']:>7.3f}")


def table(result: dict[str, Any]) -> str:
    limits = ", ".join(f"{t} thread(s) {v['best_rows_per_s']:,} rows/s at batch "
                       f"{v['best_batch']}" for t, v in result["ort_limit"].items())
    return "\n".join([f"in-process onnxruntime: {limits}", HEADER,
                      *(row(c) for c in result["cells"]), target_line(result)])


def markdown(result: dict[str, Any]) -> str:
    """Requests/s per worker count side by side, and the ratios to the in-process limit."""
    limits = ", ".join(f"{t} thread(s) {v['best_rows_per_s']:,} rows/s"
                       for t, v in result["ort_limit"].items())
    workers = list(dict.fromkeys(c["variant"] for c in result["cells"]))
    cells = {(c["candidates"], c["concurrency"], c["variant"]): c for c in result["cells"]}
    head = ["candidates", "connections", *(f"{w} worker(s) req/s" for w in workers),
            *(f"{w}: of the limit / of 1 thread" for w in workers)]
    lines = [f"In-process onnxruntime limit: {limits} ({result['cores']} cores, "
             f"client {result['client']}).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for n, conc in dict.fromkeys((c["candidates"], c["concurrency"]) for c in result["cells"]):
        got = [cells.get((n, conc, w)) for w in workers]
        lines.append("| " + " | ".join([str(n), str(conc),
                                        *(f"{c['requests_per_s']:,.0f}" if c else "-"
                                          for c in got),
                                        *(f"{c['ratio_to_limit']:.2f} / "
                                          f"{c['ratio_to_one_thread']:.2f}" if c else "-"
                                          for c in got)]) + " |")
    return "\n".join([*lines, "", target_line(result), "", cpu_markdown(result["cells"])])


def cpu_markdown(cells: list[dict[str, Any]]) -> str:
    """Where a request's CPU went, per cell: onnxruntime, the rest of the scorer, Redis (per
    request answered or shed: where most were shed, the figures mix the two)."""
    lines = ["| workers | candidates | connections | answered | shed | onnxruntime ms | "
             "rest of the scorer ms | redis-server ms |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        cpu = c["cpu_ms_per_request"]
        lines.append(f"| {c['variant']} | {c['candidates']} | {c['concurrency']} | "
                     f"{c['requests']:,} | {c['shed']:,} | {cpu['inference']:.3f} | "
                     f"{cpu['scorer_other']:.3f} | {cpu['redis_server']:.3f} |")
    return "\n".join(lines)


def variant_flags(variant: str) -> list[str]:
    """`ctrserve serve` flags of a variant "N", "default", or either with ":thread" / ":loop"."""
    workers, _, where = variant.partition(":")
    flags = [] if workers == "default" else ["--workers", str(worker_count(variant))]
    if where:
        if where not in ("thread", "loop"):
            raise SystemExit(f"--workers {variant}: expected N, N:thread or N:loop")
        flags.append("--inference-thread" if where == "thread" else "--no-inference-thread")
    return flags


def worker_count(variant: str) -> int:
    workers = variant.partition(":")[0]
    if workers == "default":
        return default_workers()
    try:
        return int(workers)
    except ValueError:
        raise SystemExit(f"--workers {variant}: expected N or default, optionally with :thread "
                         "or :loop") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_workers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=Path("demo/registry"))
    p.add_argument("--bundle")
    p.add_argument("--features", type=Path, help="synth dir (default: REGISTRY/../data)")
    p.add_argument("--workers", type=lambda text: tuple(text.split(",")),
                   default=("1", "default"),
                   help="worker counts (`default`: the scorer's own, one per usable core), each "
                        "optionally with where inference runs: 1,2,2:thread (without: the "
                        "scorer's own choice for that count)")
    p.add_argument("--candidates", type=ints, default=(10, 100, 500))
    p.add_argument("--concurrency", type=ints, default=(16, 64))
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--quick", action="store_true",
                   help="one short cell per worker count: a smoke run")
    p.add_argument("--out", type=Path, default=Path("bench-out/workers.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.concurrency, args.duration = (10,), (16,), 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(HEADER, file=sys.stderr, flush=True)
    result = run(args)
    write_result(result, args.out)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
