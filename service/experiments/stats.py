"""Statistics of the A/B report: per-arm CTR and CVR, uplift over control, sample-ratio check.

Users are the unit of randomisation, so the impressions of one user are not independent draws:
a user who likes the recommendations downloads from many of them. Every interval here treats
the user as the independent unit, through the user-level sufficient statistics of `ArmStats`.

Notation, per arm: n users; user u had x_u impressions and y_u downloads;
X = Σx_u, Y = Σy_u, x̄ = X/n, and the sample (co)variances over users (divisor n − 1):

    s_x² = (n·Σx_u² − X²) / (n(n − 1))
    s_y² = (n·Σy_u² − Y²) / (n(n − 1))
    s_xy = (n·Σx_u·y_u − X·Y) / (n(n − 1))

Intervals are normal (Wald) intervals, estimate ± z·se, z = Φ⁻¹(1 − α/2) (1.96 at 95%). They
and their p-values are fixed-horizon: valid when read once, at a sample size planned in advance.
Beside each uplift's, the report gives the always-valid interval of `sequential` (a confidence
sequence on the same delta-method estimate: valid at every look, read daily as users do) and
takes its decision ("treatment better" / "treatment worse" / "keep running") on that one.
Undefined quantities (an arm without impressions, fewer than two users, a zero control rate)
come out as NaN, never as an exception; `report` turns them into None for JSON.

numpy and scipy only: this module sits on the serving side, which never imports torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import special
from scipy import stats as sps

from ctrserve.service.experiments import cuped as cuped_math
from ctrserve.service.experiments import sequential
from ctrserve.service.experiments.cuped import CupedStats

CONFIDENCE = 0.95
SRM_ALPHA = 0.001  # GrowthBook's and Statsig's threshold: a real mismatch, not bad luck
NAN = float("nan")

METHODS = {
    "ctr": "delta method for a ratio of per-user means, users as the unit",
    "cvr": "normal interval of downloads per user (CLT over users)",
    "uplift": "t/c - 1; delta method on log(t/c), independent arms; two-sided z test on log(t/c)",
    "srm": f"chi-square of users per arm against configured weights, flagged at p < {SRM_ALPHA}",
    "sequential": "always-valid interval of log(t/c): normal-mixture confidence sequence "
                  "(Howard et al. 2021) on the delta-method estimate, valid at every look; "
                  "decisions use it",
}
METHOD_CUPED = ("CUPED (Deng et al. 2013): t_adj/c_adj - 1, m_adj = m - theta'(Z_arm - Z_pooled) "
                "with Z per user = pre-period impressions, downloads and whether the user has a "
                "pre-period; theta the regression of the metric's per-user (delta-method "
                "linearised for CTR) values on Z, pooled over both arms; delta method on the log")
DECISION_BASIS = "always-valid (sequential) interval of the uplift, valid at every daily look"
BETTER, WORSE, KEEP_RUNNING = "treatment better", "treatment worse", "keep running"


@dataclass(frozen=True)
class ArmStats:
    """User-level sufficient statistics of one arm (for one day, or summed over days).

    `users` is the number of independent units the sums run over, `impressions` = Σx_u,
    `downloads` = Σy_u, and `sum_x2` = Σx_u², `sum_y2` = Σy_u², `sum_xy` = Σx_u·y_u.

    Adding two `ArmStats` (for instance the days of an experiment, `sum(days)` works) adds every
    sum, so a user active on three days counts three times in `users`: the unit becomes the
    user-day and the total's intervals treat a user's days as independent, slightly optimistic
    when users return. The users *shown* for the total should come from a distinct count when
    one is available (a set or HyperLogLog over the whole period): pass it as `distinct_users`
    (`ArmStats.total(days, distinct_users=n)` or `.with_distinct_users(n)`). It then replaces n
    in CVR = Y/n and in the sample-ratio check, while the variances keep using the units the sums
    run over. Exact totals need the user-level arrays of the whole period (`from_user_arrays`).
    """

    users: int
    impressions: int
    downloads: int
    sum_x2: int
    sum_y2: int
    sum_xy: int
    distinct_users: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not float(value).is_integer() or value < 0:
                raise ValueError(f"ArmStats.{f.name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, f.name, int(value))  # numpy scalars -> exact Python ints

    @classmethod
    def from_user_arrays(cls, x: Any, y: Any, distinct_users: int | None = None) -> ArmStats:
        """Sufficient statistics from per-user impressions `x` and downloads `y` (same length)."""
        x_arr, y_arr = _count_array("x", x), _count_array("y", y)
        if x_arr.shape != y_arr.shape:
            raise ValueError(f"x and y differ in length: {x_arr.size} and {y_arr.size} users")
        return cls(
            users=x_arr.size,
            impressions=int(x_arr.sum()),
            downloads=int(y_arr.sum()),
            sum_x2=int((x_arr * x_arr).sum()),
            sum_y2=int((y_arr * y_arr).sum()),
            sum_xy=int((x_arr * y_arr).sum()),
            distinct_users=distinct_users,
        )

    @classmethod
    def empty(cls) -> ArmStats:
        return cls(0, 0, 0, 0, 0, 0)

    @classmethod
    def total(cls, parts: Iterable[ArmStats], distinct_users: int | None = None) -> ArmStats:
        """The sum of `parts` (days), with the distinct user count of the whole period if known."""
        return sum(parts, cls.empty()).with_distinct_users(distinct_users)

    def with_distinct_users(self, distinct_users: int | None) -> ArmStats:
        return replace(self, distinct_users=distinct_users)

    @property
    def user_count(self) -> int:
        """Users to show and to divide by in CVR: the distinct count if given, else `users`."""
        return self.users if self.distinct_users is None else self.distinct_users

    def __add__(self, other: object) -> ArmStats:
        if not isinstance(other, ArmStats):
            return NotImplemented
        # distinct counts do not add (a user may be in both parts): the sum has none
        return ArmStats(
            users=self.users + other.users,
            impressions=self.impressions + other.impressions,
            downloads=self.downloads + other.downloads,
            sum_x2=self.sum_x2 + other.sum_x2,
            sum_y2=self.sum_y2 + other.sum_y2,
            sum_xy=self.sum_xy + other.sum_xy,
        )

    def __radd__(self, other: object) -> ArmStats:
        if isinstance(other, int) and other == 0:  # lets the builtin sum() start from 0
            return self
        return NotImplemented


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and confidence interval [lo, hi]."""

    value: float
    se: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Uplift:
    """Relative uplift t/c − 1 with its interval, p-value and the standard error of log(t/c)."""

    value: float
    lo: float
    hi: float
    p_value: float
    se_log: float


@dataclass(frozen=True)
class SequentialUplift:
    """Always-valid interval of the relative uplift t/c − 1 at this look, and its decision.

    `units` is n, the users of both arms the estimate rests on, `planned_units` the n* the
    confidence sequence is tuned for (see `service.experiments.sequential`); `p_value` is the
    always-valid p-value at this look, below 1 − confidence exactly when [lo, hi] excludes 0.
    """

    lo: float
    hi: float
    p_value: float
    decision: str
    units: int
    planned_units: float


@dataclass(frozen=True)
class CupedUplift:
    """The CUPED-adjusted uplift of one metric (see `service.experiments.cuped`).

    `uplift` is adjusted, `unadjusted` the plain uplift of the same users (the report's when the
    CUPED sums cover the report's users), `variance_reduction` = 1 − var(adjusted log
    ratio)/var(plain log ratio), `theta` the fitted coefficients by covariate, `units` the users
    of both arms and `users_with_pre_period` those of them with a pre-period. `pre_period` is the
    same metric's uplift over the pre-period, a balance check: the arms were alike before the
    start, so it should be near 0 with an unremarkable p-value.
    """

    uplift: Uplift
    unadjusted: Uplift
    variance_reduction: float
    theta: dict[str, float]
    units: int
    users_with_pre_period: int
    pre_period: Uplift


@dataclass(frozen=True)
class SampleRatioCheck:
    """Chi-square goodness of fit of users per arm against the configured weights."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    flagged: bool
    alpha: float


@functools.lru_cache(maxsize=64)
def z_value(confidence: float = CONFIDENCE) -> float:
    """Two-sided normal quantile: z = Φ⁻¹(1 − (1 − confidence)/2)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


def normal_interval(value: float, se: float, confidence: float = CONFIDENCE) -> Estimate:
    """value ± z·se; NaN bounds when either is NaN."""
    half = z_value(confidence) * se
    return Estimate(value=value, se=se, lo=value - half, hi=value + half)


def user_moments(arm: ArmStats) -> tuple[float, float, float]:
    """(s_x², s_y², s_xy) over the arm's units, exact integer numerators; NaN if n < 2."""
    n = arm.users
    if n < 2:
        return NAN, NAN, NAN
    denom = n * (n - 1)
    s_xx = (n * arm.sum_x2 - arm.impressions**2) / denom
    s_yy = (n * arm.sum_y2 - arm.downloads**2) / denom
    s_xy = (n * arm.sum_xy - arm.impressions * arm.downloads) / denom
    return s_xx, s_yy, s_xy


def ctr_interval(arm: ArmStats, confidence: float = CONFIDENCE) -> Estimate:
    """CTR r = Y/X with the delta-method interval for a ratio of per-user means.

    var(r) ≈ (1/(n·x̄²))·(s_y² − 2r·s_xy + r²·s_x²). NaN without impressions or with n < 2.
    """
    if arm.impressions == 0:
        return Estimate(NAN, NAN, NAN, NAN)
    r = arm.downloads / arm.impressions
    s_xx, s_yy, s_xy = user_moments(arm)
    var = arm.users * (s_yy - 2.0 * r * s_xy + r * r * s_xx) / arm.impressions**2  # n·x̄² = X²/n
    # the bracket is the variance of y_u − r·x_u, ≥ 0; rounding can leave a tiny negative
    return normal_interval(r, math.sqrt(max(var, 0.0)) if var == var else NAN, confidence)


def cvr_interval(arm: ArmStats, confidence: float = CONFIDENCE) -> Estimate:
    """CVR c = Y/N, downloads per user (N = `user_count`), with a CLT interval over users.

    se = sqrt(n·s_y²)/N: var(Y) = n·s_y² over the n units of the sums. With N = n this is the
    familiar s_y/√n. NaN without users or with n < 2.
    """
    if arm.user_count == 0:
        return Estimate(NAN, NAN, NAN, NAN)
    c = arm.downloads / arm.user_count
    _, s_yy, _ = user_moments(arm)
    se = math.sqrt(max(arm.users * s_yy, 0.0)) / arm.user_count if s_yy == s_yy else NAN
    return normal_interval(c, se, confidence)


def binomial_ctr_interval(arm: ArmStats, confidence: float = CONFIDENCE) -> Estimate:
    """Naive Wald interval over impressions, r ± z·sqrt(r(1 − r)/X). Do not use it.

    It treats every impression as an independent Bernoulli trial, which ignores that
    impressions of one user share that user's taste: with heterogeneous users it is too narrow
    (tests/test_stats.py measures how much). Kept only to show that in tests.
    """
    if arm.impressions == 0:
        return Estimate(NAN, NAN, NAN, NAN)
    r = arm.downloads / arm.impressions
    return normal_interval(r, math.sqrt(max(r * (1.0 - r), 0.0) / arm.impressions), confidence)


def relative_uplift(
    treatment: Estimate, control: Estimate, confidence: float = CONFIDENCE
) -> Uplift:
    """Relative uplift t/c − 1 of two independent estimates, on the log scale.

    se(log(t/c)) = sqrt((se_t/t)² + (se_c/c)²) (delta method, independent arms);
    interval exp(log(t/c) ± z·se) − 1, which stays above −100% and is asymmetric like a ratio;
    p-value: two-sided z test of log(t/c) = 0, p = 2·(1 − Φ(|log(t/c)|/se)), so p < 1 − confidence
    exactly when the interval excludes 0. NaN when either rate is zero or not finite.
    """
    t, c = treatment.value, control.value
    if not (t > 0 and c > 0 and math.isfinite(treatment.se) and math.isfinite(control.se)):
        return Uplift(NAN, NAN, NAN, NAN, NAN)
    log_ratio = math.log(t) - math.log(c)
    return log_uplift(log_ratio, math.hypot(treatment.se / t, control.se / c), confidence)


def log_uplift(log_ratio: float, se: float, confidence: float = CONFIDENCE) -> Uplift:
    """The `Uplift` of an estimate of log(t/c) with standard error `se` (see `relative_uplift`);
    NaN when either is not finite."""
    if not (math.isfinite(log_ratio) and math.isfinite(se)):
        return Uplift(NAN, NAN, NAN, NAN, NAN)
    half = z_value(confidence) * se
    p_value = math.erfc(abs(log_ratio) / se / math.sqrt(2.0)) if se > 0 else NAN  # 2·(1 − Φ)
    return Uplift(
        value=math.expm1(log_ratio),
        lo=math.expm1(log_ratio - half),
        hi=math.expm1(log_ratio + half),
        p_value=p_value,
        se_log=se,
    )


def ctr_uplift(
    treatment: ArmStats, control: ArmStats, confidence: float = CONFIDENCE
) -> Uplift:
    """Relative CTR uplift of `treatment` over `control` (see `relative_uplift`)."""
    return relative_uplift(ctr_interval(treatment), ctr_interval(control), confidence)


def cvr_uplift(
    treatment: ArmStats, control: ArmStats, confidence: float = CONFIDENCE
) -> Uplift:
    """Relative CVR uplift of `treatment` over `control` (see `relative_uplift`)."""
    return relative_uplift(cvr_interval(treatment), cvr_interval(control), confidence)


def sequential_uplift(
    uplift: Uplift,
    units: int,
    confidence: float = CONFIDENCE,
    planned_units: float = sequential.PLANNED_UNITS,
) -> SequentialUplift:
    """The confidence sequence around a fixed-horizon `uplift`, on its log scale like it.

    exp(log(t/c) ± w·se_log) − 1 with w = `sequential.width_factor(units, planned_units)` (> z).
    NaN bounds, and "keep running", where the fixed-horizon uplift is undefined.
    """
    alpha = 1.0 - confidence
    log_ratio = math.log1p(uplift.value) if uplift.value > -1 else NAN
    lo, hi = sequential.interval(log_ratio, uplift.se_log, units, planned_units, alpha)
    p = sequential.p_value(log_ratio, uplift.se_log, units, planned_units, alpha)
    lo, hi = math.expm1(float(lo)), math.expm1(float(hi))
    return SequentialUplift(lo, hi, float(p), decide(lo, hi), units, planned_units)


def decide(lo: float, hi: float) -> str:
    """The decision an always-valid interval [lo, hi] of the uplift supports at this look."""
    if lo > 0:
        return BETTER
    if hi < 0:
        return WORSE
    return KEEP_RUNNING  # also when undefined (NaN compares false)


def ctr_uplift_sequential(
    treatment: ArmStats,
    control: ArmStats,
    confidence: float = CONFIDENCE,
    planned_units: float = sequential.PLANNED_UNITS,
) -> SequentialUplift:
    """Always-valid interval of the relative CTR uplift (see `sequential_uplift`)."""
    return sequential_uplift(ctr_uplift(treatment, control, confidence),
                             treatment.users + control.users, confidence, planned_units)


def cvr_uplift_sequential(
    treatment: ArmStats,
    control: ArmStats,
    confidence: float = CONFIDENCE,
    planned_units: float = sequential.PLANNED_UNITS,
) -> SequentialUplift:
    """Always-valid interval of the relative CVR uplift (see `sequential_uplift`)."""
    return sequential_uplift(cvr_uplift(treatment, control, confidence),
                             treatment.users + control.users, confidence, planned_units)


def cuped_uplift(
    treatment: CupedStats, control: CupedStats, metric: cuped_math.Metric,
    confidence: float = CONFIDENCE,
) -> CupedUplift:
    """The CUPED-adjusted relative uplift of `metric` ("ctr" or "cvr"), from each arm's sums of
    in-experiment and pre-period activity per user."""
    fit = cuped_math.fit(treatment.gram(), control.gram(), metric)
    plain = ctr_uplift if metric == "ctr" else cvr_uplift
    return CupedUplift(
        uplift=log_uplift(float(fit.log_ratio), float(fit.se_log), confidence),
        unadjusted=log_uplift(float(fit.plain_log_ratio), float(fit.plain_se_log), confidence),
        variance_reduction=float(fit.variance_reduction),
        theta=dict(zip(cuped_math.COVARIATE_NAMES, map(float, fit.theta), strict=True)),
        units=treatment.users + control.users,
        users_with_pre_period=treatment.has_pre + control.has_pre,
        pre_period=plain(pre_period_stats(treatment), pre_period_stats(control), confidence),
    )


def ctr_uplift_cuped(
    treatment: CupedStats, control: CupedStats, confidence: float = CONFIDENCE
) -> CupedUplift:
    """CUPED-adjusted relative CTR uplift (see `cuped_uplift`)."""
    return cuped_uplift(treatment, control, "ctr", confidence)


def cvr_uplift_cuped(
    treatment: CupedStats, control: CupedStats, confidence: float = CONFIDENCE
) -> CupedUplift:
    """CUPED-adjusted relative CVR uplift (see `cuped_uplift`)."""
    return cuped_uplift(treatment, control, "cvr", confidence)


def pre_period_stats(arm: CupedStats) -> ArmStats:
    """The arm's pre-period activity as `ArmStats` (users without a pre-period count 0)."""
    return ArmStats(arm.users, arm.pre_x, arm.pre_y, arm.pre_x_pre_x, arm.pre_y_pre_y,
                    arm.pre_x_pre_y)


def sample_ratio_check(
    users: Mapping[str, int], weights: Mapping[str, float], alpha: float = SRM_ALPHA
) -> SampleRatioCheck:
    """Sample-ratio mismatch: chi-square of users per arm against the configured weights.

    Expected users of arm i = N·w_i/Σw (weights are normalised over the arms given, so a
    holdout outside them does not matter). χ² = Σ(o_i − e_i)²/e_i with k − 1 degrees of
    freedom (as scipy.stats.chisquare); flagged when p < alpha (0.001). Users in an arm of weight 0
    are a mismatch by definition (χ² = ∞, p = 0). Fewer than two arms with weight, or no users:
    not testable (NaN, not flagged).
    """
    if set(users) != set(weights):
        raise ValueError(
            f"arms with users {sorted(users)} and arms with weights {sorted(weights)} differ"
        )
    for arm, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight of arm {arm!r} must be a finite number >= 0, got {w!r}")
    total_w = float(sum(weights.values()))
    if total_w <= 0:
        raise ValueError("the arms' weights must not all be zero")
    names = list(users)
    observed = {a: int(users[a]) for a in names}
    n = sum(observed.values())
    expected = {a: n * weights[a] / total_w for a in names}
    chi2, p = _chi_square(observed, expected, weights)
    return SampleRatioCheck(observed, expected, chi2, p, bool(p < alpha), alpha)


def _chi_square(
    observed: dict[str, int], expected: dict[str, float], weights: Mapping[str, float]
) -> tuple[float, float]:
    if any(weights[a] == 0 and observed[a] > 0 for a in observed):
        return math.inf, 0.0
    live = [a for a in observed if weights[a] > 0]
    if len(live) < 2 or sum(observed.values()) == 0:
        return NAN, NAN
    # scipy.stats.chisquare's statistic and p-value, without its ~0.2 ms of overhead per call
    chi2 = sum((observed[a] - expected[a]) ** 2 / expected[a] for a in live)
    return chi2, float(special.chdtrc(len(live) - 1, chi2))


def report(
    arms: Mapping[str, ArmStats],
    control: str,
    weights: Mapping[str, float],
    confidence: float = CONFIDENCE,
    planned_units: float = sequential.PLANNED_UNITS,
    cuped: Mapping[str, CupedStats] | None = None,
) -> dict[str, Any]:
    """The statistics of one period (a day or the total) as plain JSON-able data.

    {"control", "confidence", "methods", "sequential": {"planned_units", "basis"}, "srm": {...},
    "arms": {name: {"users", "impressions", "downloads", "ctr": {value, se, lo, hi}, "cvr": {...},
    "uplift": None for the control, else {"ctr": {value, lo, hi, p_value, se_log, "sequential":
    {lo, hi, p_value, decision, units, planned_units}}, "cvr": {...}}, "decision": None for the
    control, else {"ctr": ..., "cvr": ..., "basis": DECISION_BASIS}}}}. The fixed-horizon interval
    and p-value hold for one look at a planned end; "sequential" and "decision" hold at every look.
    `planned_units` (users of a treatment and the control at the planned end) tunes the
    sequential interval. Control first, then the others in the given order. Undefined numbers
    are None (strict JSON has no NaN).

    With `cuped` ({arm: CupedStats} of the same users with their pre-period; an arm missing
    from it has none), every treatment's "ctr" and "cvr" uplift also holds "cuped": {value, lo,
    hi, p_value, se_log, "sequential": {...}, variance_reduction, units, users_with_pre_period,
    theta: {covariate: θ}, "unadjusted": {...}, "pre_period": {...}} (`cuped_uplift`), and
    "methods" gains "cuped". The decision stays on the plain always-valid interval.
    """
    if control not in arms:
        raise ValueError(f"control arm {control!r} is not among the arms {sorted(arms)}")
    order = [control, *(a for a in arms if a != control)]
    srm = sample_ratio_check({a: arms[a].user_count for a in order}, weights)
    seq = {"planned_units": planned_units, "basis": DECISION_BASIS}
    rep = {
        "control": control,
        "confidence": confidence,
        "methods": dict(METHODS),
        "sequential": _json(seq),
        "srm": _json(asdict(srm)),
        "arms": {a: _arm_entry(arms[a], arms[control], a == control, confidence, planned_units)
                 for a in order},
    }
    if cuped is not None:
        _add_cuped(rep, cuped, confidence, planned_units)
    return rep


def _add_cuped(rep: dict[str, Any], cuped: Mapping[str, CupedStats], confidence: float,
               planned_units: float) -> None:
    rep["methods"]["cuped"] = METHOD_CUPED
    control = cuped.get(rep["control"], CupedStats.empty())
    for name, entry in rep["arms"].items():
        if entry["uplift"] is None:
            continue
        arm = cuped.get(name, CupedStats.empty())
        for metric in ("ctr", "cvr"):
            fit = cuped_uplift(arm, control, metric, confidence)
            entry["uplift"][metric]["cuped"] = _cuped_entry(fit, confidence, planned_units)


def _cuped_entry(fit: CupedUplift, confidence: float, planned_units: float) -> dict[str, Any]:
    seq = sequential_uplift(fit.uplift, fit.units, confidence, planned_units)
    return _json({**asdict(fit.uplift), "sequential": asdict(seq),
                  "variance_reduction": fit.variance_reduction, "units": fit.units,
                  "users_with_pre_period": fit.users_with_pre_period, "theta": fit.theta,
                  "unadjusted": asdict(fit.unadjusted), "pre_period": asdict(fit.pre_period)})


def _arm_entry(arm: ArmStats, control: ArmStats, is_control: bool, confidence: float,
               planned_units: float) -> dict:
    uplift = decision = None
    if not is_control:
        uplift = {"ctr": _uplift_entry(ctr_uplift(arm, control, confidence), arm, control,
                                       confidence, planned_units),
                  "cvr": _uplift_entry(cvr_uplift(arm, control, confidence), arm, control,
                                       confidence, planned_units)}
        decision = {key: uplift[key]["sequential"]["decision"] for key in ("ctr", "cvr")}
        decision["basis"] = DECISION_BASIS
    return {
        "users": arm.user_count,
        "impressions": arm.impressions,
        "downloads": arm.downloads,
        "ctr": _json(asdict(ctr_interval(arm, confidence))),
        "cvr": _json(asdict(cvr_interval(arm, confidence))),
        "uplift": uplift,
        "decision": decision,
    }


def _uplift_entry(up: Uplift, arm: ArmStats, control: ArmStats, confidence: float,
                  planned_units: float) -> dict:
    seq = sequential_uplift(up, arm.users + control.users, confidence, planned_units)
    return _json({**asdict(up), "sequential": asdict(seq)})


def _json(value: Any) -> Any:
    """NaN and ±inf to None, numpy scalars to Python, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, bool | int | str) or value is None:
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def format_report(rep: Mapping[str, Any], title: str | None = None) -> str:
    """A readable text table of a `report(...)` dict, the decision per treatment arm (on the
    always-valid intervals) and the sample-ratio verdict below it."""
    level = f"{rep['confidence']:.0%}"
    header = ["arm", "users", "impressions", "downloads", f"CTR [{level} CI]",
              f"CVR (downloads per user) [{level} CI]",
              "CTR uplift [CI]", "p", "always-valid CI", "CVR uplift [CI]", "p", "always-valid CI"]
    rows = [header] + [_arm_row(name, entry) for name, entry in rep["arms"].items()]
    lines = [title] if title else []
    lines += _table(rows)
    lines += _decision_lines(rep)
    lines += _cuped_lines(rep)
    lines.append(_srm_line(rep["srm"]))
    return "\n".join(lines)


def _arm_row(name: str, entry: Mapping[str, Any]) -> list[str]:
    ctr, cvr, uplift = entry["ctr"], entry["cvr"], entry["uplift"]
    row = [name, f"{entry['users']:,}", f"{entry['impressions']:,}", f"{entry['downloads']:,}",
           _interval(ctr, lambda v: f"{v:.3%}"), _interval(cvr, lambda v: f"{v:.4g}")]
    if uplift is None:
        return [*row, "(control)", "", "", "", "", ""]
    for key in ("ctr", "cvr"):
        row += [_interval(uplift[key], lambda v: f"{v:+.2%}"), _p(uplift[key]["p_value"]),
                _bounds(uplift[key]["sequential"], lambda v: f"{v:+.2%}")]
    return row


def _decision_lines(rep: Mapping[str, Any]) -> list[str]:
    level = f"{rep['confidence']:.0%}"
    lines = [f"{name} vs {rep['control']}: CTR {entry['decision']['ctr']}, "
             f"CVR {entry['decision']['cvr']}"
             for name, entry in rep["arms"].items() if entry.get("decision")]
    if not lines:
        return []
    planned = rep["sequential"]["planned_units"]
    return [f"Decision on the always-valid {level} intervals (valid at every look, tuned for "
            f"{planned:,.0f} users; the fixed-horizon CI and p hold only read once at a planned "
            "end):", *(f"  {line}" for line in lines)]


def _cuped_lines(rep: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, entry in rep["arms"].items():
        fits = {m: (entry["uplift"] or {}).get(m, {}).get("cuped") for m in ("ctr", "cvr")}
        if not all(fits.values()):
            continue
        parts = [f"{m.upper()} {_interval(fit, lambda v: f'{v:+.2%}')}, always-valid "
                 f"{_bounds(fit['sequential'], lambda v: f'{v:+.2%}')}, variance "
                 f"{_reduction(fit['variance_reduction'])}" for m, fit in fits.items()]
        users = fits["ctr"]
        lines.append(f"  {name} vs {rep['control']}: {'; '.join(parts)} "
                     f"({users['users_with_pre_period']:,} of {users['units']:,} users with a "
                     "pre-period)")
    if not lines:
        return []
    return ["CUPED, adjusted for the users' activity before the start (variance: change against "
            "the plain uplift's):", *lines]


def _reduction(value: float | None) -> str:
    return "n/a" if value is None else f"{-value:+.1%}"


def _bounds(est: Mapping[str, Any], fmt: Any) -> str:
    if est["lo"] is None or est["hi"] is None:
        return "n/a"
    return f"[{fmt(est['lo'])}, {fmt(est['hi'])}]"


def _interval(est: Mapping[str, Any], fmt: Any) -> str:
    if est["value"] is None:
        return "n/a"
    if est["lo"] is None or est["hi"] is None:
        return f"{fmt(est['value'])} [n/a]"
    return f"{fmt(est['value'])} [{fmt(est['lo'])}, {fmt(est['hi'])}]"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])  # arm names left-aligned, numbers right-aligned
        lines.append("  ".join(cells).rstrip())
    return lines


def _srm_line(srm: Mapping[str, Any]) -> str:
    counts = ", ".join(
        f"{a} {o:,} (expected {srm['expected'][a]:,.0f})" for a, o in srm["observed"].items()
    )
    if srm["p_value"] is None:
        return f"Sample ratio: not testable ({counts})"
    chi2 = "inf" if srm["chi2"] is None else f"{srm['chi2']:.2f}"
    verdict = f"chi2={chi2}, p={srm['p_value']:.3g}; users {counts}"
    if srm["flagged"]:
        return (f"!!! SAMPLE RATIO MISMATCH: {verdict} (p < {srm['alpha']}). Users per arm do "
                "not match the configured weights: assignment or logging is broken, do not "
                "trust these comparisons. !!!")
    return f"Sample ratio: OK ({verdict})"


def _count_array(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per user), got {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iub" and not np.all(np.mod(arr, 1) == 0)):
        raise ValueError(f"{name} must hold integer counts")
    if arr.size and np.any(arr < 0):
        raise ValueError(f"{name} must hold non-negative counts")
    return arr.astype(np.int64)
