"""The charts' time axis on the experiment's own clock, and where a deployment goes on it.

The days are the report's: the UTC days the counts were dated by, which are the scorer's clock
(`clock=server`) or each request's own `ts` (`clock=client`, a simulated or backfilled week).
`DayAxis` gives each such day one unit of x and squeezes every run of missing days into
`GAP_WIDTH`, so a week of simulated days and one real request two weeks later stay readable
and no line can be drawn across the gap.

A deployment record carries only its wall-clock time (`when`). Its place on the axis:

- `clock=server`: the counts' days are that same clock, so the marker sits at `when` itself;
- `clock=client`: the wall clock says nothing about the clients' days. A deployment made by
  `ctrserve retrain` is placed by its retrain record (REGISTRY/.retrain/*.json): the model was
  trained on the logged days up to its key's day and serves from the next one, so the marker
  sits at the start of the day after its training data (`serving_days`). Any other record has
  no day on that clock and gets no marker (the history table says so) rather than a wrong one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

GAP_WIDTH = 0.6  # x units a run of missing days takes, however many days it holds
DAY_SECONDS = 86_400
MAX_TICKS = 14


@dataclass(frozen=True)
class Gap:
    """Missing days `first`..`last` (ISO), drawn over x in [x0, x1]."""

    x0: float
    x1: float
    first: str
    last: str
    days: int


@dataclass(frozen=True)
class DayAxis:
    """x of each report day's start (the day spans [x, x + 1)), and the gaps between them."""

    starts: dict[str, float]
    gaps: list[Gap]
    end: float

    @classmethod
    def of(cls, days: list[str]) -> DayAxis:
        """The axis of `days` (ISO dates, sorted)."""
        starts: dict[str, float] = {}
        gaps: list[Gap] = []
        x, previous = 0.0, None
        for day in days:
            current = date.fromisoformat(day)
            missing = (current - previous).days - 1 if previous else 0
            if missing > 0:
                first, last = previous + timedelta(days=1), current - timedelta(days=1)
                gaps.append(Gap(x, x + GAP_WIDTH, first.isoformat(), last.isoformat(), missing))
                x += GAP_WIDTH
            starts[day] = x
            x, previous = x + 1.0, current
        return cls(starts, gaps, x)

    def x(self, day: str, fraction: float = 0.0) -> float | None:
        """x of the moment `fraction` of the way through `day`: inside a gap, the gap's middle;
        outside the charted days, None."""
        if day in self.starts:
            return self.starts[day] + fraction
        gap = next((g for g in self.gaps if g.first <= day <= g.last), None)
        return None if gap is None else (gap.x0 + gap.x1) / 2

    def ticks(self) -> list[tuple[float, str]]:
        """(x, label) at the middle of the days, at most MAX_TICKS of them."""
        days = list(self.starts)
        step = -(-len(days) // MAX_TICKS)
        short = len(days) > 7
        return [(self.starts[d] + 0.5, d[5:] if short else d) for d in days[::step]]


@dataclass(frozen=True)
class Placement:
    """Where a deployment record sits on the axis (x None: not drawn) and why, in words."""

    x: float | None
    text: str


def serving_days(retrain_records: list[Mapping[str, Any]], experiment: str) -> dict[int, str]:
    """{deployment version: the first day it served} from `ctrserve retrain`'s records: the
    day after the last logged day it was trained on (the day in its key)."""
    out = {}
    for r in retrain_records:
        deployment = r.get("deployment")
        if r.get("experiment") != experiment or not isinstance(deployment, Mapping):
            continue
        try:
            trained_to = date.fromisoformat(str(r.get("key", "")).rsplit("--", 1)[-1])
            out[int(deployment["version"])] = (trained_to + timedelta(days=1)).isoformat()
        except (KeyError, TypeError, ValueError):
            continue  # a record of another shape: its deployment gets no marker
    return out


def place(record: Mapping[str, Any], axis: DayAxis, clock: str,
          serving: Mapping[int, str]) -> Placement:
    """Where `record` goes on `axis` (see the module's docstring)."""
    if clock == "server":
        when = _when(record)
        if when is None:
            return Placement(None, "not drawn: no readable time")
        day = when.date().isoformat()
        fraction = (when - datetime.combine(when.date(), datetime.min.time(), UTC))
        return _on(axis, day, fraction.total_seconds() / DAY_SECONDS, when.strftime("%H:%M"))
    day = serving.get(record.get("version")) if isinstance(record.get("version"), int) else None
    if day is None:
        return Placement(None, "not drawn: recorded on the wall clock only, while the counts "
                               "use the clients' clock")
    return _on(axis, day, 0.0, "first day served after its retrain")


def _on(axis: DayAxis, day: str, fraction: float, detail: str) -> Placement:
    x = axis.x(day, fraction)
    if x is None:
        return Placement(None, f"{day} ({detail}): outside the charted days")
    if day not in axis.starts:
        return Placement(x, f"{day} ({detail}), a day without data")
    return Placement(x, f"{day} ({detail})")


def _when(record: Mapping[str, Any]) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(record["when"]))
    except (KeyError, ValueError):
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
