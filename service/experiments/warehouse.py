"""The A/B report from the Parquet logs, with SQL that runs in DuckDB here and in a warehouse.

The drained logs (event_log.py: `DIR/day=YYYY-MM-DD/{events,serve}-*.parquet`) become two
views, `event_log` and `serve_log`, in an embedded DuckDB; the SQL in `sql/` reads only those
two tables, so the same files run in a warehouse over the same tables. `sql/ab_sums.sql` gives
each arm's user-level sums per day and over the whole experiment (each user once), and
`report` feeds them to the statistics of the online report (stats.report), so the result has
the shape of counts.build_report and, on the same traffic, its counts: the event log holds the
accepted events only, and the SQL applies the rules the counters apply (its header lists them).

With a pre-period (`pre_days`), the total also carries CUPED (service/experiments/cuped.py):
`sql/cuped_sums.sql` joins each counted user's activity on the `pre_days` days before the
experiment's start (its first served day in the logs, or `start`) to their in-experiment sums.
The online counters keep per-user history for a few days only, so CUPED is here alone.

The one way the two can differ: an accepted event the drainer could not write (a dead letter,
`DIR/dead-letter/events-<E>-<A>.jsonl`) is counted online and missing here; `dead_letters`
counts them, and the report carries the count.

DuckDB is an optional dependency (`pip install 'ctrserve[analysis]'`); the scorer never
imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb

from ctrserve.common.keys import TOTAL
from ctrserve.service.event_log import SCHEMAS
from ctrserve.service.experiments.cuped import SUM_NAMES, CupedStats
from ctrserve.service.experiments.stats import ArmStats, report

SQL_DIR = Path(__file__).with_name("sql")
VIEWS = {"event_log": "events", "serve_log": "serve"}  # view name -> drained file kind
SUMS = ("users", "impressions", "downloads", "sum_x2", "sum_y2", "sum_xy")


def sql_text(name: str) -> str:
    """The text of `sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text()


def log_files(logs: Path, kind: str) -> list[Path]:
    """The drained Parquet files of one kind ("events" or "serve"), every day."""
    return sorted(logs.glob(f"day=*/{kind}-*.parquet"))


def open_logs(logs: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views `event_log` and `serve_log` over the files in `logs`.

    A kind without files is an empty table of its schema, so the SQL runs on any directory.
    """
    con = duckdb.connect()
    for view, kind in VIEWS.items():
        files = [str(p) for p in log_files(logs, kind)]
        if files:
            # the `day=` folders are not read as a partition column: the files carry `day`
            rel = con.read_parquet(files, hive_partitioning=False, union_by_name=True)
        else:
            rel = con.from_arrow(SCHEMAS[kind].empty_table())
        rel.create_view(view)
    return con


def query(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> list[dict[str, Any]]:
    """The rows of `sql/<name>.sql` run with `params`, as dicts."""
    cursor = con.execute(sql_text(name), params)
    columns = [c[0] for c in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def experiments(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The experiments that appear in either log."""
    rows = con.execute("SELECT experiment FROM serve_log UNION SELECT experiment FROM event_log "
                       "ORDER BY experiment").fetchall()
    return [r[0] for r in rows]


def arm_sums(con: duckdb.DuckDBPyConnection, experiment: str
             ) -> dict[str, dict[str, ArmStats]]:
    """{day or TOTAL: {arm: ArmStats}} of the counted events (sql/ab_sums.sql)."""
    out: dict[str, dict[str, ArmStats]] = {}
    for row in query(con, "ab_sums", experiment=experiment):
        # the SQL names the whole experiment 'all', as the counters do (keys.TOTAL)
        out.setdefault(row["day"], {})[row["arm"]] = ArmStats(*(int(row[k]) for k in SUMS))
    return out


def build_report(con: duckdb.DuckDBPyConnection, experiment: str, control: str,
                 weights: Mapping[str, float], pre_days: int | None = None,
                 start: str | None = None) -> dict[str, Any]:
    """{"experiment", "control", "weights", "days": {day: report}, "total": report}: what
    counts.build_report gives from Redis, from the logs. Arms outside `weights` are left out,
    as there; a day counts when one of the arms has events.

    With `pre_days` > 0, the total's uplifts also carry "cuped" (stats.report), fitted on the
    users counted from `start` (default: `first_day`) with their activity on the `pre_days`
    days before it, and the result gains "cuped": `cuped_window`'s days with the users per arm
    and how many of them have a pre-period."""
    arms = [control, *(a for a in weights if a != control)]
    sums = arm_sums(con, experiment)
    total = sums.pop(TOTAL, {})

    def period(by_arm: Mapping[str, ArmStats], **extra: Any) -> dict[str, Any]:
        return report({a: by_arm.get(a, ArmStats.empty()) for a in arms}, control, weights,
                      **extra)

    days = {day: period(by_arm) for day, by_arm in sorted(sums.items())
            if any(a in by_arm for a in arms)}
    out = {"experiment": experiment, "control": control, "weights": dict(weights),
           "days": days, "total": period(total)}
    if pre_days:
        window = cuped_window(con, experiment, pre_days, start)
        by_arm = cuped_sums(con, experiment, window["start"], window["pre_start"])
        out["total"] = period(total, cuped=by_arm)
        out["cuped"] = {**window, "arms": {
            a: {"users": by_arm.get(a, CupedStats.empty()).users,
                "users_with_pre_period": by_arm.get(a, CupedStats.empty()).has_pre}
            for a in arms}}
    return out


class PrePeriodError(ValueError):
    """The pre-period of CUPED cannot be set: a bad start day or length."""


def first_day(con: duckdb.DuckDBPyConnection, experiment: str) -> str | None:
    """The experiment's first served day: its first day in the serve log, else (older logs
    without serve entries) in the event log; None without rows."""
    for view in ("serve_log", "event_log"):
        day = con.execute(f"SELECT MIN(day) FROM {view} WHERE experiment = $experiment",
                          {"experiment": experiment}).fetchone()[0]
        if day is not None:
            return day
    return None


def cuped_window(con: duckdb.DuckDBPyConnection, experiment: str, pre_days: int,
                 start: str | None = None) -> dict[str, Any]:
    """{"start", "pre_start", "pre_end", "pre_days"}: the experiment's start (`start`, a
    YYYY-MM-DD day, else `first_day`) and its pre-period, the days [pre_start, pre_end]
    before it. `PrePeriodError` for a malformed `start`, a negative `pre_days` or no start."""
    if pre_days < 0:
        raise PrePeriodError(f"the pre-period must be 0 days or more, got {pre_days}")
    day = start if start is not None else first_day(con, experiment)
    if day is None:
        raise PrePeriodError(f"no rows of experiment {experiment!r}, so no start")
    try:
        first = date.fromisoformat(day)
    except ValueError:
        raise PrePeriodError(f"not a day YYYY-MM-DD: {day!r}") from None
    return {"start": first.isoformat(), "pre_start": (first - timedelta(pre_days)).isoformat(),
            "pre_end": (first - timedelta(1)).isoformat(), "pre_days": pre_days}


def cuped_sums(con: duckdb.DuckDBPyConnection, experiment: str, start: str, pre_start: str
               ) -> dict[str, CupedStats]:
    """{arm: CupedStats} of the users counted from `start`, with their activity on the days
    [pre_start, start) (sql/cuped_sums.sql)."""
    rows = query(con, "cuped_sums", experiment=experiment, start=start, pre_start=pre_start)
    return {row["arm"]: CupedStats(*(int(row[k]) for k in SUM_NAMES)) for row in rows}


def format_cuped_window(window: Mapping[str, Any]) -> str:
    """One line naming the experiment's start and its pre-period."""
    return (f"CUPED pre-period: {window['pre_start']} to {window['pre_end']} ({window['pre_days']} "
            f"day(s) before the start {window['start']}); users with a pre-period: " + ", ".join(
                f"{a} {v['users_with_pre_period']:,} of {v['users']:,}"
                for a, v in window["arms"].items()))


def dead_letters(logs: Path, experiment: str, arms: list[str]) -> dict[str, int]:
    """{"events", "serve"}: entries of the experiment's arms the drainer could not write."""
    counts = {}
    for kind in VIEWS.values():
        files = [logs / "dead-letter" / f"{kind}-{experiment}-{arm}.jsonl" for arm in arms]
        counts[kind] = sum(len(f.read_text().splitlines()) for f in files if f.is_file())
    return counts


def row_counts(con: duckdb.DuckDBPyConnection, experiment: str) -> dict[str, int]:
    """Rows of the experiment in each log (as drained: an entry written twice counts twice)."""
    return {kind: con.execute(f"SELECT COUNT(*) FROM {view} WHERE experiment = $experiment",
                              {"experiment": experiment}).fetchone()[0]
            for view, kind in VIEWS.items()}
