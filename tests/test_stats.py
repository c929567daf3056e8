"""The A/B report's statistics against independent computations and against a known truth.

The simulated world: per-user CTR p_u ~ Beta(a, b), impressions per user x_u ~ Geometric(q)
(mean 1/q, skewed), downloads y_u ~ Binomial(x_u, p_u). With p_u independent of x_u the true
CTR is a/(a + b) and the true CVR (downloads per user) is a/(a + b)/q.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from ctrserve.service.experiments import sequential
from ctrserve.service.experiments.stats import (
    ArmStats,
    binomial_ctr_interval,
    ctr_interval,
    ctr_uplift,
    ctr_uplift_sequential,
    cvr_interval,
    cvr_uplift,
    cvr_uplift_sequential,
    format_report,
    report,
    sample_ratio_check,
)

Q = 0.05  # geometric impressions: mean 20 per user, long tail
CONTROL_BETA = (0.5, 9.5)  # true CTR 5%, strongly heterogeneous users (intra-user correlation 1/11)
TREATMENT_BETA = (0.55, 9.45)  # true CTR 5.5%: true uplift +10% in CTR and in CVR
REPS, USERS = 1000, 2000


def true_ctr(beta: tuple[float, float]) -> float:
    return beta[0] / (beta[0] + beta[1])


def users(rng: np.random.Generator, n: int, beta: tuple[float, float], size=None):
    shape = (n,) if size is None else (size, n)
    x = rng.geometric(Q, shape)
    y = rng.binomial(x, rng.beta(*beta, shape))
    return x, y


def experiments(rng: np.random.Generator, beta: tuple[float, float]) -> list[ArmStats]:
    """REPS independent arms of USERS users each, drawn at once and summed per row."""
    x, y = users(rng, USERS, beta, size=REPS)
    sums = [x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)]
    return [ArmStats(USERS, *(int(s[i]) for s in sums)) for i in range(REPS)]


@pytest.fixture(scope="module")
def simulated() -> dict[str, list[ArmStats]]:
    rng = np.random.default_rng(20240601)
    return {
        "control": experiments(rng, CONTROL_BETA),
        "null": experiments(rng, CONTROL_BETA),  # a second control: A/A experiments
        "treatment": experiments(rng, TREATMENT_BETA),
    }


def coverage(estimates, truth: float) -> float:
    return float(np.mean([e.lo <= truth <= e.hi for e in estimates]))


# --- sufficient statistics -------------------------------------------------------------------


def test_from_user_arrays_holds_the_user_level_sums() -> None:
    arm = ArmStats.from_user_arrays([3, 0, 5], [1, 0, 2])
    assert (arm.users, arm.impressions, arm.downloads) == (3, 8, 3)
    assert (arm.sum_x2, arm.sum_y2, arm.sum_xy) == (9 + 25, 1 + 4, 3 + 10)
    assert arm.user_count == 3 and arm.distinct_users is None


def test_days_add_up_and_distinct_users_override_the_count() -> None:
    rng = np.random.default_rng(1)
    days = [users(rng, n, CONTROL_BETA) for n in (300, 500, 400)]
    per_day = [ArmStats.from_user_arrays(x, y) for x, y in days]
    pooled = ArmStats.from_user_arrays(np.concatenate([d[0] for d in days]),
                                       np.concatenate([d[1] for d in days]))
    assert per_day[0] + per_day[1] + per_day[2] == pooled
    assert sum(per_day) == pooled
    assert ArmStats.total(per_day) == pooled and pooled.user_count == 1200

    total = ArmStats.total(per_day, distinct_users=700)
    assert total.users == 1200 and total.user_count == 700
    assert cvr_interval(total).value == pytest.approx(pooled.downloads / 700)
    assert ctr_interval(total) == ctr_interval(pooled)  # CTR does not depend on the user count
    # var(Y) = n·s_y² over the 1,200 user-days, divided by the 700 distinct users
    assert cvr_interval(total).se == pytest.approx(cvr_interval(pooled).se * 1200 / 700)
    assert (total + per_day[0]).distinct_users is None  # distinct counts do not add


@pytest.mark.parametrize(
    ("x", "y"),
    [([1, -1], [0, 0]), ([1.5, 2], [0, 1]), ([1, 2, 3], [0, 1]), ([[1, 2]], [[0, 1]]),
     ([1, float("nan")], [0, 0])],
)
def test_bad_user_arrays_are_refused(x, y) -> None:
    with pytest.raises(ValueError):
        ArmStats.from_user_arrays(x, y)


def test_numpy_scalars_become_exact_ints() -> None:
    arm = ArmStats(*(np.int64(v) for v in (2, 10, 1, 60, 1, 5)))
    assert all(type(v) is int for v in (arm.users, arm.impressions, arm.sum_xy))
    with pytest.raises(ValueError):
        ArmStats(2, 10, 1, 60, 1, 5.5)


# --- cross-checks against independent computations --------------------------------------------


def test_delta_ctr_variance_is_the_stated_formula() -> None:
    x, y = users(np.random.default_rng(2), 5000, CONTROL_BETA)
    r = y.sum() / x.sum()
    cov = np.cov(x, y, ddof=1)
    var = (cov[1, 1] - 2 * r * cov[0, 1] + r * r * cov[0, 0]) / (x.size * x.mean() ** 2)
    est = ctr_interval(ArmStats.from_user_arrays(x, y))
    assert est.value == r
    assert est.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert (est.lo, est.hi) == pytest.approx(sps.norm.interval(0.95, loc=r, scale=math.sqrt(var)))


def test_delta_ctr_variance_agrees_with_a_user_level_bootstrap() -> None:
    rng = np.random.default_rng(3)
    x, y = users(rng, 3000, CONTROL_BETA)
    idx = rng.integers(0, x.size, size=(2000, x.size))
    boot = y[idx].sum(1) / x[idx].sum(1)
    delta_var = ctr_interval(ArmStats.from_user_arrays(x, y)).se ** 2
    assert delta_var == pytest.approx(boot.var(ddof=1), rel=0.10)
    # and the naive interval is far narrower than what resampling users shows
    assert binomial_ctr_interval(ArmStats.from_user_arrays(x, y)).se ** 2 < 0.5 * boot.var()


def test_cvr_interval_matches_scipy() -> None:
    x, y = users(np.random.default_rng(4), 4000, CONTROL_BETA)
    est = cvr_interval(ArmStats.from_user_arrays(x, y))
    lo, hi = sps.norm.interval(0.95, loc=y.mean(), scale=sps.sem(y))
    assert est.value == pytest.approx(y.mean())
    assert (est.lo, est.hi) == pytest.approx((lo, hi), rel=1e-10)
    # binary downloads: the usual normal interval of a proportion (up to the n/(n−1) of s²)
    b = (y > 0).astype(int)
    p = b.mean()
    half = 1.959963984540054 * math.sqrt(p * (1 - p) / b.size)
    est = cvr_interval(ArmStats.from_user_arrays(x, b))
    assert (est.lo, est.hi) == pytest.approx((p - half, p + half), rel=1e-3)


def test_srm_p_value_matches_scipy_chisquare() -> None:
    counts = {"a": 5100, "b": 2950, "c": 1950}
    weights = {"a": 50.0, "b": 30.0, "c": 20.0}
    check = sample_ratio_check(counts, weights)
    ref = sps.chisquare([5100, 2950, 1950], [5000, 3000, 2000])
    assert check.chi2 == pytest.approx(ref.statistic) and check.p_value == pytest.approx(ref.pvalue)
    assert check.expected == pytest.approx({"a": 5000, "b": 3000, "c": 2000})
    assert check.p_value == pytest.approx(sps.chi2.sf(ref.statistic, df=2))


def test_uplift_agrees_with_a_bootstrap() -> None:
    rng = np.random.default_rng(5)
    xc, yc = users(rng, 4000, CONTROL_BETA)
    xt, yt = users(rng, 4000, TREATMENT_BETA)
    control, treatment = ArmStats.from_user_arrays(xc, yc), ArmStats.from_user_arrays(xt, yt)
    ic = rng.integers(0, xc.size, size=(2000, xc.size))
    it = rng.integers(0, xt.size, size=(2000, xt.size))
    for stat, up in (("ctr", ctr_uplift(treatment, control)),
                     ("cvr", cvr_uplift(treatment, control))):
        if stat == "ctr":
            t_rate, c_rate = yt[it].sum(1) / xt[it].sum(1), yc[ic].sum(1) / xc[ic].sum(1)
        else:
            t_rate, c_rate = yt[it].mean(1), yc[ic].mean(1)
        log_ratio = np.log(t_rate) - np.log(c_rate)
        assert up.se_log == pytest.approx(log_ratio.std(ddof=1), rel=0.10), stat
        lo, hi = np.expm1(np.percentile(log_ratio, [2.5, 97.5]))
        assert up.lo == pytest.approx(lo, abs=0.02) and up.hi == pytest.approx(hi, abs=0.02), stat
        # p-value against the bootstrap's own two-sided tail at 0
        tail = 2 * min(np.mean(log_ratio <= 0), np.mean(log_ratio >= 0))
        assert up.p_value == pytest.approx(tail, abs=0.02), stat


def test_p_value_and_interval_agree() -> None:
    rng = np.random.default_rng(6)
    control = ArmStats.from_user_arrays(*users(rng, 1500, CONTROL_BETA))
    for seed in range(30):
        treatment = ArmStats.from_user_arrays(*users(np.random.default_rng(seed), 1500,
                                                     TREATMENT_BETA))
        up = ctr_uplift(treatment, control)
        assert (up.p_value < 0.05) == (up.lo > 0 or up.hi < 0)
        assert up.lo < up.value < up.hi and up.lo > -1


# --- coverage against the known truth ----------------------------------------------------------


def test_delta_ctr_interval_covers_the_truth_and_binomial_does_not(simulated) -> None:
    truth = true_ctr(CONTROL_BETA)
    delta = coverage([ctr_interval(a) for a in simulated["control"]], truth)
    naive = coverage([binomial_ctr_interval(a) for a in simulated["control"]], truth)
    print(f"CTR coverage over {REPS} experiments: delta {delta:.3f}, binomial {naive:.3f}")
    assert 0.92 <= delta <= 0.98
    assert naive < 0.90 and naive < delta - 0.15


def test_cvr_interval_covers_the_truth(simulated) -> None:
    truth = true_ctr(CONTROL_BETA) / Q
    cov = coverage([cvr_interval(a) for a in simulated["control"]], truth)
    print(f"CVR coverage: {cov:.3f}")
    assert 0.92 <= cov <= 0.98


@pytest.mark.parametrize("uplift", [ctr_uplift, cvr_uplift])
def test_uplift_interval_covers_the_true_ratio(simulated, uplift) -> None:
    truth = true_ctr(TREATMENT_BETA) / true_ctr(CONTROL_BETA) - 1  # +10% for CTR and CVR alike
    ups = [uplift(t, c) for t, c in zip(simulated["treatment"], simulated["control"], strict=True)]
    cov = coverage(ups, truth)
    null = [uplift(t, c) for t, c in zip(simulated["null"], simulated["control"], strict=True)]
    false_positives = float(np.mean([u.p_value < 0.05 for u in null]))
    power = float(np.mean([u.p_value < 0.05 for u in ups]))
    # power the normal approximation predicts from the estimated standard errors:
    # P(|log(t/c)|/se > z) with log(t/c) ~ N(log 1.1, se²)
    shift = math.log1p(truth) / np.mean([u.se_log for u in ups])
    predicted = sps.norm.cdf(shift - 1.959964) + sps.norm.cdf(-shift - 1.959964)
    print(f"{uplift.__name__}: coverage {cov:.3f}, A/A false positives {false_positives:.3f}, "
          f"power at +10% {power:.3f} (predicted {predicted:.3f})")
    assert 0.92 <= cov <= 0.98
    assert 0.02 <= false_positives <= 0.08
    assert power == pytest.approx(predicted, abs=0.05)  # 1,000 runs: Monte Carlo se ~0.015
    assert power > false_positives + 0.15


# --- always-valid (sequential) intervals -----------------------------------------------------


@pytest.mark.parametrize(("fixed", "seq"), [(ctr_uplift, ctr_uplift_sequential),
                                            (cvr_uplift, cvr_uplift_sequential)])
def test_sequential_interval_is_wider_than_fixed_and_contains_the_estimate(fixed, seq) -> None:
    rng = np.random.default_rng(8)
    for _ in range(20):
        control = ArmStats.from_user_arrays(*users(rng, 2000, CONTROL_BETA))
        treatment = ArmStats.from_user_arrays(*users(rng, 2000, TREATMENT_BETA))
        f, s = fixed(treatment, control), seq(treatment, control)
        assert s.lo < f.lo < f.value < f.hi < s.hi
        assert s.p_value >= f.p_value
        assert (s.p_value < 0.05) == (s.lo > 0 or s.hi < 0)
        assert s.units == 4000 and s.planned_units == sequential.PLANNED_UNITS


def test_sequential_interval_shrinks_with_n() -> None:
    x, y = users(np.random.default_rng(9), 32_000, CONTROL_BETA)
    xt, yt = users(np.random.default_rng(10), 32_000, TREATMENT_BETA)
    widths = []
    for n in (500, 1000, 2000, 4000, 8000, 16_000, 32_000):  # growing prefixes of one experiment
        s = ctr_uplift_sequential(ArmStats.from_user_arrays(xt[:n], yt[:n]),
                                  ArmStats.from_user_arrays(x[:n], y[:n]))
        widths.append(s.hi - s.lo)
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False)), widths
    # with se ∝ 1/√n the half-width w(n)·se shrinks at every n, even far past the planned n*
    n = np.logspace(1, 8, 200)
    assert np.all(np.diff(sequential.width_factor(n) / np.sqrt(n)) < 0)
    assert np.all(sequential.width_factor(n) > 1.96)


def test_sequential_width_is_the_papers_normal_mixture_boundary() -> None:
    """Howard et al. (2021): |S_n| <= sqrt((v + ρ)·log((v + ρ)/(ρ·α²))) with v = n·σ²; the
    interval of the mean is that bound over n. GrowthBook's tuning ρ = σ²·n*/η."""
    alpha, n_star = 0.05, 8000.0
    eta = -2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))
    for n, sigma in ((100, 1.0), (8000, 0.3), (250_000, 2.5)):
        v, rho = n * sigma**2, sigma**2 * n_star / eta
        bound = math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha**2))) / n
        lo, hi = sequential.interval(0.1, sigma / math.sqrt(n), n, n_star, alpha)
        assert (float(hi) - 0.1, 0.1 - float(lo)) == pytest.approx((bound, bound), rel=1e-12)
    # about 1.55 times the fixed-horizon interval where it is tuned to be tightest
    ratio = float(sequential.width_factor(n_star, n_star)) / 1.959964
    assert ratio == pytest.approx(1.55, abs=0.01)
    assert math.isnan(float(sequential.width_factor(0)))
    assert math.isnan(float(sequential.interval(0.1, float("nan"), 100)[0]))
    with pytest.raises(ValueError):
        sequential.mixture_precision(0)


def test_report_decides_on_the_sequential_interval() -> None:
    rng = np.random.default_rng(11)
    lr = ArmStats.from_user_arrays(*users(rng, 20_000, CONTROL_BETA))
    better = ArmStats.from_user_arrays(*users(rng, 20_000, (0.65, 9.35)))  # +30%
    same = ArmStats.from_user_arrays(*users(rng, 20_000, CONTROL_BETA))
    rep = report({"lr": lr, "better": better, "same": same}, "lr",
                 {"lr": 1, "better": 1, "same": 1})
    json.dumps(rep, allow_nan=False)
    seq = rep["arms"]["better"]["uplift"]["ctr"]["sequential"]
    assert seq["lo"] > 0 and seq["decision"] == "treatment better"
    assert rep["arms"]["better"]["decision"]["ctr"] == "treatment better"
    assert "always-valid" in rep["arms"]["better"]["decision"]["basis"]
    assert rep["arms"]["same"]["decision"] == {"ctr": "keep running", "cvr": "keep running",
                                                "basis": rep["sequential"]["basis"]}
    assert rep["arms"]["lr"]["decision"] is None
    swapped = report({"better": better, "lr": lr}, "better", {"lr": 1, "better": 1})
    assert swapped["arms"]["lr"]["decision"]["ctr"] == "treatment worse"
    text = format_report(rep)
    print(text)
    assert "always-valid" in text and "better vs lr: CTR treatment better" in text
    assert "same vs lr: CTR keep running, CVR keep running" in text


# --- sample-ratio mismatch ---------------------------------------------------------------------


def test_srm_flags_52_48_and_not_50_2_49_8() -> None:
    weights = {"control": 0.5, "treatment": 0.5}
    bad = sample_ratio_check({"control": 10_400, "treatment": 9_600}, weights)
    fine = sample_ratio_check({"control": 10_040, "treatment": 9_960}, weights)
    assert bad.flagged and bad.p_value < 1e-6
    assert not fine.flagged and fine.p_value > 0.5


def test_srm_edge_cases() -> None:
    weights = {"a": 1.0, "b": 1.0}
    empty = sample_ratio_check({"a": 0, "b": 0}, weights)
    assert math.isnan(empty.p_value) and not empty.flagged
    leaked = sample_ratio_check({"a": 100, "b": 3}, {"a": 1.0, "b": 0.0})
    assert leaked.flagged and leaked.p_value == 0.0
    with pytest.raises(ValueError, match="differ"):
        sample_ratio_check({"a": 1}, weights)
    with pytest.raises(ValueError, match="weight"):
        sample_ratio_check({"a": 1, "b": 1}, {"a": 1.0, "b": -1.0})


# --- edge cases and the report ------------------------------------------------------------------


def test_empty_arms_give_nan_not_exceptions() -> None:
    no_impressions = ArmStats.from_user_arrays([0, 0, 0], [0, 0, 0])
    nobody = ArmStats.empty()
    one_user = ArmStats.from_user_arrays([10], [2])
    for est in (ctr_interval(no_impressions), binomial_ctr_interval(nobody), ctr_interval(nobody),
                cvr_interval(nobody)):
        assert all(math.isnan(v) for v in (est.value, est.lo, est.hi))
    assert cvr_interval(no_impressions).value == 0.0
    assert ctr_interval(one_user).value == 0.2 and math.isnan(ctr_interval(one_user).se)
    assert math.isnan(ctr_uplift(one_user, no_impressions).p_value)
    assert math.isnan(cvr_uplift(nobody, no_impressions).lo)


def test_report_is_strict_json_and_the_table_warns_loudly() -> None:
    rng = np.random.default_rng(7)
    arms = {"deepfm": ArmStats.from_user_arrays(*users(rng, 10_400, TREATMENT_BETA)),
            "lr": ArmStats.from_user_arrays(*users(rng, 9_600, CONTROL_BETA)),
            "empty": ArmStats.empty()}
    rep = report(arms, control="lr", weights={"lr": 0.5, "deepfm": 0.5, "empty": 0.0})
    json.dumps(rep, allow_nan=False)
    assert list(rep["arms"]) == ["lr", "deepfm", "empty"] and rep["arms"]["lr"]["uplift"] is None
    assert rep["arms"]["empty"]["ctr"]["value"] is None
    assert rep["arms"]["empty"]["uplift"]["ctr"]["sequential"]["lo"] is None
    assert rep["arms"]["empty"]["decision"]["ctr"] == "keep running"
    up = rep["arms"]["deepfm"]["uplift"]["ctr"]
    assert up["value"] == pytest.approx(ctr_uplift(arms["deepfm"], arms["lr"]).value)
    assert rep["srm"]["flagged"]
    text = format_report(rep, title="total")
    print(text)
    assert "SAMPLE RATIO MISMATCH" in text and "(control)" in text
    assert all(name in text for name in arms)

    balanced = report({"lr": arms["lr"], "deepfm": arms["lr"]}, "lr", {"lr": 1, "deepfm": 1})
    assert "SAMPLE RATIO MISMATCH" not in format_report(balanced)
    assert "Sample ratio: OK" in format_report(balanced)
    with pytest.raises(ValueError, match="control"):
        report(arms, control="nope", weights={"lr": 1, "deepfm": 1, "empty": 1})
