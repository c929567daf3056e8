"""List metrics of the recommended lists, per arm and day, from the serve and event logs.

The issue that asked for them (14) attributes them to the online evaluation of the DeepFM paper
(Guo et al.); what is computed here, in `sql/list_metrics.sql`, for the top-L lists T_u of the
N users of an arm and day:

- personalization@L = 1 − mean over pairs of distinct users u ≠ v of |T_u ∩ T_v| / L:
  0 when everyone gets the same list, 1 when no two lists share an item. Exact over all pairs,
  not sampled: the c_i users whose list holds item i share it in c_i(c_i − 1) ordered pairs, so
  the mean overlap is Σ_i c_i(c_i − 1) / (N(N − 1)·L). L is capped at the longest list of the
  arm and day (requests with top_k = 5 give L = 5 under the default 10); a shorter list's
  missing slots share nothing. Undefined (None) below two users.
- coverage@L = |∪_u T_u| / catalogue size: the share of the catalogue in anyone's top L. The
  catalogue is, by default, every item in any list served by the experiment over the logs'
  period (every arm, every position, holdout included); the serve log keeps only what was
  returned, so with top_k the candidates never returned are missing from it: give the real
  catalogue size (`--catalogue-size`) when it is known.
- popularity@L = mean over every slot of every T_u of the item's popularity, its share of the
  period's counted downloads (every arm, holdout excluded, as in the A/B report). Downloads
  rather than impressions: impressions are what the arms chose to show, downloads what users
  took. 1/catalogue is the value of a uniform choice. Undefined (None) without downloads.

A user's list for a day is the last one served to them that day (for the total: over the whole
period), first L items in the order returned: best first for requests with top_k (the
scorer sorts by score), request order otherwise, since the serve log keeps no scores. Holdout
users are left out, as they are from the counts.

`ctrserve list-metrics` and `ctrserve analyze` compute them on demand; the drainer
(event_log.drain) calls `refresh` after each drain that wrote rows of an experiment, which
stores them in Redis for the online report and the dashboard (counts.read_list_metrics).
DuckDB is imported only when they are computed, so the scorer can import this module to
format stored ones (`format_list_metrics`) without it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrserve.common.keys import TOTAL

if TYPE_CHECKING:
    import duckdb
    import redis

log = logging.getLogger("ctrserve.list_metrics")
DEFAULT_TOP = 10
FIELDS = ("users", "top", "mean_length", "personalization", "coverage", "popularity",
          "distinct_items")
POPULARITY_BASIS = "share of the period's counted downloads (every arm, holdout excluded)"
SERVED_CATALOGUE = "distinct items served by the experiment over the logs' period"


def list_metrics(con: duckdb.DuckDBPyConnection, experiment: str, top: int = DEFAULT_TOP,
                 catalogue_size: int | None = None, arms: Sequence[str] = ()
                 ) -> dict[str, Any]:
    """{"experiment", "top", "catalogue": {"size", "basis"}, "popularity_basis", "downloads",
    "days": {day: {arm: metrics}}, "total": {arm: metrics}}; metrics hold FIELDS, `top` being
    the L used (capped at the longest list). `arms` come first, in that order (the control
    first, as in the report), then the others by name."""
    from ctrserve.service.experiments.warehouse import query

    if top < 1:
        raise ValueError(f"top L must be at least 1, got {top}")
    if catalogue_size is not None and catalogue_size < 1:
        raise ValueError(f"the catalogue size must be at least 1, got {catalogue_size}")
    rows = query(con, "list_metrics", experiment=experiment, top=top,
                 catalogue_size=catalogue_size)
    _check_catalogue(rows, catalogue_size)
    rank = {a: i for i, a in enumerate(arms)}
    rows.sort(key=lambda r: (r["day"], rank.get(r["arm"], len(rank)), r["arm"]))
    days: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        days.setdefault(row["day"], {})[row["arm"]] = {k: _plain(row[k]) for k in FIELDS}
    return {"experiment": experiment, "top": top,
            "catalogue": {"size": int(rows[0]["catalogue"]) if rows else catalogue_size,
                          "basis": "given" if catalogue_size else SERVED_CATALOGUE},
            "popularity_basis": POPULARITY_BASIS,
            "downloads": int(rows[0]["downloads"]) if rows else 0,
            "days": {d: by_arm for d, by_arm in days.items() if d != TOTAL},
            "total": days.get(TOTAL, {})}


def refresh(client: redis.Redis, logs: Path, experiments: Iterable[str], retention_days: int
            ) -> dict[str, Any]:
    """Recompute the list metrics of `experiments` (L = DEFAULT_TOP, the served catalogue) from
    every drained file under `logs` and store each in Redis (counts.save_list_metrics), with
    `computed` = {"at", "logs"}; the drainer calls this after writing (event_log.drain).

    Returns {"experiments": those stored, "failed": {experiment: reason}, "seconds"}. Needs
    DuckDB: ModuleNotFoundError (name "duckdb") without it. Logs DuckDB cannot read (a file cut
    short by hand, say) leave the stored metrics as they were, with a warning."""
    import duckdb

    from ctrserve.service.counts import save_list_metrics
    from ctrserve.service.experiments.warehouse import open_logs

    start, names = time.perf_counter(), sorted(set(experiments))
    stored: list[str] = []
    failed: dict[str, str] = {}
    try:
        con = open_logs(logs)
    except duckdb.Error as exc:
        return _refreshed(start, logs, stored, dict.fromkeys(names, str(exc)))
    try:
        for experiment in names:
            try:
                metrics = list_metrics(con, experiment, arms=_arms(client, experiment))
            except duckdb.Error as exc:
                failed[experiment] = str(exc)
                continue
            metrics["computed"] = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                   "logs": str(logs)}
            save_list_metrics(client, metrics, retention_days)
            stored.append(experiment)
    finally:
        con.close()
    return _refreshed(start, logs, stored, failed)


def _refreshed(start: float, logs: Path, stored: list[str], failed: dict[str, str]
               ) -> dict[str, Any]:
    for experiment, reason in failed.items():
        log.warning("list metrics of %s not recomputed (the stored ones stay): DuckDB cannot "
                    "read the logs in %s: %s", experiment, logs, reason)
    return {"experiments": stored, "failed": failed,
            "seconds": round(time.perf_counter() - start, 3)}


def _arms(client: redis.Redis, experiment: str) -> list[str]:
    """The control first, then the other configured arms, as in the report (none: by name)."""
    from ctrserve.service.counts import load_config

    config = load_config(client, experiment)
    if not config:
        return []
    return [config["control"], *(a for a in config["weights"] if a != config["control"])]


def _check_catalogue(rows: list[dict[str, Any]], catalogue_size: int | None) -> None:
    most = max((r["distinct_items"] for r in rows), default=0)
    if catalogue_size is not None and most > catalogue_size:
        raise ValueError(f"the catalogue size {catalogue_size} is smaller than the {most} "
                         "distinct items in one arm's top lists")


def _plain(value: Any) -> Any:
    """DuckDB's integers and decimals as JSON-able numbers."""
    if value is None or isinstance(value, int | float):
        return value
    return float(value)


def format_list_metrics(metrics: Mapping[str, Any]) -> str:
    """One row per day and arm, then the whole period's, with the bases in the title."""
    size = metrics["catalogue"]["size"]
    lines = [f"{metrics['experiment']} list metrics: the first L = {metrics['top']} items of "
             "each user's last list (L capped at the lists' length)",
             f"catalogue: {size if size is not None else 'n/a'} items "
             f"({metrics['catalogue']['basis']}); popularity: {metrics['popularity_basis']}, "
             f"{metrics['downloads']:,} downloads"]
    header = ["day", "arm", "users", "L", "personalization@L", "coverage@L", "popularity@L"]
    rows = [header]
    periods = [*metrics["days"].items(), ("total", metrics["total"])]
    for day, by_arm in periods:
        rows += [[day, arm, f"{m['users']:,}", str(m["top"]), _num(m["personalization"], ".3f"),
                  _num(m["coverage"], ".1%"), _num(m["popularity"], ".3%")]
                 for arm, m in by_arm.items()]
    if len(rows) == 1:
        return "\n".join([*lines, "(no served lists outside the holdout)"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
              for r in rows]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
