"""Redis memory of the online A/B state: bytes per scored request, per event, per user.

    python -m ctrserve.loadtest.bench_state --registry demo/registry [--bundle NAME] \\
        [--requests 20000] [--rate 200] [--quick] [--out bench-out]

A real redis-server (Debian's, loadtest/redis_servers.py; `--save '' --appendonly no`) on a
free port, the scorer (`python -m ctrserve serve`, a subprocess) on a DeepFM bundle, and paced
open-loop traffic from an httpx client: per request one score (`--candidates` items, top
`--shown`), one impression event of the items shown, and every `--download-every`-th request
one download of a shown item; `--users` distinct users (N/5 by default: ~5 requests each). A
drainer thread (`service.event_log.drain` every `--drain-every-s` into a temp dir) runs as in
production from the warm-up on.

Redis is sampled (`INFO memory` used_memory, and `MEMORY USAGE key SAMPLES 0` of every key
found by SCAN, by key family) four times: `before` (after a warm-up of other users, once the
drainer has emptied the logs),
`steady` (the end of the traffic, the drainer running), `drained` (the drainer stopped, the
logs drained once more) and `undrained` (after more requests with no drainer: what the streams
hold per entry). Reported:

- bytes per scored request in steady state = (used_memory[steady] - used_memory[before]) / N,
  and per key family the same delta of MEMORY USAGE; also the slope of used_memory against
  requests completed, sampled twice a second (the stream level, a few seconds of drain lag,
  does not grow with N);
- bytes per entry: dedup entry (b_seen, per accepted event), user-day (b_day: one user's x and,
  if any, y fields in a day's hashes), user total (b_total: the same in the experiment's `all`
  hashes), undrained serve and event stream entries (b_serve, b_event), one day's sums hash.
  A hash of up to 128 fields (hash-max-listpack-entries) is a compact listpack; production's
  user hashes are hashtables, several times larger per user: the per-user figures hold only
  with well over 128 users (the default N/5 is; `--quick`'s 120 are not).

What the code keeps, and for how long (service/events.py `_script_call`, serve_log.py):

- dedup: a hash per bucket of width W = dedup_window_s, EXPIREAT (bucket + 2)·W: the current
  and the previous bucket, at most 2·W of events;
- a day's per-user x/y hashes: until the day's end + attribution window + clock skew + 1 day,
  so at most 1 + (T_attr + skew + 1 d)/1 d days of users at once (3.0 for 24 h);
- the experiment's per-user totals (`ab:all:x/y`): retention after the arm's last event, so
  every distinct user of the experiment: D_u days' worth of daily users, 1 when the same
  users return every day, up to the experiment's length when each day brings new users;
- a day's sums: retention after the day, one small hash per arm and day (a constant);
- the serve and event streams: until drained (bounded by max_log_entries per arm); L, the
  drain lag allowed, is CtrserveDrainerBehind's threshold, 300 s.

With r requests/s, e events per request and users/day = 86400·r/5:

    M(r) = r·e·b_seen·2·T_dedup
         + (86400·r/5)·b_day·(1 + (T_attr + skew + 1 d)/1 d)
         + (86400·r/5)·D_u·b_total
         + r·L·(b_serve + e·b_event)
         + (retention_days + 1)·b_sums                      (per arm)
    r_max(G) = (G - (retention_days + 1)·b_sums) / k,   k = (M(r) - the constant) / r

The table gives r_max for 1, 16 and 64 GiB (maxmemory's "gb") with T_dedup 1 h and 6 h,
T_attr 24 h, 90-day retention, D_u 1 and 90, from the per-entry bytes measured. The previous
design's line uses the figures its issue quoted (~1.5 KB per request, ~2.3 KB per event, both
kept for the attribution window); they are not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from ctrserve.loadtest.bench_serving import started_url
from ctrserve.loadtest.redis_servers import LocalRedis, redis_binaries
from ctrserve.service.event_log import drain, streams

DAY_S = 86_400
GIB = 1 << 30
LAG_ALLOWANCE_S = 300  # CtrserveDrainerBehind (deploy/prometheus/alert_rules.yml)
EXPERIMENT = "bench"
LISTPACK_MAX = 128  # redis.conf hash-max-listpack-entries: smaller hashes are compact
WORKERS = 16
FAMILIES = {  # key family -> pattern of its key names (ctrserve/common/keys.py)
    "dedup": re.compile(r":seen:\d+$"),
    "user_day": re.compile(r":ab:\d{4}-\d\d-\d\d:[xy]$"),
    "user_total": re.compile(r":ab:all:[xy]$"),
    "sums": re.compile(r":ab:[^:]+:sums$"),
    "serve_log": re.compile(r":log:serve$"),
    "event_log": re.compile(r":log:events$"),
}
INFO_FIELDS = ("used_memory", "used_memory_rss", "used_memory_dataset", "used_memory_overhead",
               "mem_clients_normal", "used_memory_scripts", "mem_fragmentation_ratio")
PREVIOUS = {"request_bytes": 1500, "event_bytes": 2300}  # the figures, kept T_attr
QUICK = {"requests": 600, "rate": 100.0, "warmup": 100, "undrained": 200}


# ---- processes ----------------------------------------------------------------------------

def wait_for(ready: Any, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    """Poll `ready()` until true; RuntimeError when `proc` exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Scorer:
    """`python -m ctrserve serve` on a free port, its Redis at `redis_url`."""

    def __init__(self, registry: Path, bundle: str, redis_url: str, candidates: int,
                 features: Path | None, log: Path):
        self.url = ""  # known once the server says where it listens (_ready)
        self.args = [sys.executable, "-m", "ctrserve", "serve", "--registry", str(registry),
                     "--bundle", bundle, "--host", "127.0.0.1", "--port", "0",
                     "--max-candidates", str(max(candidates, 1000)), "--log-level", "warning"]
        if features:
            self.args += ["--features", str(features)]
        env = {k: v for k, v in os.environ.items() if k != "CTRSERVE_EXPERIMENTS_FILE"}
        self.env = {**env, "REDIS_URL": redis_url, "CTRSERVE_REDIS_URL": redis_url,
                    "CTRSERVE_EXPERIMENT": EXPERIMENT, "CTRSERVE_WARMUP_ROUNDS": "1"}
        self.log = log

    def _ready(self) -> bool:
        self.url = self.url or started_url(self.log) or ""
        if not self.url:
            return False
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> Scorer:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, self.proc, 120, f"the scorer (log: {self.log})")
        except RuntimeError:
            stop(self.proc)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)


class Drainer(threading.Thread):
    """drain() in a loop, `every_s` apart, until stopped: the drainer running."""

    def __init__(self, redis_url: str, out: Path, every_s: float):
        super().__init__(daemon=True)
        self.redis_url, self.out, self.every_s = redis_url, out, every_s
        self.done = threading.Event()
        self.passes = self.moved = 0

    def run(self) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            while not self.done.is_set():
                result = drain(client, self.out)
                self.passes += 1
                self.moved += result["events"] + result["served"]
                self.done.wait(self.every_s)

    def stop(self) -> None:
        self.done.set()
        self.join(60)


def backlog(client: redis.Redis) -> int:
    return sum(client.xlen(name) for name in streams(client))


def wait_drained(client: redis.Redis, timeout_s: float) -> None:
    """Until the running drainer has emptied every log stream."""
    deadline = time.monotonic() + timeout_s
    while backlog(client):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the drainer left {backlog(client)} entries for {timeout_s} s")
        time.sleep(0.05)


def drain_all(client: redis.Redis, out: Path) -> None:
    while sum(drain(client, out)["left"].values()):
        time.sleep(0.05)


# ---- traffic ------------------------------------------------------------------------------

@dataclass
class Traffic:
    """What each request sends; `users` and `items` are the ids drawn from."""

    users: list[str]
    items: list[str]
    candidates: int
    shown: int
    download_every: int
    seed: int = 7


@dataclass
class Tally:
    scored: int = 0
    errors: int = 0
    events: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "duplicate": 0,
                                                            "rejected": 0})
    max_late_s: float = 0.0
    first_error: str = ""
    seconds: float = 0.0
    memory: list[tuple[int, int]] = field(default_factory=list)  # (scored, used_memory)


def events_for(reply: dict[str, Any], index: int, traffic: Traffic,
               rng: random.Random) -> list[dict[str, Any]]:
    """The impression of the items shown, and every `download_every`-th request a download."""
    user, shown, ts = reply["user_id"], reply["item_ids"], time.time()
    events = [{"event_id": reply["request_id"] + ".i", "type": "impression",
               "attribution": reply["attribution"], "user_id": user, "ts": ts,
               "items": [{"item_id": i, "position": p} for p, i in enumerate(shown, 1)]}]
    if index % traffic.download_every == traffic.download_every - 1:
        events.append({"event_id": reply["request_id"] + ".d", "type": "download",
                       "attribution": reply["attribution"], "user_id": user,
                       "item_id": rng.choice(shown), "ts": ts})
    return events


async def one_request(client: httpx.AsyncClient, traffic: Traffic, index: int,
                      tally: Tally) -> None:
    rng = random.Random(traffic.seed * 1_000_003 + index)
    user = rng.choice(traffic.users)
    body = {"user_id": user, "top_k": traffic.shown,
            "candidates": [{"item_id": i} for i in rng.sample(traffic.items,
                                                                traffic.candidates)]}
    try:
        scored = await post(client, "/v1/score", body)
        reply = {**scored.json(), "user_id": user}
        sent = await post(client, "/v1/events",
                          {"events": events_for(reply, index, traffic, rng)})
    except httpx.HTTPError as exc:
        tally.errors += 1
        tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"
        return
    tally.scored += 1
    for status in tally.events:
        tally.events[status] += sent.json()[status]


async def post(client: httpx.AsyncClient, path: str, body: dict,
               attempts: int = 3) -> httpx.Response:
    """POST as a well-behaved client: a 503 (shed) is sent again after its Retry-After. Both
    are safe to repeat: a score is a new request, an event a duplicate by its id."""
    for _ in range(attempts - 1):
        reply = await client.post(path, json=body)
        if reply.status_code != 503:
            return reply.raise_for_status()
        await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
    return (await client.post(path, json=body)).raise_for_status()


async def sample_memory(redis_url: str, tally: Tally, done: asyncio.Event) -> None:
    """used_memory against requests scored, twice a second."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        while not done.is_set():
            used = (await client.info("memory"))["used_memory"]
            tally.memory.append((tally.scored, used))
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()


async def drive(url: str, redis_url: str, traffic: Traffic, first: int, n: int,
                rate: float) -> Tally:
    """Requests first..first+n-1, request i due at i/rate (open loop), WORKERS at a time."""
    tally, indices = Tally(), iter(range(n))
    limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        start = time.monotonic()

        async def worker() -> None:
            for i in indices:
                late = time.monotonic() - (start + i / rate)
                if late < 0:
                    await asyncio.sleep(-late)
                tally.max_late_s = max(tally.max_late_s, late)
                await one_request(client, traffic, first + i, tally)

        done = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(redis_url, tally, done))
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        tally.seconds = time.monotonic() - start
        done.set()
        await sampler
    return tally


def run_traffic(url: str, redis_url: str, traffic: Traffic, first: int, n: int,
                rate: float) -> Tally:
    return asyncio.run(drive(url, redis_url, traffic, first, n, rate))


# ---- Redis sampling -----------------------------------------------------------------------

def family(key: str) -> str:
    return next((name for name, pattern in FAMILIES.items() if pattern.search(key)), "other")


def entries(client: redis.Redis, key: bytes, kind: str) -> tuple[int, int]:
    """(fields or stream entries, users: fields of an `x` hash, else 0)."""
    if kind in ("serve_log", "event_log"):
        return client.xlen(key), 0
    if kind in ("dedup", "user_day", "user_total"):
        n = client.hlen(key)
        return n, n if key.endswith(b":x") else 0
    return 0, 0


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """used_memory, and per key family: keys, bytes (MEMORY USAGE), entries, users."""
    info = client.info("memory")
    families = {name: {"keys": 0, "bytes": 0, "entries": 0, "users": 0}
                for name in [*FAMILIES, "other"]}
    for key in client.scan_iter(count=1000):
        kind = family(key.decode())
        usage = client.memory_usage(key, samples=0)
        if usage is None:  # expired or drained away since the SCAN
            continue
        n, users = entries(client, key, kind)
        f = families[kind]
        f["keys"], f["bytes"], f["entries"], f["users"] = (
            f["keys"] + 1, f["bytes"] + usage, f["entries"] + n, f["users"] + users)
    return {**{k: info.get(k) for k in INFO_FIELDS}, "families": families}


def delta(after: dict[str, Any], before: dict[str, Any], kind: str, what: str) -> int:
    return after["families"][kind][what] - before["families"][kind][what]


def per(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def per_entry(s: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Bytes per dedup entry, user-day, user total, undrained stream entry, day's sums."""
    steady, before = s["steady"], s["before"]
    undrained, drained = s["undrained"], s["drained"]
    sums = steady["families"]["sums"]
    return {
        "dedup_entry": per(delta(steady, before, "dedup", "bytes"),
                           delta(steady, before, "dedup", "entries")),
        "user_day": per(delta(steady, before, "user_day", "bytes"),
                        delta(steady, before, "user_day", "users")),
        "user_total": per(delta(steady, before, "user_total", "bytes"),
                          delta(steady, before, "user_total", "users")),
        "serve_entry": per(delta(undrained, drained, "serve_log", "bytes"),
                           delta(undrained, drained, "serve_log", "entries")),
        "event_entry": per(delta(undrained, drained, "event_log", "bytes"),
                           delta(undrained, drained, "event_log", "entries")),
        "day_sums": per(sums["bytes"], sums["keys"]),
    }


def slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares bytes per request of used_memory against requests scored."""
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return per(sum((x - mx) * (y - my) for x, y in points), sxx)


def per_request(after: dict[str, Any], before: dict[str, Any], n: int) -> dict[str, Any]:
    families = {k: delta(after, before, k, "bytes") / n for k in after["families"]}
    used = (after["used_memory"] - before["used_memory"]) / n
    clients = (after["mem_clients_normal"] - before["mem_clients_normal"]) / n
    return {"used_memory": used, "families": families, "clients": clients,
            "not_in_keys": used - sum(families.values()) - clients}


# ---- the capacity model -------------------------------------------------------------------

FORMULA = ("M(r) = r*e*b_seen*2*T_dedup + (86400*r/5)*b_day*(1 + (T_attr + skew + 1 d)/1 d)"
           " + (86400*r/5)*D_u*b_total + r*L*(b_serve + e*b_event)"
           " + (retention_days + 1)*b_sums;  r_max(G) = (G - (retention_days + 1)*b_sums) / k,"
           " k = the bytes per request/s of the other terms")


def bytes_per_rps(b: dict[str, float], e: float, dedup_s: int, attr_s: int, skew_s: int,
                  user_days: int) -> dict[str, float]:
    """The terms of M(r)/r: bytes per request/s held in steady state."""
    users_per_rps = DAY_S / 5
    return {
        "dedup": e * b["dedup_entry"] * 2 * dedup_s,
        "user_day": users_per_rps * b["user_day"] * (1 + (attr_s + skew_s + DAY_S) / DAY_S),
        "user_total": users_per_rps * user_days * b["user_total"],
        "logs": LAG_ALLOWANCE_S * (b["serve_entry"] + e * b["event_entry"]),
    }


def capacity(b: dict[str, float], e: float, attr_s: int, skew_s: int,
             retention_days: int) -> list[dict[str, Any]]:
    constant = (retention_days + 1) * b["day_sums"]
    rows = []
    for dedup_s in (3600, 6 * 3600):
        for user_days in (1, retention_days):
            terms = bytes_per_rps(b, e, dedup_s, attr_s, skew_s, user_days)
            k = sum(terms.values())
            rows.append({"dedup_window_s": dedup_s, "user_days": user_days,
                         "bytes_per_rps": terms, "bytes_per_request_per_day": k / DAY_S,
                         "rps": {g: (g * GIB - constant) / k
                                                         for g in (1, 16, 64)}})
    return rows


def previous_capacity(e: float, attr_s: int) -> dict[str, Any]:
    k = attr_s * (PREVIOUS["request_bytes"] + e * PREVIOUS["event_bytes"])
    return {**PREVIOUS, "source": "quoted by the issue, not measured",
            "bytes_per_rps": k, "rps": {g: g * GIB / k for g in (1, 16, 64)}}


# ---- the run ------------------------------------------------------------------------------

def newest_bundle(registry: Path) -> str:
    found = sorted((p for p in registry.glob("deepfm-*") if (p / "manifest.json").exists()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no deepfm-* bundle in {registry}: pass --bundle")
    return found[-1].name


def item_ids(bundle_dir: Path, at_least: int) -> list[str]:
    """The app ids the bundle was trained on, topped up with made-up ids to `at_least`."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    known: list[str] = []
    for f in manifest.get("encoder", {}).get("fields", []):
        if f.get("spec", {}).get("name") in ("app_id", "item_id"):
            known = [v for v in f.get("vocab") or [] if isinstance(v, str)]
    return known + [f"x{i:05d}" for i in range(max(0, at_least - len(known)))]


def settings_used() -> dict[str, Any]:
    from ctrserve.service.settings import Settings

    s = Settings(_env_file=None)
    return {"dedup_window_s": s.dedup_window_s, "attribution_window_s": s.attribution_window_s,
            "event_clock_skew_s": s.event_clock_skew_s,
            "counts_retention_days": s.counts_retention_days,
            "max_log_entries": s.max_log_entries}


def phase(scorer: Scorer, redis_url: str, traffic: Traffic, first: int, n: int,
          rate: float) -> Tally:
    tally = run_traffic(scorer.url, redis_url, traffic, first, n, rate)
    if tally.errors:
        print(f"warning: {tally.errors} of {n} requests failed, the first with "
              f"{tally.first_error}", file=sys.stderr)
    return tally


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The four samples and the traffic behind them (module docstring)."""
    bundle_dir = args.registry / args.bundle
    items = item_ids(bundle_dir, args.candidates)
    main_users = [f"u{i:07d}" for i in range(args.users)]
    warm = Traffic([f"w{i:07d}" for i in range(max(1, args.warmup // 5))], items,
                   args.candidates, args.shown, args.download_every)
    traffic = Traffic(main_users, items, args.candidates, args.shown, args.download_every)
    samples: dict[str, Any] = {}
    with LocalRedis(work / "redis") as server, \
            redis.Redis.from_url(server.url) as client, \
            Scorer(args.registry, args.bundle, server.url, args.candidates, args.features,
                   work / "scorer.log") as scorer:
        drainer = Drainer(server.url, work / "logs", args.drain_every_s)
        drainer.start()  # before the warm-up: its connection is in the `before` sample
        phase(scorer, server.url, warm, 0, args.warmup, args.rate)
        wait_drained(client, 60)
        samples["before"] = snapshot(client)
        main = phase(scorer, server.url, traffic, 0, args.requests, args.rate)
        samples["steady"] = snapshot(client)
        drainer.stop()
        drain_all(client, work / "logs")
        samples["drained"] = snapshot(client)
        undrained = phase(scorer, server.url, traffic, args.requests, args.undrained, args.rate)
        samples["undrained"] = snapshot(client)
    return {"samples": samples, "main": main, "undrained": undrained, "drainer": drainer,
            "distinct_items": len(items)}


def summarize(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    main, s, cfg = m["main"], m["samples"], settings_used()
    e = main.events["accepted"] / max(main.scored, 1)
    b = per_entry(s)
    complete = all(v is not None for v in b.values())
    return {
        "config": {"registry": str(args.registry), "bundle": args.bundle,
                   "requests": args.requests, "rate": args.rate, "candidates": args.candidates,
                   "shown": args.shown, "users": args.users,
                   "download_every": args.download_every, "drain_every_s": args.drain_every_s,
                   "warmup": args.warmup, "undrained_requests": args.undrained,
                   "distinct_items": m["distinct_items"], "features": str(args.features or ""),
                   "settings": cfg, "redis_server": redis_binaries()[0]},
        "traffic": {"scored": main.scored, "errors": main.errors, "first_error": main.first_error,
                    "events": main.events,
                    "events_per_request": e, "seconds": main.seconds,
                    "achieved_rate": main.scored / main.seconds if main.seconds else 0.0,
                    "max_late_s": main.max_late_s, "drainer_passes": m["drainer"].passes,
                    "drained_entries": m["drainer"].moved},
        "samples": s,
        "per_request": {**per_request(s["steady"], s["before"], max(main.scored, 1)),
                        "slope": slope(main.memory)},
        "per_request_undrained": per_request(s["undrained"], s["drained"],
                                             max(m["undrained"].scored, 1)),
        "per_entry": b,
        "model": {"formula": FORMULA, "lag_allowance_s": LAG_ALLOWANCE_S,
                  "users_per_day": "86400*r/5", "gib": GIB},
        "capacity": capacity(b, e, cfg["attribution_window_s"], cfg["event_clock_skew_s"],
                             cfg["counts_retention_days"]) if complete else [],
        "previous_design": previous_capacity(e, cfg["attribution_window_s"]),
    }


# ---- output -------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(r: dict[str, Any]) -> str:
    t, pr, b = r["traffic"], r["per_request"], r["per_entry"]
    cfg = r["config"]["settings"]
    lines = [f"requests {t['scored']:,} ({t['errors']} errors) at {t['achieved_rate']:.0f}/s "
             f"(asked {r['config']['rate']:.0f}, at most {t['max_late_s']:.2f} s late), "
             f"{t['events_per_request']:.2f} events each, "
             f"{r['config']['users']:,} users; drainer {t['drainer_passes']} passes",
             "",
             f"steady state, drainer running: {fmt(pr['used_memory'])} B per scored request "
             f"(used_memory delta / N); slope {fmt(pr['slope'])} B/request",
             f"  {'family':<12}{'B/request':>10}"]
    lines += [f"  {k:<12}{fmt(v, 1):>10}" for k, v in pr["families"].items()]
    lines += [f"  {'clients':<12}{fmt(pr['clients'], 1):>10}  (connection buffers: not per "
              "request)",
              f"  {'not in keys':<12}{fmt(pr['not_in_keys'], 1):>10}",
              f"drainer stopped: {fmt(r['per_request_undrained']['used_memory'])} B per "
              "scored request", "",
              "bytes per entry: " + ", ".join(f"{k} {fmt(v)}" for k, v in b.items())]
    if r["config"]["users"] <= LISTPACK_MAX:
        lines.append(f"  (only {r['config']['users']} users: listpack hashes, smaller per user "
                     "than production's hashtables)")
    lines += ["",
              "capacity: " + r["model"]["formula"],
              f"  (e = {t['events_per_request']:.2f}, "
              f"T_attr {cfg['attribution_window_s'] / 3600:g} h, "
              f"{cfg['counts_retention_days']}-day retention, "
              f"L = {LAG_ALLOWANCE_S} s, users/day = requests/day / 5; req/s sustained)",
              f"  {'T_dedup':>8}{'D_u':>5}{'B/request':>11}{'KB per req/s':>14}{'1 GiB':>10}"
              f"{'16 GiB':>10}{'64 GiB':>10}"]
    for row in r["capacity"]:
        k = sum(row["bytes_per_rps"].values())
        lines.append(f"  {row['dedup_window_s'] // 3600:>7}h{row['user_days']:>5}"
                     f"{fmt(k / DAY_S, 1):>11}{fmt(k / 1024):>14}"
                     + "".join(f"{fmt(row['rps'][g]):>10}" for g in (1, 16, 64)))
    prev = r["previous_design"]
    lines.append(f"  previous design ({prev['source']}: ~{prev['request_bytes']} B/request + "
                 f"~{prev['event_bytes']} B/event for T_attr): "
                 f"{fmt(prev['bytes_per_rps'] / 1024)} KB per req/s, "
                 + ", ".join(f"{g} GiB {fmt(prev['rps'][g], 1)}" for g in (1, 16, 64)))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_state",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=Path("demo/registry"))
    p.add_argument("--bundle", help="a DeepFM bundle (default: the newest deepfm-*)")
    p.add_argument("--features", type=Path, help="synth dir loaded into the feature store "
                                                 "(default: none; unknown ids score as OOV)")
    p.add_argument("--requests", type=int, help="scored requests measured (default 20000)")
    p.add_argument("--rate", type=float, help="requests/s, open loop (default 200)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--shown", type=int, default=10, help="top_k: the items of an impression")
    p.add_argument("--users", type=int, help="distinct users (default: requests / 5)")
    p.add_argument("--download-every", type=int, default=10)
    p.add_argument("--drain-every-s", type=float, default=1.0)
    p.add_argument("--warmup", type=int, help="requests before the first sample (300)")
    p.add_argument("--undrained", type=int, help="requests with the drainer stopped "
                                                 "(default: max(200, N/10))")
    p.add_argument("--quick", action="store_true", help="a smoke run: 600 requests at 100/s")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="directory of bench_state.json")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else {"requests": 20_000, "rate": 200.0, "warmup": 300}
    args.requests = args.requests or sizes["requests"]
    args.rate = args.rate or sizes["rate"]
    args.warmup = args.warmup if args.warmup is not None else sizes["warmup"]
    args.undrained = args.undrained or sizes.get("undrained", max(200, args.requests // 10))
    args.users = args.users or max(1, args.requests // 5)
    args.bundle = args.bundle or newest_bundle(args.registry)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-state-"))
    try:
        result = summarize(args, measure(args, work))
    except BaseException:
        print(f"kept {work} (redis.log, scorer.log)", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(render(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_state.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
