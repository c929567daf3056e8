"""Per experiment, arm and day counts in Redis, and the report built from them.

Keys (keys.py; E experiment, A arm, D day "YYYY-MM-DD", UTC, of the scored request: the
server's clock, or its own `ts` under `CTRSERVE_CLOCK=client`, as the attribution token says):

    ctrserve:{E:A}:ab:D:x / :y      hash user -> impressions x_u / downloads y_u that day
    ctrserve:{E:A}:ab:D:sums        hash users, impressions, downloads, sum_x2, sum_y2, sum_xy
    ctrserve:{E:A}:ab:all:x / :y    hash user -> x_u / y_u over the whole experiment
    ctrserve:{E:A}:ab:all:sums      the same sums over the experiment, each user once
    ctrserve:{E:A}:ab:D:guard       hash requests, errors, items, probability, le_<bound>: the
                                    arm's guardrail sums that day (GuardrailSums)
    ctrserve:{E:A}:ab:days          set of the days with counts or guardrail sums
    ctrserve:exp:E                  JSON {"control", "weights", "guardrails"}: the config the
                                    scorer last served

The event script keeps every sums hash incrementally, in the same atomic step as x and y
(x_u: a -> a + n adds (a + n)² - a² to Σx² and n·y_u to Σxy; y_u: b -> b + 1 adds 2b + 1 to
Σy² and x_u to Σxy; a user new to the hash adds 1 to users), so a report is one HGETALL per arm
and day: exact user-level sums, the user as the unit, for each day and, through the `all`
hashes, for the whole experiment with each user once (what the delta method needs). A user
enters the counts with their first accepted event (users = users with a proven event, so ids
that are only scored count nowhere). Holdout users are not counted.

Memory is bounded by users, not by requests or user-days: a day's per-user x and y hashes
expire once that day's events can no longer arrive (the day's end + attribution window + a
day); its sums (a few fields) and the experiment's per-user totals expire
`counts_retention_days` (90 by default) after the day / after the arm's last event.

The guardrail sums (service/experiments/guardrails.py) come from the scorers, not the event
script: each scorer adds its requests up in memory per arm and day and adds them to the day's
`guard` hash every second (one pipeline), so a score request pays no Redis call for them; a
scorer that stops hard loses at most that last second of them. They expire with the day's sums.

The list metrics (service/experiments/list_metrics.py: personalization@L, coverage@L and
popularity@L per arm and day, and over the period) do not come from the counters: the drainer
recomputes them with DuckDB from the drained Parquet logs after each drain that moved rows of
the experiment (event_log.drain) and stores them whole in `ctrserve:exp:E:lists`
(`save_list_metrics`); the report shows what is there (`read_list_metrics`), else null.
"""

from __future__ import annotations

import asyncio
import bisect
import calendar
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from ctrserve.common.keys import (
    LOG_KINDS,
    LOGS_KEY,
    TOTAL,
    arm_key,
    config_key,
    days_key,
    lists_key,
    log_key,
)
from ctrserve.service.experiments import guardrails
from ctrserve.service.experiments.config import ExperimentSet
from ctrserve.service.experiments.guardrails import BUCKET_FIELDS, LATENCY_BUCKETS_S, GuardSums
from ctrserve.service.experiments.stats import ArmStats, report

log = logging.getLogger("ctrserve.counts")
SUMS = ("users", "impressions", "downloads", "sum_x2", "sum_y2", "sum_xy")
GUARD = "guard"  # the arm_key part of an arm-day's guardrail sums
DAY_S = 86_400
LISTS_META = "meta"  # the field of lists_key beside the days and TOTAL: L, catalogue, ...
LISTS_ABSENT = ("list metrics appear after the logs are drained (ctrserve drain-events), by a "
                "drainer with DuckDB (pip install 'ctrserve[analysis]')")
# replaces the hash whole in one step (one key: any node of a cluster runs it)
SAVE_LISTS = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIREAT', KEYS[1], ARGV[1])
"""


def experiment_configs(experiments: ExperimentSet) -> dict[str, dict[str, Any]]:
    """{name: {"control", "weights", "guardrails"}} of every experiment of a set."""
    return {e.name: {"control": e.control_arm().name,
                     "weights": {a.name: a.weight for a in e.arms},
                     "guardrails": guardrails.thresholds_of(e.guardrails.model_dump())}
            for e in experiments.config.experiments}


async def save_configs(client: aioredis.Redis, experiments: ExperimentSet) -> None:
    """Record arms and weights so that `ctrserve report` can run without the scorer, and the
    arms' log streams so that the drainer finds them."""
    pipe = client.pipeline(transaction=False)
    for name, config in experiment_configs(experiments).items():
        pipe.set(config_key(name), json.dumps(config))
        pipe.sadd(LOGS_KEY, *(log_key(name, arm, kind) for arm in config["weights"]
                              for kind in LOG_KINDS))
    await pipe.execute()


def load_config(client: redis.Redis, experiment: str) -> dict[str, Any] | None:
    raw = client.get(config_key(experiment))
    return json.loads(raw) if raw else None


def read_counts(client: redis.Redis, experiment: str, arms: list[str]
                ) -> dict[str, dict[str, dict[str, int]]]:
    """{day or TOTAL: {arm: sums}}, two pipelines: the days, then every sums hash."""
    counts, _ = read_counts_and_guards(client, experiment, arms)
    return counts


def read_counts_and_guards(client: redis.Redis, experiment: str, arms: list[str]
                           ) -> tuple[dict[str, dict[str, dict[str, int]]],
                                      dict[str, dict[str, GuardSums]]]:
    """({day or TOTAL: {arm: sums}}, {day: {arm: GuardSums}}), two pipelines: the days, then
    every sums and guard hash."""
    pipe = client.pipeline(transaction=False)
    for arm in arms:
        pipe.smembers(days_key(experiment, arm))
    days = sorted({d.decode() for member in pipe.execute() for d in member})
    pipe = client.pipeline(transaction=False)
    for day in [*days, TOTAL]:
        for arm in arms:
            pipe.hgetall(arm_key(experiment, day, arm, "sums"))
            if day != TOTAL:
                pipe.hgetall(arm_key(experiment, day, arm, GUARD))
    replies = iter(pipe.execute())
    counts: dict[str, dict[str, dict[str, int]]] = {}
    guards: dict[str, dict[str, GuardSums]] = {}
    for day in [*days, TOTAL]:
        for arm in arms:
            counts.setdefault(day, {})[arm] = {k.decode(): int(v)
                                               for k, v in next(replies).items()}
            if day != TOTAL:
                guards.setdefault(day, {})[arm] = GuardSums.from_hash(next(replies))
    return counts, guards


def arm_stats(sums: Mapping[str, int]) -> ArmStats:
    """One arm's user-level sums (a day's, or the experiment's with each user once)."""
    return ArmStats(*(sums.get(k, 0) for k in SUMS))


def expire_at(day: str, retention_s: float) -> int:
    """When a key of `day` expires: `retention_s` after the day's end, or after now when that
    is later (a simulated or backfilled day long past)."""
    try:
        day_end = calendar.timegm(time.strptime(day, "%Y-%m-%d")) + DAY_S
    except ValueError:
        day_end = 0
    return int(max(day_end, time.time()) + retention_s)


def save_list_metrics(client: redis.Redis, metrics: Mapping[str, Any], retention_days: int
                      ) -> None:
    """Replace the experiment's stored list metrics (list_metrics.list_metrics's dict) in one
    step: a field per day, TOTAL, and LISTS_META for the rest. They expire `retention_days`
    after their last day or after now, whichever is later: each recompute starts that again."""
    fields = {day: json.dumps(by_arm) for day, by_arm in metrics["days"].items()}
    fields[TOTAL] = json.dumps(metrics["total"])
    fields[LISTS_META] = json.dumps({k: v for k, v in metrics.items()
                                     if k not in ("days", "total")})
    when = expire_at(max(metrics["days"], default=""), retention_days * DAY_S)
    args = [a for pair in fields.items() for a in pair]
    client.eval(SAVE_LISTS, 1, lists_key(metrics["experiment"]), when, *args)


def read_list_metrics(client: redis.Redis, experiment: str) -> dict[str, Any] | None:
    """The stored list metrics, in the shape of list_metrics.list_metrics plus "computed"
    ({"at", "logs"}), the days in order; None before a drainer with DuckDB stored any."""
    stored = {k.decode(): json.loads(v) for k, v in client.hgetall(lists_key(experiment)).items()}
    if LISTS_META not in stored:
        return None
    meta, total = stored.pop(LISTS_META), stored.pop(TOTAL, {})
    return {**meta, "days": dict(sorted(stored.items())), "total": total}


def build_report(client: redis.Redis, experiment: str, control: str,
                 weights: Mapping[str, float], thresholds: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """{"experiment", "control", "weights", "days": {day: report}, "total": report,
    "guardrails": guardrails.section(...), "list_metrics": read_list_metrics(...)}.

    Days past the retention have expired and are left out (their day stays in the days set).
    "days" holds the days with counts; the guardrails' "days" also those with scored requests
    and no counted event yet (every request failed, say). `thresholds`: the experiment's
    guardrails block; by default the one of the config the scorer last served, else the
    defaults.
    """
    arms = [control, *(a for a in weights if a != control)]
    counts, guards = read_counts_and_guards(client, experiment, arms)
    total = counts.pop(TOTAL)
    days = {day: report({a: arm_stats(c[a]) for a in arms}, control, weights)
            for day, c in counts.items() if any(c.values())}
    if thresholds is None:
        thresholds = (load_config(client, experiment) or {}).get("guardrails")
    return {"experiment": experiment, "control": control, "weights": dict(weights),
            "days": days, "total": report({a: arm_stats(total[a]) for a in arms}, control,
                                          weights),
            "guardrails": guardrail_section(counts, guards, total, thresholds),
            "list_metrics": read_list_metrics(client, experiment)}


def guardrail_section(counts: Mapping[str, Mapping[str, Mapping[str, int]]],
                      guards: Mapping[str, Mapping[str, GuardSums]],
                      total: Mapping[str, Mapping[str, int]],
                      thresholds: Mapping[str, Any] | None) -> dict[str, Any]:
    """The report's guardrails from the days' counts and guard sums; the total's from every
    day's guard sums and the experiment's counts."""
    def period(sums: GuardSums, c: Mapping[str, int]) -> guardrails.ArmPeriod:
        return sums, c.get("impressions", 0), c.get("downloads", 0)

    days = {day: {arm: period(g, counts[day][arm]) for arm, g in by_arm.items()}
            for day, by_arm in guards.items()
            if any(g.requests for g in by_arm.values()) or any(counts[day].values())}
    arm_totals = {arm: period(sum((by_arm[arm] for by_arm in guards.values()), GuardSums()),
                              total[arm]) for arm in total}
    return guardrails.section(days, arm_totals, guardrails.thresholds_of(thresholds))


class GuardrailSums:
    """Per arm and day guardrail sums of one scorer, added to Redis every `interval_s`.

    `add` only updates memory; the first addition after a flush schedules the next one on the
    event loop, so an idle scorer writes nothing and a busy one one pipeline a second. A flush
    Redis refuses keeps its sums for the next one (arm-days: bounded)."""

    def __init__(self, client: aioredis.Redis, retention_days: int, interval_s: float = 1.0):
        self.client, self.interval_s = client, interval_s
        self.retention_s = retention_days * DAY_S
        self._pending: dict[tuple[str, str, str], list] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Future | None = None

    def add(self, experiment: str, arm: str, day: str, seconds: float, failed: bool,
            items: int, probability: float) -> None:
        sums = self._pending.get((experiment, arm, day))
        if sums is None:
            sums = self._pending[experiment, arm, day] = [0, 0, 0, 0.0,
                                                          [0] * len(BUCKET_FIELDS)]
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.interval_s,
                                                                    self._start_flush)
        sums[0] += 1
        sums[1] += failed
        sums[2] += items
        sums[3] += probability
        sums[4][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # `le`: bound inclusive

    def _start_flush(self) -> None:
        self._timer = None
        if self._writer is None:
            self._writer = asyncio.ensure_future(self.flush())

    async def close(self) -> None:
        """At shutdown: the last second's sums go to Redis too."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            await self._writer
        await self.flush()
        if self._timer is not None:  # Redis refused them: nothing more to do at shutdown
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        """Add the pending sums to Redis now."""
        batch, self._pending = self._pending, {}
        try:
            if batch:
                await self._write(batch)
        except redis.RedisError as exc:
            log.warning("guardrail sums not written (kept for the next flush): %s", exc)
            self._merge(batch)
        finally:
            self._writer = None
            if self._pending and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.interval_s,
                                                                    self._start_flush)

    async def _write(self, batch: dict[tuple[str, str, str], list]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for (experiment, arm, day), (requests, errors, items, probability, buckets) in \
                batch.items():
            key = arm_key(experiment, day, arm, GUARD)
            pipe.hincrby(key, "requests", requests)
            if errors:
                pipe.hincrby(key, "errors", errors)
            if items:
                pipe.hincrby(key, "items", items)
                pipe.hincrbyfloat(key, "probability", probability)
            for name, n in zip(BUCKET_FIELDS, buckets, strict=True):
                if n:
                    pipe.hincrby(key, name, n)
            pipe.expireat(key, expire_at(day, self.retention_s))
            pipe.sadd(days_key(experiment, arm), day)
        await pipe.execute()

    def _merge(self, batch: dict[tuple[str, str, str], list]) -> None:
        for key, old in batch.items():
            new = self._pending.setdefault(key, [0, 0, 0, 0.0, [0] * len(BUCKET_FIELDS)])
            for i in range(4):
                new[i] += old[i]
            new[4] = [a + b for a, b in zip(new[4], old[4], strict=True)]


def format_full_report(rep: Mapping[str, Any]) -> str:
    """Every day's table and the total's, the guardrails, and the list metrics when the report
    has the section (a line saying when they appear when it is null)."""
    from ctrserve.service.experiments.stats import format_report

    name = rep["experiment"]
    parts = [format_report(r, title=f"{name} {day}") for day, r in rep["days"].items()]
    parts.append(format_report(rep["total"], title=f"{name} total ({len(rep['days'])} days, "
                                                   "each user once, over all days)"))
    if rep.get("guardrails", {}).get("days"):
        parts.append("\n".join(guardrails.format_section(rep["guardrails"])))
    if "list_metrics" in rep:
        parts.append(format_stored_lists(rep["list_metrics"]))
    return "\n\n".join(parts)


def format_stored_lists(lists: Mapping[str, Any] | None) -> str:
    """The list metrics' table, with when and from which logs they were computed."""
    from ctrserve.service.experiments.list_metrics import format_list_metrics

    if lists is None:
        return f"List metrics: none yet; {LISTS_ABSENT}."
    text = format_list_metrics(lists)
    computed = lists.get("computed")
    if computed:
        text += (f"\n(computed {computed['at']} from the logs in {computed['logs']}, at the "
                 "last drain; ctrserve list-metrics --logs DIR recomputes them)")
    return text
