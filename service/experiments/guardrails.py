"""Guardrails per arm and day: latency p99, error share and calibration against the thresholds
of the experiment's config (`guardrails:` in config.py).

Per arm and UTC day of the scored request (the day the counts use), holdout excluded:

- latency p99: the 99th percentile of the scorer's time for the arm's score requests, from the
  body read to the reply built (failed requests included: their wait is what clients saw),
  estimated from counts per bucket of LATENCY_BUCKETS_S by linear interpolation inside the
  bucket, as Prometheus' histogram_quantile estimates it from the same buckets of
  ctrserve_arm_request_duration_seconds; a threshold on a bucket bound is judged exactly.
- error share: score requests that failed with a 5xx after the arm was chosen (deadline 504,
  Redis or overload 503, a model error 500) over the arm's scored requests (failed and
  answered). 4xx and requests the client abandoned count in neither.
- calibration: the mean predicted probability of the returned items (Σ scores / items
  returned) over the observed download rate (downloads / impressions of the counts). 1 is
  calibrated, above 1 the model promises more downloads than happen. It assumes the returned
  items are the shown ones (the client shows what it asked for, `top_k`): a client that shows
  only part of a long returned list biases it, towards the list's mean where the shown items
  are its top. The day's downloads keep arriving for the attribution window, so today's value
  reads high until they are in.

A guardrail is judged (`breached` true or false) from MIN_REQUESTS requests (latency, error
share) or MIN_DOWNLOADS downloads (calibration) of the arm that day: below, `breached` is None,
as one slow request out of 20 is a 95th percentile, not a finding, and the observed rate of a
few downloads is noise.

Redis keeps the sums per arm and day (service/counts.py: `GuardrailSums`), so the report is one
HGETALL per arm and day, like the counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
                     2.5, 5.0)
BUCKET_FIELDS = (*(f"le_{b:g}" for b in LATENCY_BUCKETS_S), "le_inf")  # the last: +Inf
QUANTILE = 0.99
MIN_REQUESTS = 100  # per arm and day, to judge latency and error share
MIN_DOWNLOADS = 100  # per arm and day, to judge calibration
DEFAULTS: dict[str, Any] = {"latency_p99_ms": 250.0, "error_share": 0.01,
                            "calibration": [0.8, 1.25]}
NAMES = ("latency_p99_ms", "error_share", "calibration")
METHODS = {
    "latency_p99_ms": "99th percentile of the arm's score requests (body read to reply built, "
                      "failed ones included), interpolated in the buckets of "
                      "ctrserve_arm_request_duration_seconds as histogram_quantile does; "
                      "breached above the threshold",
    "error_share": "score requests failed with a 5xx after the arm was chosen (deadline, "
                   "Redis, overload, model) over the arm's scored requests; breached above the "
                   "threshold",
    "calibration": "mean predicted probability of the returned items over downloads per "
                   "impression, assuming the returned items are the ones shown; breached "
                   "outside [low, high]",
}


@dataclass
class GuardSums:
    """One arm's guardrail sums over a period: scored requests, failed ones, returned items,
    the sum of their predicted probabilities, and requests per latency bucket (not
    cumulative; the last is +Inf)."""

    requests: int = 0
    errors: int = 0
    items: int = 0
    probability: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKET_FIELDS))

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> GuardSums:
        """From a Redis hash (bytes or str keys); fields it lacks count 0."""
        values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        return cls(int(values.get("requests", 0)), int(values.get("errors", 0)),
                   int(values.get("items", 0)), float(values.get("probability", 0.0)),
                   [int(values.get(f, 0)) for f in BUCKET_FIELDS])

    def __add__(self, other: GuardSums) -> GuardSums:
        return GuardSums(self.requests + other.requests, self.errors + other.errors,
                         self.items + other.items, self.probability + other.probability,
                         [a + b for a, b in zip(self.buckets, other.buckets, strict=True)])


def quantile(q: float, bounds: tuple[float, ...], counts: list[int]) -> float:
    """Prometheus' histogram_quantile over non-cumulative `counts` per bucket (`bounds` and a
    last +Inf bucket): linear inside the bucket, from 0 below the first bound; in the +Inf
    bucket, the highest finite bound. NaN without observations."""
    total = sum(counts)
    if total == 0:
        return math.nan
    rank, below = q * total, 0
    for i, n in enumerate(counts):
        if below + n >= rank and n > 0:
            if i == len(bounds):
                return bounds[-1]
            start = bounds[i - 1] if i else 0.0
            return start + (bounds[i] - start) * (rank - below) / n
        below += n
    return bounds[-1]


def thresholds_of(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Thresholds as JSON data: the config's (a `guardrails` block) over the defaults."""
    merged = {**DEFAULTS, **(config or {})}
    return {"latency_p99_ms": float(merged["latency_p99_ms"]),
            "error_share": float(merged["error_share"]),
            "calibration": [float(v) for v in merged["calibration"]]}


def evaluate(sums: GuardSums, impressions: int, downloads: int,
             thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """One arm's guardrails over a period: {"requests", "errors", "returned_items", and per
    guardrail {"value", "threshold", "breached"}; calibration also "predicted" and
    "observed"}. Undefined values are None; `breached` is None below the minimum sample."""
    enough = sums.requests >= MIN_REQUESTS
    p99 = quantile(QUANTILE, LATENCY_BUCKETS_S, sums.buckets) * 1000
    share = sums.errors / sums.requests if sums.requests else math.nan
    predicted = sums.probability / sums.items if sums.items else math.nan
    observed = downloads / impressions if impressions else math.nan
    calibration = predicted / observed if observed > 0 else math.nan
    low, high = thresholds["calibration"]
    return {
        "requests": sums.requests, "errors": sums.errors, "returned_items": sums.items,
        "latency_p99_ms": _judged(p99, thresholds["latency_p99_ms"], enough,
                                  p99 > thresholds["latency_p99_ms"]),
        "error_share": _judged(share, thresholds["error_share"], enough,
                               share > thresholds["error_share"]),
        "calibration": {**_judged(calibration, [low, high], downloads >= MIN_DOWNLOADS,
                                  not low <= calibration <= high),
                        "predicted": _number(predicted), "observed": _number(observed)},
    }


def _judged(value: float, threshold: Any, enough: bool, outside: bool) -> dict[str, Any]:
    judged = enough and not math.isnan(value)
    return {"value": _number(value), "threshold": threshold,
            "breached": bool(outside) if judged else None}


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


ArmPeriod = tuple[GuardSums, int, int]  # guardrail sums, impressions, downloads


def section(days: Mapping[str, Mapping[str, ArmPeriod]], total: Mapping[str, ArmPeriod],
            thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """The report's "guardrails": {"thresholds", "methods", "minimum", "days": {day: {arm:
    evaluate(...)}}, "total": {arm: ...}, "breached": [{"day", "arm", "guardrail", "value",
    "threshold"}] (the days' breaches, in day and arm order)}."""
    judged = {day: {arm: evaluate(*period, thresholds) for arm, period in arms.items()}
              for day, arms in days.items()}
    breached = [{"day": day, "arm": arm, "guardrail": name, "value": entry[name]["value"],
                 "threshold": entry[name]["threshold"]}
                for day, arms in judged.items() for arm, entry in arms.items()
                for name in NAMES if entry[name]["breached"]]
    return {"thresholds": dict(thresholds), "methods": dict(METHODS),
            "minimum": {"requests": MIN_REQUESTS, "downloads": MIN_DOWNLOADS},
            "days": judged,
            "total": {arm: evaluate(*period, thresholds) for arm, period in total.items()},
            "breached": breached}


def format_section(guard: Mapping[str, Any]) -> list[str]:
    """Text lines: the thresholds, then per day and arm the three values, "!" on a breach and
    "?" where too few requests or downloads leave it unjudged."""
    t = guard["thresholds"]
    low, high = t["calibration"]
    lines = [f"Guardrails (p99 <= {t['latency_p99_ms']:g} ms, errors <= {t['error_share']:.2%}, "
             f"calibration in [{low:g}, {high:g}]; ! breached, ? fewer than "
             f"{guard['minimum']['requests']} requests or {guard['minimum']['downloads']} "
             "downloads):"]
    rows = [("day", "arm", "requests", "p99 ms", "errors", "calibration")]
    for day, arms in [*guard["days"].items(), ("total", guard["total"])]:
        rows += [(day, arm, f"{e['requests']:,}",
                  _mark(e["latency_p99_ms"], lambda v: f"{v:.1f}"),
                  _mark(e["error_share"], lambda v: f"{v:.2%}"),
                  _mark(e["calibration"], lambda v: f"{v:.3f}")) for arm, e in arms.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
              for r in rows]
    return lines


def _mark(entry: Mapping[str, Any], fmt: Any) -> str:
    if entry["value"] is None:
        return "n/a"
    flag = {True: " !", False: "", None: " ?"}[entry["breached"]]
    return fmt(entry["value"]) + flag
