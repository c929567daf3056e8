"""Overload benchmark: goodput and latency past saturation, admission control on against off.

    python -m ctrserve.loadtest.bench_overload --registry demo/registry [--bundle NAME]
        [--features demo/data] [--candidates 10,100,500] [--loads 1.5,2,3] [--duration 10]
        [--workers 1] [--client-cores 0] [--open-connections N] [--scorer NAME=FLAGS]
        [--quick] [--out bench-out/overload.json]

Two scorers as subprocesses (bench_serving.Server, each with its own embedded Redis loaded
from the synth dir): `admission` (the default) and `no-admission` (`CTRSERVE_ADMISSION=false`,
the scorer as it was: work first, shed in the batcher). Per candidate count, each scorer's
saturation is its best closed-loop rate of answered requests over 16, 64 and 256 connections
(batching gains with concurrency at small candidate lists); then each is driven open loop at
`--loads` times its own saturation, and goodput is reported against the better scorer's
saturation (the machine's capacity for the bundle). Open loop: request i is due at i / rate,
whatever the replies, and its latency counts from that due time (no coordinated omission);
keep-alive connections (`--open-connections`; by default enough to hold a quarter second of the
rate, 512 to 1536), all opened before the first request is due, on the lean client of
http_load.py; a request unanswered after 10 s counts as timed out; `late` is 504s plus 200s
answered after the deadline. The two scorers' cells alternate (ABBA); `--scorer NAME=FLAGS`
adds a scorer with other `ctrserve serve` flags (admission on), its cells interleaved with
theirs.

Reported per cell: goodput (200s per second) and its ratio to saturation, p50/p99/max of the
200s, the 503s, 504s, other statuses and timeouts; the open-loop client's send lag (p99 from a
request's due time to its sending: large when every connection is busy or the client is
starved, and then the cell measures the client); the client's CPU; and the scorer's CPU (its
processes and its redis-server) in cores and per on-time answer: a scorer short of its cores
is held back by its limit, one with a high cost per answer spends its CPU on sheds, late work
or wake-ups. Per candidate count, a third scorer whose one admission slot is held measures
what a shed costs: every request it gets is a 503 (`shed_cost`, in µs of its CPU).

`--client-cores K` pins the clients to the first K cores and the scorers (and the redis-servers
they start) to the others: on a small machine the Python client otherwise takes CPU from the
scorer in proportion to the offered load, so past saturation the scorer has less CPU than when
its saturation was measured. Targets (issue 13): goodput >= 90% of saturation and p99 of 200s
within the request deadline (1 s) at every load. Goodput counts only the 200s answered within
that deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctrserve.loadtest.bench_serving import (
    BODIES_PER_SIZE,
    Server,
    make_bodies,
    newest_bundle,
    records,
    score_payloads,
    write_result,
)
from ctrserve.loadtest.http_load import run_load

FULL = {"candidates": (10, 100, 500), "loads": (1.5, 2.0, 3.0), "duration": 10.0}
QUICK = {"candidates": (10,), "loads": (2.0,), "duration": 1.0}
CLOSED_CONNECTIONS, OPEN_CONNECTIONS, MAX_OPEN_CONNECTIONS = (16, 64, 256), 512, 1536
TIMEOUT_S = 10.0
TARGET_GOODPUT, DEADLINE_MS = 0.9, 1000.0
# an open-loop cell whose client sent later than this (p99) offered less than its rate and
# added the lag to the latencies: it measured the client as much as the scorer
CLIENT_LAG_MS = 50.0
MODES = {"admission": [], "no-admission": ["--no-admission"]}
# --admission-target-ms MS adds a third scorer, "admission-MSms", with that target instead of
# the default (a fifth of the deadline): two targets compared interleaved, in one run


# ---- the client (its own process) ------------------------------------------------------------
def run_client(url: str, bodies: list[str], rate: float | None, duration: float,
               connections: int) -> dict[str, Any]:
    """Closed loop over `connections` (rate None) or open loop at `rate` requests/s."""
    host, port, payloads = score_payloads(url, bodies)
    out = run_load(host, port, payloads, rate, duration, connections, TIMEOUT_S)
    summary = summarize_client(out.results, out.seconds)
    # a client that sends late (its own loop behind, every connection busy) offers less than the
    # rate and adds its lag to the latencies: the cell then measures the client
    summary["send_lag_p99_ms"] = (round(float(np.percentile(out.lags, 99)) * 1000, 1)
                                  if out.lags else None)
    return summary


def open_connections(rate: float, given: int | None) -> int:
    """The open loop's connections: `given`, or enough to hold every request for a quarter
    second (an answer admitted under the 100 ms target is held about 120 ms), within
    512..1536 (the scorer's max_connections is 2048)."""
    return given or max(OPEN_CONNECTIONS, min(MAX_OPEN_CONNECTIONS, int(rate * 0.25) + 1))


def summarize_client(results: list[tuple[int, float]], seconds: float) -> dict[str, Any]:
    """Goodput counts the 200s answered within the deadline (from their due time), per second
    of sending; a 200 after the deadline is useless to the client that sent it."""
    ok = np.array([lat for status, lat in results if status == 200]) * 1000
    on_time = int((ok <= DEADLINE_MS).sum())
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)), 1) if len(ok) else None

    return {"seconds": seconds, "sent": len(results), "ok": len(ok), "on_time": on_time,
            "statuses": statuses, "goodput_per_s": round(on_time / seconds, 1),
            "p50_ms": pct(50), "p99_ms": pct(99),
            "max_ms": round(float(ok.max()), 1) if len(ok) else None}


def drive(server: Server, bodies_file: Path, rate: float | None, duration: float,
          connections: int, cpus: list[int] | None = None) -> dict[str, Any]:
    """One cell from a client process; adds its CPU and the scorer's (every process, the
    embedded redis-server included) in cores, and the scorer's CPU per on-time answer."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = sum(server.cpu_seconds().values())
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "ctrserve.loadtest.bench_overload", "client", "--url", server.url,
           "--bodies", str(bodies_file), "--duration", str(duration),
           "--connections", str(connections)]
    cmd += ["--rate", str(rate)] if rate else []
    pinned = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=pinned,
                         timeout=duration + TIMEOUT_S + 120)
    wall = time.perf_counter() - started
    server_cpu = sum(server.cpu_seconds().values()) - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["client_cpu_cores"] = round(cpu / wall, 2)
    result["server_cpu_s"] = round(server_cpu, 3)
    # over the client's sending time: `wall` adds its start-up (0.2-1 s, the scorer idle), which
    # read as a scorer short of its core (0.80-0.90 where /proc/stat showed its core busy)
    result["server_cpu_cores"] = round(server_cpu / result["seconds"], 2)
    result["server_ms_per_on_time"] = (round(1000 * server_cpu / result["on_time"], 3)
                                       if result["on_time"] else None)
    return result


# ---- what a shed costs ---------------------------------------------------------------------------
# a scorer whose one admission slot is held by a request whose body never completes: every
# other score request is shed. Its admission target of 1 ms is also the pause before a shed
# connection is read again (server.py), so that 64 connections keep it busy shedding
SHED_ONLY_ENV = {"CTRSERVE_ADMISSION_MIN": "1", "CTRSERVE_ADMISSION_INITIAL": "1",
                 "CTRSERVE_ADMISSION_MAX": "1", "CTRSERVE_BODY_TIMEOUT_S": "3600",
                 "CTRSERVE_ADMISSION_TARGET_MS": "1"}


def shed_cost(server: Server, bodies_file: Path, duration: float,
              cpus: list[int] | None = None) -> dict[str, Any]:
    """The scorer's CPU per shed request: closed loop, 64 connections, every answer a 503."""
    host, port, payloads = score_payloads(server.url, bodies_file.read_text().splitlines()[:1])
    holder = hold_the_slot(host, port, payloads[0])
    try:
        cell = drive(server, bodies_file, None, duration, 64, cpus)
    finally:
        holder.close()
    sheds = cell["statuses"].get("503", 0)
    cell["server_us_per_shed"] = round(1e6 * cell["server_cpu_s"] / sheds, 1) if sheds else None
    return cell


def hold_the_slot(host: str, port: int, payload: bytes, timeout: float = 30) -> socket.socket:
    """A connection whose request holds the one admission slot: admitted at its headers, the
    last byte of its body never sent. Held once a second request is shed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = socket.create_connection((host, port), timeout=10)
        holder.sendall(payload[:-1])
        with socket.create_connection((host, port), timeout=10) as probe:
            probe.sendall(payload)
            if probe.recv(64).split(b" ")[1:2] == [b"503"]:
                return holder
        holder.close()  # the probe came first: try again
    raise SystemExit(f"no request held the admission slot within {timeout:g} s")


# ---- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    candidates = args.candidates or plan["candidates"]
    loads = args.loads or plan["loads"]
    duration = args.duration or plan["duration"]
    bundle = args.bundle or newest_bundle(args.registry, "deepfm")
    features = args.features or args.registry.parent / "data"
    users, apps = records(features)
    workdir = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    modes = {mode: (extra, {}) for mode, extra in MODES.items()}
    if args.admission_target_ms:
        modes[f"admission-{args.admission_target_ms:g}ms"] = (
            [], {"CTRSERVE_ADMISSION_TARGET_MS": str(args.admission_target_ms)})
    for name, flags in args.scorer:
        modes[name] = (flags.split(), {})
    worker_flags = ["--workers", str(args.workers)]
    servers = {mode: Server(mode, args.registry, bundle, features, workdir,
                            [*extra, *worker_flags], env) for mode, (extra, env) in modes.items()}
    shed_only = Server("shed-only", args.registry, bundle, features, workdir, worker_flags,
                       SHED_ONLY_ENV)
    cells: list[dict[str, Any]] = []
    sheds: list[dict[str, Any]] = []
    try:
        cores = pin([*servers.values(), shed_only], args.client_cores)
        client_cpus = cores and cores["client"]
        for server in [*servers.values(), shed_only]:
            server.wait_ready()
        for n in candidates:
            bodies_file = workdir / f"bodies-{n}.jsonl"
            bodies_file.write_text("\n".join(make_bodies(users, apps, n, BODIES_PER_SIZE)))
            shed = shed_cost(shed_only, bodies_file, duration, client_cpus)
            sheds.append({"candidates": n, **shed})
            say(f"shed-only {n:>4}: {sheds[-1]['server_us_per_shed']} µs of the scorer's CPU "
                f"per shed, {sheds[-1]['statuses'].get('503', 0) / sheds[-1]['seconds']:,.0f} "
                "sheds/s")
            saturation = {mode: 0.0 for mode in servers}
            for c in CLOSED_CONNECTIONS:
                for mode, server in servers.items():
                    drive(server, bodies_file, None, min(1.0, duration), c, client_cpus)  # warm
                    server.wait_idle()
                    sat = drive(server, bodies_file, None, duration, c, client_cpus)
                    server.wait_idle()
                    saturation[mode] = max(saturation[mode], sat["goodput_per_s"])
                    cells.append({"mode": mode, "candidates": n, "load": "closed",
                                  "connections": c, "rate": None, **sat})
                    say(row(cells[-1], sat["goodput_per_s"]))
            # goodput against the better scorer's saturation: the machine's capacity for this
            # bundle (closed-loop clients that resend 503s at once depress the admission
            # scorer's own); each scorer is offered its load relative to its own saturation
            best = max(saturation.values())
            for i, load in enumerate(loads):
                order = list(servers.items()) if i % 2 == 0 else list(servers.items())[::-1]
                for mode, server in order:
                    rate = load * saturation[mode]
                    connections = open_connections(rate, args.open_connections)
                    cell = drive(server, bodies_file, rate, duration, connections, client_cpus)
                    server.wait_idle(timeout=60)
                    cells.append({"mode": mode, "candidates": n, "load": load,
                                  "connections": connections,
                                  "rate": round(rate, 1),
                                  "saturation_per_s": saturation[mode],
                                  "best_saturation_per_s": best,
                                  "goodput_ratio": round(cell["goodput_per_s"] / best, 3),
                                  **cell})
                    say(row(cells[-1], best))
    finally:
        for server in [*servers.values(), shed_only]:
            server.stop()
    return {"bundle": bundle, "workers": args.workers, "cores": cores,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration_s": duration, "quick": args.quick, "cells": cells, "shed_cost": sheds,
            "targets": targets(cells)}


def pin(servers: list[Server], client_cores: int) -> dict[str, list[int]] | None:
    """The scorers and the redis-servers they start on all but the first `client_cores`
    cores, which the clients get (drive's `cpus`); None: all share every core."""
    if not client_cores:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if client_cores >= len(cores):
        raise SystemExit(f"--client-cores {client_cores}: only {len(cores)} cores")
    client, scorer = cores[:client_cores], cores[client_cores:]
    for server in servers:  # still starting: threads and redis-server inherit the mask
        os.sched_setaffinity(server.proc.pid, scorer)
    return {"client": client, "scorer": scorer}


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 13's targets over the admission scorer's open-loop cells."""
    open_cells = [c for c in cells if c["mode"] == "admission" and c["load"] != "closed"]
    worst_ratio = min((c["goodput_ratio"] for c in open_cells), default=None)
    worst_p99 = max((c["p99_ms"] or 0 for c in open_cells), default=None)
    lagged = [f"{c['candidates']}@{c['load']:g}x" for c in open_cells
              if (c["send_lag_p99_ms"] or 0) > CLIENT_LAG_MS]
    return {"goodput_ratio": {"worst": worst_ratio, "goal": TARGET_GOODPUT,
                              "met": worst_ratio is not None and worst_ratio >= TARGET_GOODPUT},
            "p99_ms": {"worst": worst_p99, "goal": DEADLINE_MS,
                       "met": worst_p99 is not None and worst_p99 <= DEADLINE_MS},
            "client_lagged": {"cells": lagged, "of": len(open_cells),
                              "send_lag_p99_ms_above": CLIENT_LAG_MS}}


def row(c: dict[str, Any], saturation: float) -> str:
    load = f"c{c['connections']}" if c["load"] == "closed" else f"{c['load']:g}x"
    ratio = c["goodput_per_s"] / saturation if saturation else 0
    shed = c["statuses"].get("503", 0)
    late = c["statuses"].get("504", 0)
    lost = c["statuses"].get("0", 0)
    other = c["sent"] - c["ok"] - shed - late - lost
    late += c["ok"] - c["on_time"]  # 200s past the deadline count as late
    return (f"{c['mode']:>17} {c['candidates']:>4} {load:>6} {c['goodput_per_s']:>9,.0f} "
            f"{ratio:>6.2f} {fmt(c['p50_ms']):>8} {fmt(c['p99_ms']):>8} {fmt(c['max_ms']):>8} "
            f"{shed:>7} {late:>6} {lost:>7} {other:>6} {fmt(c.get('send_lag_p99_ms')):>7} "
            f"{c['client_cpu_cores']:>6.2f} "
            f"{c['server_cpu_cores']:>6.2f} {ms3(c['server_ms_per_on_time']):>7}")


HEADER = (f"{'mode':>17} {'cand':>4} {'load':>6} {'goodput/s':>9} {'ratio':>6} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8} {'503':>7} {'late':>6} {'timeout':>7} {'other':>6} "
          f"{'lag99':>7} {'client':>6} {'server':>6} {'ms/ok':>7}")


def ms3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(result: dict[str, Any]) -> str:
    lines = [HEADER]
    for c in result["cells"]:
        lines.append(row(c, c.get("best_saturation_per_s") or c["goodput_per_s"]))
    for c in result["shed_cost"]:
        lines.append(f"a shed at {c['candidates']} candidates: {c['server_us_per_shed']} µs of "
                     f"the scorer's CPU ({c['statuses'].get('503', 0) / c['seconds']:,.0f} sheds/s"
                     f", {c['server_cpu_cores']:.2f} cores)")
    t = result["targets"]
    lines.append(f"targets (admission, open loop): goodput >= {TARGET_GOODPUT:.0%} of saturation:"
                 f" worst {fmt(t['goodput_ratio']['worst'])} "
                 f"({'met' if t['goodput_ratio']['met'] else 'NOT met'}); p99 of 200s <= "
                 f"{DEADLINE_MS:.0f} ms: worst {fmt(t['p99_ms']['worst'])} ms "
                 f"({'met' if t['p99_ms']['met'] else 'NOT met'})")
    lag = t["client_lagged"]
    if lag["cells"]:
        lines.append(f"the client lagged (send lag p99 above {CLIENT_LAG_MS:.0f} ms) in "
                     f"{len(lag['cells'])} of {lag['of']} of those cells, which measured it as "
                     f"much as the scorer: {', '.join(lag['cells'])} (candidates@load)")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """Per candidates and load: each scorer's goodput over its saturation, and its p99."""
    open_cells = [c for c in result["cells"] if c["load"] != "closed"]
    modes = list(dict.fromkeys(c["mode"] for c in open_cells))
    by = {(c["candidates"], c["load"], c["mode"]): c for c in open_cells}
    head = ["candidates", "load", *(f"goodput / saturation, {m}" for m in modes),
            *(f"p99 of 200s, {m}" for m in modes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, load in dict.fromkeys((c["candidates"], c["load"]) for c in open_cells):
        got = [by.get((n, load, m)) for m in modes]
        lines.append("| " + " | ".join([str(n), f"{load:g}x",
                                        *(f"{c['goodput_ratio']:.2f}" if c else "-" for c in got),
                                        *(ms(c["p99_ms"]) if c else "-" for c in got)]) + " |")
    t = result["targets"]
    lines += ["", f"Targets (admission, open loop): goodput >= {TARGET_GOODPUT:.0%} of saturation "
              f"({'met' if t['goodput_ratio']['met'] else 'not met'}, worst "
              f"{fmt(t['goodput_ratio']['worst'])}); p99 of 200s <= {DEADLINE_MS:.0f} ms "
              f"({'met' if t['p99_ms']['met'] else 'not met'}, worst {ms(t['p99_ms']['worst'])})."]
    return "\n".join(lines)


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_overload",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=Path("demo/registry"))
    p.add_argument("--bundle")
    p.add_argument("--features", type=Path, help="synth dir (default: REGISTRY/../data)")
    p.add_argument("--candidates", type=lambda t: tuple(int(x) for x in t.split(",")))
    p.add_argument("--loads", type=lambda t: tuple(float(x) for x in t.split(",")))
    p.add_argument("--duration", type=float)
    p.add_argument("--quick", action="store_true", help="one short cell: a smoke run")
    p.add_argument("--admission-target-ms", type=float,
                   help="also run a scorer with this admission target (compared interleaved)")
    p.add_argument("--workers", type=int, default=1,
                   help="scorer processes of each scorer (`ctrserve serve --workers`)")
    p.add_argument("--scorer", type=named_flags, action="append", default=[],
                   metavar="NAME=FLAGS", help="also run a scorer with these `ctrserve serve` "
                   "flags, its cells interleaved with the others (repeatable), e.g. "
                   "thread=--inference-thread")
    p.add_argument("--client-cores", type=int, default=0,
                   help="pin the client to this many cores and the scorers to the rest (0: "
                   "they share every core, the client taking CPU from the scorer)")
    p.add_argument("--open-connections", type=int,
                   help="the open-loop client's keep-alive connections (default: a quarter "
                   f"second of the rate, {OPEN_CONNECTIONS}..{MAX_OPEN_CONNECTIONS})")
    p.add_argument("--out", type=Path, default=Path("bench-out/overload.json"))
    return p.parse_args(argv)


def named_flags(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name or name in MODES:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=FLAGS, NAME not one of {list(MODES)}")
    return name, flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    args = parse_args(argv)
    say(HEADER)
    result = run(args)
    write_result(result, args.out)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_overload client")
    p.add_argument("--url", required=True)
    p.add_argument("--bodies", type=Path, required=True)
    p.add_argument("--rate", type=float)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--connections", type=int, required=True)
    a = p.parse_args(argv)
    bodies = a.bodies.read_text().splitlines()
    print(json.dumps(run_client(a.url, bodies, a.rate, a.duration, a.connections)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
