"""Per experiment, arm and day counts in Redis, and the report built from them.

Key layout (`P` = "ctrserve:", E experiment, D day "YYYY-MM-DD" (UTC, of the scored request:
the server's clock, or its own `ts` under `CTRSERVE_CLOCK=client`, see attribution.py), A arm):

    P ab:E:D:A:x     hash user id -> impressions x_u   (a field per user scored that day)
    P ab:E:D:A:y     hash user id -> downloads y_u     (users with a download)
    P ab:E:D:A:sums  hash impressions, downloads, sum_x2, sum_y2, sum_xy
    P ab:E:days      set of the days with counts
    P exp:E          JSON {"control", "weights"}: the config the scorer last served

Why hashes and not a set or a HyperLogLog: the `x` hash gives the exact number of distinct users
(HLEN) and, with `y`, the per-user sums that the delta method needs; an HLL gives only an
approximate count, a set only the count. The user enters `x` with 0 impressions at their first
scored request of the day (HSETNX), so a user counts once per arm and day. The `sums` hash is
kept by the event script in the same atomic step as x and y (x_u: a -> a + n adds
(a + n)² - a² to Σx² and n·y_u to Σxy; y_u: b -> b + 1 adds 2b + 1 to Σy² and x_u to Σxy), so a
day's ArmStats is one HGETALL and one HLEN. Totals over days sum each user's days from the hashes
(`ArmStats.from_user_arrays`): exact, the user as the unit. Holdout users are not counted.
Counts keep no TTL: they are the experiment's record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from service.experiments.config import ExperimentSet
from service.experiments.stats import ArmStats, report

PREFIX = "ctrserve:"
SUMS = ("impressions", "downloads", "sum_x2", "sum_y2", "sum_xy")


def arm_key(experiment: str, day: str, arm: str, part: str) -> str:
    return f"{PREFIX}ab:{experiment}:{day}:{arm}:{part}"


def days_key(experiment: str) -> str:
    return f"{PREFIX}ab:{experiment}:days"


def config_key(experiment: str) -> str:
    return f"{PREFIX}exp:{experiment}"


def experiment_configs(experiments: ExperimentSet) -> dict[str, dict[str, Any]]:
    """{name: {"control", "weights"}} of every experiment of a set."""
    return {e.name: {"control": e.control_arm().name,
                     "weights": {a.name: a.weight for a in e.arms}}
            for e in experiments.config.experiments}


async def save_configs(client: aioredis.Redis, experiments: ExperimentSet) -> None:
    """Record arms and weights so that `ctrserve report` can run without the scorer."""
    configs = experiment_configs(experiments)
    await client.mset({config_key(n): json.dumps(c) for n, c in configs.items()})


def load_config(client: redis.Redis, experiment: str) -> dict[str, Any] | None:
    raw = client.get(config_key(experiment))
    return json.loads(raw) if raw else None


def read_counts(client: redis.Redis, experiment: str, arms: list[str]
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """{day: {arm: {"sums": {...}, "x": {user: n}, "y": {user: n}}}}, one pipeline."""
    days = sorted(d.decode() for d in client.smembers(days_key(experiment)))
    pipe = client.pipeline(transaction=False)
    for day in days:
        for arm in arms:
            for part in ("sums", "x", "y"):
                pipe.hgetall(arm_key(experiment, day, arm, part))
    replies = iter(pipe.execute())
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for day in days:
        out[day] = {}
        for arm in arms:
            out[day][arm] = {part: {k.decode(): int(v) for k, v in next(replies).items()}
                             for part in ("sums", "x", "y")}
    return out


def day_stats(part: Mapping[str, Mapping[str, int]]) -> ArmStats:
    """One arm-day from its incrementally kept sums and its user count."""
    sums = part["sums"]
    return ArmStats(len(part["x"]), *(sums.get(k, 0) for k in SUMS))


def total_stats(parts: list[Mapping[str, Mapping[str, int]]]) -> ArmStats:
    """Over days, exact: each user's impressions and downloads summed over the days."""
    x: dict[str, int] = {}
    y: dict[str, int] = {}
    for part in parts:
        for user, n in part["x"].items():
            x[user] = x.get(user, 0) + n
        for user, n in part["y"].items():
            y[user] = y.get(user, 0) + n
            x.setdefault(user, 0)
    users = list(x)
    return ArmStats.from_user_arrays([x[u] for u in users], [y.get(u, 0) for u in users])


def build_report(client: redis.Redis, experiment: str, control: str,
                 weights: Mapping[str, float]) -> dict[str, Any]:
    """{"experiment", "control", "weights", "days": {day: report}, "total": report}."""
    arms = [control, *(a for a in weights if a != control)]
    counts = read_counts(client, experiment, arms)
    days = {day: report({a: day_stats(c[a]) for a in arms}, control, weights)
            for day, c in counts.items()}
    total = report({a: total_stats([c[a] for c in counts.values()]) for a in arms}, control,
                   weights)
    return {"experiment": experiment, "control": control, "weights": dict(weights),
            "days": days, "total": total}


def format_full_report(rep: Mapping[str, Any]) -> str:
    """Every day's table and the total's, as text."""
    from service.experiments.stats import format_report

    name = rep["experiment"]
    parts = [format_report(r, title=f"{name} {day}") for day, r in rep["days"].items()]
    parts.append(format_report(rep["total"], title=f"{name} total ({len(rep['days'])} days, "
                                                   "each user once, over all days)"))
    return "\n\n".join(parts)
