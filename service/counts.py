"""Per experiment, arm and day counts in Redis, and the report built from them.

Keys (keys.py; E experiment, A arm, D day "YYYY-MM-DD", UTC, of the scored request: the
server's clock, or its own `ts` under `CTRSERVE_CLOCK=client`, as the attribution token says):

    ctrserve:{E:A}:ab:D:x / :y      hash user -> impressions x_u / downloads y_u that day
    ctrserve:{E:A}:ab:D:sums        hash users, impressions, downloads, sum_x2, sum_y2, sum_xy
    ctrserve:{E:A}:ab:all:x / :y    hash user -> x_u / y_u over the whole experiment
    ctrserve:{E:A}:ab:all:sums      the same sums over the experiment, each user once
    ctrserve:{E:A}:ab:days          set of the days with counts
    ctrserve:exp:E                  JSON {"control", "weights"}: the config the scorer last served

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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from service.experiments.config import ExperimentSet
from service.experiments.stats import ArmStats, report
from service.keys import LOG_KINDS, LOGS_KEY, TOTAL, arm_key, config_key, days_key, log_key

SUMS = ("users", "impressions", "downloads", "sum_x2", "sum_y2", "sum_xy")


def experiment_configs(experiments: ExperimentSet) -> dict[str, dict[str, Any]]:
    """{name: {"control", "weights"}} of every experiment of a set."""
    return {e.name: {"control": e.control_arm().name,
                     "weights": {a.name: a.weight for a in e.arms}}
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
    pipe = client.pipeline(transaction=False)
    for arm in arms:
        pipe.smembers(days_key(experiment, arm))
    days = sorted({d.decode() for member in pipe.execute() for d in member})
    pipe = client.pipeline(transaction=False)
    for day in [*days, TOTAL]:
        for arm in arms:
            pipe.hgetall(arm_key(experiment, day, arm, "sums"))
    replies = iter(pipe.execute())
    return {day: {arm: {k.decode(): int(v) for k, v in next(replies).items()} for arm in arms}
            for day in [*days, TOTAL]}


def arm_stats(sums: Mapping[str, int]) -> ArmStats:
    """One arm's user-level sums (a day's, or the experiment's with each user once)."""
    return ArmStats(*(sums.get(k, 0) for k in SUMS))


def build_report(client: redis.Redis, experiment: str, control: str,
                 weights: Mapping[str, float]) -> dict[str, Any]:
    """{"experiment", "control", "weights", "days": {day: report}, "total": report}.

    Days past the retention have expired and are left out (their day stays in the days set).
    """
    arms = [control, *(a for a in weights if a != control)]
    counts = read_counts(client, experiment, arms)
    total = counts.pop(TOTAL)
    days = {day: report({a: arm_stats(c[a]) for a in arms}, control, weights)
            for day, c in counts.items() if any(c.values())}
    return {"experiment": experiment, "control": control, "weights": dict(weights),
            "days": days, "total": report({a: arm_stats(total[a]) for a in arms}, control,
                                          weights)}


def format_full_report(rep: Mapping[str, Any]) -> str:
    """Every day's table and the total's, as text."""
    from service.experiments.stats import format_report

    name = rep["experiment"]
    parts = [format_report(r, title=f"{name} {day}") for day, r in rep["days"].items()]
    parts.append(format_report(rep["total"], title=f"{name} total ({len(rep['days'])} days, "
                                                   "each user once, over all days)"))
    return "\n\n".join(parts)
