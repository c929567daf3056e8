"""Overload benchmark: goodput and latency past saturation, admission control on against off.

    python -m ctrserve.loadtest.bench_overload --registry demo/registry [--bundle NAME]
        [--features demo/data] [--candidates 10,100,500] [--loads 1.5,2,3] [--duration 10]
        [--workers 1] [--quick] [--out bench-out/overload.json]

Two scorers as subprocesses (bench_serving.Server, each with its own embedded Redis loaded
from the synth dir): `admission` (the default) and `no-admission` (`CTRSERVE_ADMISSION=false`,
the scorer as it was: work first, shed in the batcher). Per candidate count, each scorer's
saturation is its best closed-loop rate of answered requests over 16, 64 and 256 connections
(batching gains with concurrency at small candidate lists); then each is driven open loop at
`--loads` times its own saturation, and goodput is reported against the better scorer's
saturation (the machine's capacity for the bundle). Open loop: request i is due at i / rate,
whatever the replies, and its latency counts from that due time (no coordinated omission);
up to 512 keep-alive connections; a request unanswered after 10 s counts as timed out; `late`
is 504s plus 200s answered after the deadline. The two
scorers' cells alternate (ABBA). Reported per cell: goodput (200s per second) and its ratio to
saturation, p50/p99/max of the 200s, the 503s, 504s, other statuses and timeouts, and the
client's CPU (a Python client on the same 2 cores takes CPU from the server: the figure says
how much). Targets (issue 13): goodput >= 90% of saturation and p99 of 200s within the request
deadline (1 s) at every load. Goodput counts only the 200s answered within that deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
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
    exchange,
    make_bodies,
    newest_bundle,
    records,
    score_payloads,
    write_result,
)

FULL = {"candidates": (10, 100, 500), "loads": (1.5, 2.0, 3.0), "duration": 10.0}
QUICK = {"candidates": (10,), "loads": (2.0,), "duration": 1.0}
CLOSED_CONNECTIONS, OPEN_CONNECTIONS, TIMEOUT_S = (16, 64, 256), 512, 10.0
TARGET_GOODPUT, DEADLINE_MS = 0.9, 1000.0
MODES = {"admission": [], "no-admission": ["--no-admission"]}
# --admission-target-ms MS adds a third scorer, "admission-MSms", with that target instead of
# the default (a fifth of the deadline): two targets compared interleaved, in one run


# ---- the client (its own process) ------------------------------------------------------------
def run_client(url: str, bodies: list[str], rate: float | None, duration: float,
               connections: int) -> dict[str, Any]:
    """Closed loop over `connections` (rate None) or open loop at `rate` requests/s."""
    host, port, payloads = score_payloads(url, bodies)
    results: list[tuple[int, float]] = []  # (status, latency s); status 0: transport error

    async def connection(queue: asyncio.Queue, until: float) -> None:
        reader = writer = None
        while time.perf_counter() < until:
            item = await queue.get() if queue is not None else (time.perf_counter(), None)
            if item is None:
                break
            due, payload = item
            payload = payload or payloads[len(results) % len(payloads)]
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status = await asyncio.wait_for(exchange(reader, writer, payload),
                                                max(0.01, due + TIMEOUT_S - time.perf_counter()))
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError,
                    TimeoutError):
                status = 0
                if writer is not None:
                    writer.close()
                reader = writer = None
            results.append((status, time.perf_counter() - due))
        if writer is not None:
            writer.close()

    async def main() -> float:
        started = time.perf_counter()
        until = started + duration + (TIMEOUT_S if rate else 0)
        if rate is None:
            await asyncio.gather(*(connection(None, started + duration)
                                   for _ in range(connections)))
            return time.perf_counter() - started
        queue: asyncio.Queue = asyncio.Queue()
        workers = [asyncio.create_task(connection(queue, until)) for _ in range(connections)]
        for i in range(int(rate * duration)):
            due = started + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            queue.put_nowait((due, payloads[i % len(payloads)]))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        return duration

    try:
        import uvloop

        seconds = uvloop.run(main())
    except ImportError:
        seconds = asyncio.run(main())
    return summarize_client(results, seconds)


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


def drive(url: str, bodies_file: Path, rate: float | None, duration: float,
          connections: int) -> dict[str, Any]:
    """One cell from a client process; adds its CPU in cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "ctrserve.loadtest.bench_overload", "client", "--url", url,
           "--bodies", str(bodies_file), "--duration", str(duration),
           "--connections", str(connections)]
    cmd += ["--rate", str(rate)] if rate else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=duration + TIMEOUT_S + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["client_cpu_cores"] = round(cpu / (time.perf_counter() - started), 2)
    return result


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
    worker_flags = ["--workers", str(args.workers)]
    servers = {mode: Server(mode, args.registry, bundle, features, workdir,
                            [*extra, *worker_flags], env) for mode, (extra, env) in modes.items()}
    cells: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.wait_ready()
        for n in candidates:
            bodies_file = workdir / f"bodies-{n}.jsonl"
            bodies_file.write_text("\n".join(make_bodies(users, apps, n, BODIES_PER_SIZE)))
            saturation = {mode: 0.0 for mode in servers}
            for c in CLOSED_CONNECTIONS:
                for mode, server in servers.items():
                    drive(server.url, bodies_file, None, min(1.0, duration), c)  # warm
                    server.wait_idle()
                    sat = drive(server.url, bodies_file, None, duration, c)
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
                    cell = drive(server.url, bodies_file, rate, duration, OPEN_CONNECTIONS)
                    server.wait_idle(timeout=60)
                    cells.append({"mode": mode, "candidates": n, "load": load,
                                  "connections": OPEN_CONNECTIONS, "rate": round(rate, 1),
                                  "saturation_per_s": saturation[mode],
                                  "best_saturation_per_s": best,
                                  "goodput_ratio": round(cell["goodput_per_s"] / best, 3),
                                  **cell})
                    say(row(cells[-1], best))
    finally:
        for server in servers.values():
            server.stop()
    return {"bundle": bundle, "workers": args.workers,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration_s": duration, "quick": args.quick, "cells": cells,
            "targets": targets(cells)}


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 13's targets over the admission scorer's open-loop cells."""
    open_cells = [c for c in cells if c["mode"] == "admission" and c["load"] != "closed"]
    worst_ratio = min((c["goodput_ratio"] for c in open_cells), default=None)
    worst_p99 = max((c["p99_ms"] or 0 for c in open_cells), default=None)
    return {"goodput_ratio": {"worst": worst_ratio, "goal": TARGET_GOODPUT,
                              "met": worst_ratio is not None and worst_ratio >= TARGET_GOODPUT},
            "p99_ms": {"worst": worst_p99, "goal": DEADLINE_MS,
                       "met": worst_p99 is not None and worst_p99 <= DEADLINE_MS}}


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
            f"{shed:>7} {late:>6} {lost:>7} {other:>6} {c['client_cpu_cores']:>6.2f}")


HEADER = (f"{'mode':>17} {'cand':>4} {'load':>6} {'goodput/s':>9} {'ratio':>6} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8} {'503':>7} {'late':>6} {'timeout':>7} {'other':>6} "
          f"{'client':>6}")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(result: dict[str, Any]) -> str:
    lines = [HEADER]
    for c in result["cells"]:
        lines.append(row(c, c.get("best_saturation_per_s") or c["goodput_per_s"]))
    t = result["targets"]
    lines.append(f"targets (admission, open loop): goodput >= {TARGET_GOODPUT:.0%} of saturation:"
                 f" worst {fmt(t['goodput_ratio']['worst'])} "
                 f"({'met' if t['goodput_ratio']['met'] else 'NOT met'}); p99 of 200s <= "
                 f"{DEADLINE_MS:.0f} ms: worst {fmt(t['p99_ms']['worst'])} ms "
                 f"({'met' if t['p99_ms']['met'] else 'NOT met'})")
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
    p.add_argument("--out", type=Path, default=Path("bench-out/overload.json"))
    return p.parse_args(argv)


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
