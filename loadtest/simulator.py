"""The traffic simulator: users of the synthetic world use a running scorer as a real app would.

Per simulated day, `requests_per_day` requests arrive in time order. Each names a user drawn
the world's way (activity-weighted, so a few users are far more active than most), an hour of
the world's daily curve and the day's weekday, and 50 to 100 popularity-weighted candidate apps.
The scorer ranks them (`top_k` = the slots shown); the user sees the top k in the scorer's
order and downloads each shown app with the world's hidden probability at that position,
hour and weekday. The client then reports what happened the way a real client does: one
impression event per request (the shown items with their 1-based positions) and one download
event per download, buffered and posted in batches to `POST /v1/events`, with a share of events
delivered twice (the same event ids, in a later batch), as a retrying client would.

Every score request carries its time on the simulated clock (`ts`, epoch seconds). A scorer
started with `CTRSERVE_CLOCK=client` counts each request, and the events that follow it, in
that simulated day, so its per-day report shows a simulated week day by day; with the default
server clock `ts` is only recorded and the whole run lands in the server's today.

The summary is the client's own view, per arm and day and in total: requests, impressions
(items shown), downloads, users, and the downloads expected from the true probabilities of
what each arm showed (the true CTR of the arm's rankings), beside the expectation of showing
the candidates unranked and of an oracle that ranks by the truth. Comparing it with the
server's counts checks the counting (day by day under the client clock); comparing arms'
expected downloads checks the models.

Bounded in requests (days x requests_per_day) and wall time (`max_seconds`); loopback URLs
only. Draws depend only on the seed, not on reply order, so a rerun against the same arms
shows the same users the same candidates and draws the same downloads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from ctrserve.common.errors import UserError
from ctrserve.loadtest.synth_logs import load_world, read_world_meta
from ctrserve.loadtest.world import SyntheticWorld

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
ARM_COUNTS = ("requests", "impressions", "downloads", "expected_downloads",
              "random_expected_downloads", "oracle_expected_downloads")  # fmt: skip


@dataclass(frozen=True)
class SimConfig:
    """What a simulation does (`ctrserve simulate` has flags for the common fields)."""

    url: str = "http://127.0.0.1:8000"
    days: int = 1
    requests_per_day: int = 1000
    start_day: dt.date | None = None  # default: the day after the world's logs end
    candidates: tuple[int, int] = (50, 100)  # per request, uniform in [min, max]
    top_k: int = 10  # slots shown
    concurrency: int = 8  # score requests in flight
    seed: int = 2026
    duplicate_rate: float = 0.02  # share of events delivered a second time
    events: bool = True  # report impressions and downloads to /v1/events
    event_batch: int = 100  # events per POST (a request's events never split)
    experiment: str | None = None  # default: the scorer's default experiment
    score_slot: int | None = 1  # slot every candidate is scored at; None: request order
    timeout_s: float = 30.0  # per HTTP call
    retries: int = 5  # per HTTP call, on 503 (after Retry-After) and connection errors
    max_seconds: float | None = None  # wall-clock bound: no new requests after it
    run_id: str | None = None  # prefix of request and event ids; default: random
    progress: bool = False

    def __post_init__(self) -> None:
        checks = {
            "days": self.days >= 1,
            "requests_per_day": self.requests_per_day >= 1,
            "top_k": self.top_k >= 1,
            "concurrency": self.concurrency >= 1,
            "event_batch": self.event_batch >= 1,
            "duplicate_rate": 0.0 <= self.duplicate_rate <= 1.0,
            "candidates": 1 <= self.candidates[0] <= self.candidates[1],
            "timeout_s": self.timeout_s > 0,
            "retries": self.retries >= 0,
            "max_seconds": self.max_seconds is None or self.max_seconds > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        if self.top_k > self.candidates[0]:
            raise ValueError(f"top_k ({self.top_k}) exceeds the fewest candidates per request "
                             f"({self.candidates[0]})")
        check_loopback(self.url)


def check_loopback(url: str) -> None:
    """Refuse anything but an http(s) URL on this machine's loopback interface."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        raise ValueError(f"url: the simulator only drives a scorer on loopback "
                         f"(http://127.0.0.1:PORT), got {url!r}")


@dataclass
class DayPlan:
    """One simulated day's requests, drawn up front so replies' order does not matter."""

    day: dt.date
    users: np.ndarray  # (n,)
    hour: np.ndarray  # (n,)
    weekday: np.ndarray  # (n,)
    ts: np.ndarray  # (n,) epoch seconds of the request on the simulated clock
    apps: list[np.ndarray]  # candidates per request, in the order sent
    uniforms: np.ndarray  # (n, top_k): a download happens where uniform < true probability
    duplicate: np.ndarray  # (n, 1 + top_k): resend the impression / the download at slot j


def plan_day(world: SyntheticWorld, cfg: SimConfig, day: dt.date, index: int) -> DayPlan:
    rng = np.random.default_rng([cfg.seed, 2, index])
    n = cfg.requests_per_day
    lo, hi = (min(c, world.config.n_apps) for c in cfg.candidates)
    req = world.sample_requests(rng, n, day, candidates=hi)
    counts = rng.integers(lo, hi + 1, n)
    midnight = dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()
    return DayPlan(
        day=day, users=req.users, hour=req.hour, weekday=req.weekday,
        ts=midnight + req.hour * 3600.0 + req.second,
        apps=[req.apps[r, : counts[r]] for r in range(n)],
        uniforms=rng.random((n, cfg.top_k)),
        duplicate=rng.random((n, 1 + cfg.top_k)) < cfg.duplicate_rate,
    )


@dataclass
class ArmDay:
    """The client's counts for one arm on one day."""

    requests: int = 0
    impressions: int = 0
    downloads: int = 0
    expected_downloads: float = 0.0
    random_expected_downloads: float = 0.0
    oracle_expected_downloads: float = 0.0
    users: set[str] = field(default_factory=set)
    model_versions: set[str] = field(default_factory=set)

    def add(self, other: ArmDay) -> None:
        for name in ARM_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.users |= other.users
        self.model_versions |= other.model_versions

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in ARM_COUNTS}
        for name in ARM_COUNTS[3:]:
            out[name] = round(out[name], 3)
        out["users"] = len(self.users)
        out["ctr"] = _ratio(self.downloads, self.impressions)
        out["true_ctr"] = _ratio(self.expected_downloads, self.impressions)
        out["random_ctr"] = _ratio(self.random_expected_downloads, self.impressions)
        out["oracle_ctr"] = _ratio(self.oracle_expected_downloads, self.impressions)
        out["cvr"] = _ratio(self.downloads, len(self.users))
        out["true_cvr"] = _ratio(self.expected_downloads, len(self.users))
        out["model_versions"] = sorted(self.model_versions)
        return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


class EventSender:
    """The client's event buffer: batches of whole requests' events, posted in order.

    One sender task posts the batches one after another, so an impression always reaches the
    scorer before its downloads and an original before its re-delivery: a re-delivery rides at
    the head of the batch after its original's.
    """

    def __init__(self, client: httpx.AsyncClient, cfg: SimConfig):
        self.client, self.cfg = client, cfg
        self.buffer: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # re-deliveries of events in the buffer
        self.ready: list[dict[str, Any]] = []  # re-deliveries of events already queued
        self.queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.missing = False  # /v1/events answered 404
        self.stats: Counter[str] = Counter()
        self.by_type: dict[str, Counter[str]] = defaultdict(Counter)
        self.reasons: Counter[str] = Counter()
        self.post_errors: Counter[str] = Counter()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def add(self, events: list[dict[str, Any]], resend: list[dict[str, Any]]) -> None:
        """One request's events, and those of them to deliver a second time later."""
        if self.missing:
            return
        self.buffer.extend(events)
        self.pending.extend(resend)
        self.stats["sent"] += len(events)
        if len(self.buffer) >= self.cfg.event_batch:
            self._flush()

    def _flush(self) -> None:
        batch = self.ready + self.buffer
        self.stats["resent"] += len(self.ready)
        self.buffer, self.ready, self.pending = [], self.pending, []
        if batch:
            self.queue.put_nowait(batch)

    async def close(self) -> None:
        """Flush what is buffered (and a last batch of re-deliveries), wait for all posts."""
        self._flush()
        self._flush()
        self.queue.put_nowait(None)
        if self.task is not None:
            await self.task

    async def _run(self) -> None:
        while (batch := await self.queue.get()) is not None:
            if not self.missing:
                await self._post(batch)

    async def _post(self, batch: list[dict[str, Any]]) -> None:
        reply = await _call(self.client, "POST", "/v1/events", self.cfg, json={"events": batch})
        self.stats["posts"] += 1
        if isinstance(reply, str):
            self.post_errors[reply] += 1
            self.stats["lost"] += len(batch)
            return
        if reply.status_code == 404:
            self.missing = True
            self.stats["lost"] += len(batch)
            return
        if reply.status_code >= 300:
            self.post_errors[f"HTTP {reply.status_code}: {reply.text[:200]}"] += 1
            self.stats["lost"] += len(batch)
            return
        kinds = {e["event_id"]: e["type"] for e in batch}
        for status, event_id, reason in event_statuses(reply.json(), batch):
            self.stats[status] += 1
            self.by_type[kinds.get(event_id, "unknown")][status] += 1
            if reason:
                self.reasons[reason] += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoint": "missing (404)" if self.missing else "ok"}
        keys = ("posts", "sent", "resent", "accepted", "duplicate", "rejected", "lost")
        out.update({k: self.stats[k] for k in keys})
        out["by_type"] = {t: dict(c) for t, c in sorted(self.by_type.items())}
        out["rejected_reasons"] = dict(self.reasons.most_common(10))
        out["post_errors"] = dict(self.post_errors.most_common(10))
        return out


def event_statuses(reply: Any, batch: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(status, event_id, reason) per event of a /v1/events reply, in the batch's order.

    Reads a list of per-event objects under `results`, `events` or `statuses` (or the reply
    itself as a list), each with `status` and optionally `event_id` and `reason`.
    """
    items = reply
    if isinstance(reply, dict):
        items = next((reply[k] for k in ("results", "events", "statuses")
                      if isinstance(reply.get(k), list)), [])
    out = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        item = item if isinstance(item, dict) else {"status": str(item)}
        event_id = item.get("event_id") or (batch[i]["event_id"] if i < len(batch) else "")
        reason = item.get("reason") or item.get("error") or item.get("detail") or ""
        out.append((str(item.get("status", "unknown")), event_id, str(reason)))
    return out


async def _call(client: httpx.AsyncClient, method: str, path: str, cfg: SimConfig,
                **kwargs: Any) -> httpx.Response | str:
    """One HTTP call, retried on 503 (honouring Retry-After) and on transport errors.

    Returns the response, or a one-line description of the failure.
    """
    failure = ""
    for attempt in range(cfg.retries + 1):
        try:
            reply = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            failure = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
            continue
        if reply.status_code != 503 or attempt == cfg.retries:
            return reply
        failure = "HTTP 503"
        await asyncio.sleep(min(float(reply.headers.get("Retry-After", 1)), 5.0))
    return failure


class Simulation:
    def __init__(self, world: SyntheticWorld, cfg: SimConfig, start_day: dt.date):
        self.world, self.cfg, self.start_day = world, cfg, start_day
        self.run_id = cfg.run_id or uuid.uuid4().hex[:8]
        self.counts: dict[tuple[str, str], ArmDay] = defaultdict(ArmDay)
        self.failures: Counter[str] = Counter()
        self.answered = 0
        self.sent = 0
        self.stopped_early = False
        self.experiment: str | None = None
        self.weights: dict[str, float] = {}

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        deadline = None if cfg.max_seconds is None else time.monotonic() + cfg.max_seconds
        limits = httpx.Limits(max_connections=cfg.concurrency + 2)
        async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s,
                                     limits=limits, trust_env=False) as client:
            await self._read_weights(client)
            events = EventSender(client, cfg)
            events.start()
            progress = _progress(cfg)
            try:
                for index in range(cfg.days):
                    day = self.start_day + dt.timedelta(days=index)
                    plan = plan_day(self.world, cfg, day, index)
                    await self._run_day(client, events, plan, index, deadline, progress)
                    if self.stopped_early:
                        break
            finally:
                await events.close()
                if progress is not None:
                    progress.close()
        return self._summary(events, time.perf_counter() - started)

    async def _read_weights(self, client: httpx.AsyncClient) -> None:
        """The configured arm weights of the experiment, for the summary (best effort)."""
        reply = await _call(client, "GET", "/v1/experiments", self.cfg)
        if isinstance(reply, str) or reply.status_code != 200:
            return
        data = reply.json()
        name = self.cfg.experiment or data.get("default")
        for exp in data.get("experiments", []):
            if exp.get("name") == name:
                self.experiment = name
                self.weights = {a["name"]: a["weight"] for a in exp.get("arms", [])}

    async def _run_day(self, client: httpx.AsyncClient, events: EventSender, plan: DayPlan,
                       index: int, deadline: float | None, progress: Any) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for r in range(len(plan.users)):
            queue.put_nowait(r)

        async def worker() -> None:
            while not queue.empty():
                r = queue.get_nowait()
                if deadline is not None and time.monotonic() > deadline:
                    self.stopped_early = True
                    return
                await self._one(client, events, plan, index, r)
                if progress is not None:
                    progress.update(1)

        await asyncio.gather(*(worker() for _ in range(self.cfg.concurrency)))

    async def _one(self, client: httpx.AsyncClient, events: EventSender, plan: DayPlan,
                   index: int, r: int) -> None:
        cfg, world = self.cfg, self.world
        user, apps = int(plan.users[r]), plan.apps[r]
        hour, weekday = int(plan.hour[r]), int(plan.weekday[r])
        user_id = str(world.user_ids[user])
        request_id = f"sim-{self.run_id}-d{index}-{r:06d}"
        extra = {} if cfg.score_slot is None else {"features": {"slot": cfg.score_slot}}
        body: dict[str, Any] = {
            "request_id": request_id, "user_id": user_id,
            "context": {"hour": hour, "weekday": weekday},
            "candidates": [{"item_id": str(world.app_ids[a]), **extra} for a in apps],
            "top_k": cfg.top_k, "ts": float(plan.ts[r]),
        }
        if cfg.experiment:
            body["experiment"] = cfg.experiment
        self.sent += 1
        reply = await _call(client, "POST", "/v1/score", cfg, json=body)
        if isinstance(reply, str) or reply.status_code != 200:
            why = reply if isinstance(reply, str) else f"HTTP {reply.status_code}"
            self.failures[why] += 1
            return
        data = reply.json()
        self.answered += 1
        shown = _shown_apps(data, apps, world)
        slots = np.arange(1, len(shown) + 1)
        truth = world.click_probability(user, shown, hour, weekday, slots)
        downloaded = plan.uniforms[r, : len(shown)] < truth
        arm = "holdout" if data.get("holdout") else data["arm"]
        counts = self.counts[(plan.day.isoformat(), arm)]
        counts.requests += 1
        counts.impressions += len(shown)
        counts.downloads += int(downloaded.sum())
        counts.expected_downloads += float(truth.sum())
        counts.random_expected_downloads += float(
            world.click_probability(user, apps[: len(shown)], hour, weekday, slots).sum())
        at_top = world.click_probability(user, apps, hour, weekday, 1)
        oracle = apps[np.argsort(-at_top, kind="stable")[: len(shown)]]
        counts.oracle_expected_downloads += float(
            world.click_probability(user, oracle, hour, weekday, slots).sum())
        counts.users.add(user_id)
        counts.model_versions.add(data.get("model_version", ""))
        if cfg.events:
            self._report(events, plan, r, data, user_id, shown, downloaded)

    def _report(self, events: EventSender, plan: DayPlan, r: int, data: dict[str, Any],
                user_id: str, shown: np.ndarray, downloaded: np.ndarray) -> None:
        # events are timed after the request by the clock the scorer dated it with (its `ts`)
        request_id, ts = data["request_id"], float(data.get("ts", plan.ts[r]))
        proof = {"attribution": data["attribution"]}
        items = [str(a) for a in self.world.app_ids[shown]]
        batch = [{"event_id": f"{request_id}-imp", "type": "impression", **proof,
                  "request_id": request_id, "user_id": user_id,
                  "items": [{"item_id": i, "position": p} for p, i in enumerate(items, 1)],
                  "ts": ts + 1.0}]
        for j in np.flatnonzero(downloaded).tolist():
            batch.append({"event_id": f"{request_id}-dl{j + 1}", "type": "download", **proof,
                          "request_id": request_id, "user_id": user_id, "item_id": items[j],
                          "ts": ts + 10.0 + 5.0 * j})
        flags = [plan.duplicate[r, 0], *(plan.duplicate[r, 1 + j] for j in
                                         np.flatnonzero(downloaded).tolist())]
        events.add(batch, [e for e, again in zip(batch, flags, strict=True) if again])

    def _summary(self, events: EventSender, seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        totals: dict[str, ArmDay] = defaultdict(ArmDay)
        days: dict[str, dict[str, Any]] = defaultdict(dict)
        for (day, arm), counts in sorted(self.counts.items()):
            days[day][arm] = counts.summary()
            totals[arm].add(counts)
        arms = {arm: c.summary() for arm, c in sorted(totals.items())}
        answered = max(self.answered, 1)
        users = sum(a["users"] for a in arms.values()) or 1
        for name, a in arms.items():
            a["request_share"] = round(a["requests"] / answered, 4)
            a["user_share"] = round(a["users"] / users, 4)
            if name in self.weights:
                a["weight"] = self.weights[name]
        return {
            "url": cfg.url, "run_id": self.run_id, "experiment": self.experiment,
            "config": {k: (v.isoformat() if isinstance(v, dt.date) else v)
                       for k, v in asdict(cfg).items() if k not in ("url", "progress")},
            "start_day": self.start_day.isoformat(),
            "seconds": round(seconds, 2),
            "requests": {"sent": self.sent, "answered": self.answered,
                         "failed": sum(self.failures.values()), "failures": dict(self.failures),
                         "per_second": round(self.answered / seconds, 1) if seconds else None,
                         "stopped_early": self.stopped_early},
            "events": events.summary() if cfg.events else {"endpoint": "off"},
            "arms": arms,
            "days": dict(days),
        }


def _shown_apps(data: dict[str, Any], apps: np.ndarray, world: SyntheticWorld) -> np.ndarray:
    """The app indices the scorer ranked into the shown slots, in its order."""
    if data.get("positions") is not None:
        return apps[np.asarray(data["positions"], dtype=np.int64)]
    index = {str(world.app_ids[a]): int(a) for a in apps}
    return np.array([index[i] for i in data["item_ids"]], dtype=np.int64)


def _progress(cfg: SimConfig) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.days * cfg.requests_per_day, desc="simulated requests", unit="req",
                file=sys.stderr, disable=None)  # None: no bar where stderr is not a terminal


def default_start_day(world_dir: Path) -> dt.date:
    """The day after the world's impression logs end, so simulated traffic follows them."""
    meta = read_world_meta(world_dir)
    return dt.date.fromisoformat(meta["start_day"]) + dt.timedelta(days=int(meta["days"]))


def simulate(world_dir: Path | str, cfg: SimConfig,
             world: SyntheticWorld | None = None) -> dict[str, Any]:
    """Run the simulation against `cfg.url` with the world of `world_dir`; the summary."""
    world_dir = Path(world_dir)
    world = world or load_world(world_dir)
    if cfg.top_k > world.config.n_apps:
        raise UserError(f"top_k ({cfg.top_k}) exceeds the world's {world.config.n_apps} apps")
    start = cfg.start_day or default_start_day(world_dir)
    summary = asyncio.run(Simulation(world, cfg, start).run())
    summary["world"] = str(world_dir)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table per day and arm, then the totals and the event replies."""
    cols = ("requests", "impressions", "downloads", "users", "ctr", "true_ctr", "random_ctr",
            "oracle_ctr", "cvr")
    head = f"{'day':<10} {'arm':<10} " + " ".join(f"{c:>11}" for c in cols)
    lines = [head, "-" * len(head)]

    def row(day: str, arm: str, a: dict[str, Any]) -> str:
        cells = []
        for c in cols:
            v = a.get(c)
            cells.append(f"{'-' if v is None else v:>11}" if not isinstance(v, float)
                         else f"{v:>11.4f}")
        return f"{day:<10} {arm:<10} " + " ".join(cells)

    for day, arms in summary["days"].items():
        lines += [row(day, arm, a) for arm, a in arms.items()]
    lines.append("-" * len(head))
    lines += [row("total", arm, a) for arm, a in summary["arms"].items()]
    req, ev = summary["requests"], summary["events"]
    lines.append(f"requests: {req['answered']}/{req['sent']} answered, {req['failed']} failed "
                 f"{req['failures'] or ''}, {req['per_second']}/s in {summary['seconds']} s"
                 + (" (stopped at the time limit)" if req["stopped_early"] else ""))
    if ev.get("endpoint") == "ok":
        lines.append(f"events: {ev['sent']} sent + {ev['resent']} re-delivered in {ev['posts']} "
                     f"posts: {ev['accepted']} accepted, {ev['duplicate']} duplicate, "
                     f"{ev['rejected']} rejected {ev['rejected_reasons'] or ''}"
                     f"{', ' + str(ev['lost']) + ' lost' if ev['lost'] else ''}")
    else:
        lines.append(f"events: {ev.get('endpoint')}")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
