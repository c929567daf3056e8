"""CUPED (service/experiments/cuped.py and its report entries in stats.py) against known truths.

The simulated users: activity a ~ Exponential, impressions x = 1 + Poisson(a), CTR propensity
p0 ~ Beta(0.5, 9.5), downloads y ~ Binomial(x, p0·(1 + uplift) in the treatment); a share of new
users without a pre-period, the others with 1 + Poisson(a) pre-period impressions and
Binomial(that, p0) downloads. The harness (loadtest/ab_coverage.py) checks coverage over many
daily looks; these tests check the estimator itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from ctrserve.service.experiments import cuped
from ctrserve.service.experiments.cuped import SUM_NAMES, CupedStats
from ctrserve.service.experiments.stats import (
    ArmStats,
    ctr_uplift,
    ctr_uplift_cuped,
    cvr_uplift,
    cvr_uplift_cuped,
    format_report,
    report,
)

SQL = Path(cuped.__file__).with_name("sql") / "cuped_sums.sql"


def users(rng: np.random.Generator, n: int, uplift: float = 0.0, new_share: float = 0.3,
          size: tuple[int, ...] = ()) -> np.ndarray:
    """w = (1, x, y, pre_x, pre_y, has_pre) per user, shape (*size, n, 6)."""
    shape = (*size, n)
    activity = rng.exponential(19.0, shape)
    x = 1 + rng.poisson(activity)
    p0 = rng.beta(0.5, 9.5, shape)
    y = rng.binomial(x, np.minimum(p0 * (1 + uplift), 1.0))
    has_pre = rng.random(shape) >= new_share
    pre_x = np.where(has_pre, 1 + rng.poisson(activity), 0)
    pre_y = rng.binomial(pre_x, p0)
    return np.stack([np.ones(shape), x, y, pre_x, pre_y, has_pre], axis=-1).astype(np.int64)


def stats(w: np.ndarray) -> CupedStats:
    return CupedStats.from_user_arrays(*(w[:, k] for k in range(1, 6)))


def grams(w: np.ndarray) -> np.ndarray:
    wf = w.astype(float)
    return np.swapaxes(wf, -1, -2) @ wf


# ---- the sufficient statistics ------------------------------------------------------------


def test_sums_are_the_gram_matrix_and_add_over_users() -> None:
    w = users(np.random.default_rng(1), 300)
    s = stats(w)
    assert np.array_equal(s.gram(), grams(w))
    assert (s.users, s.x, s.y, s.has_pre) == (300, w[:, 1].sum(), w[:, 2].sum(), w[:, 5].sum())
    assert stats(w[:100]) + stats(w[100:]) == s == CupedStats.total([stats(w[:7]), stats(w[7:])])
    assert CupedStats.from_gram(s.gram().astype(int)) == s
    assert len(SUM_NAMES) == len(set(SUM_NAMES)) == 21


def test_sql_columns_are_the_sums() -> None:
    final_select = SQL.read_text().rsplit("SELECT", 1)[1]
    assert tuple(re.findall(r"AS (\w+)", final_select)) == SUM_NAMES


@pytest.mark.parametrize("bad", [
    {"x": [1, 2], "y": [0]},  # lengths differ
    {"y": [-1, 0]},
    {"pre_x": [0.5, 1]},
    {"has_pre": [2, 0]},
])
def test_user_arrays_are_checked(bad) -> None:
    cols = {"x": [3, 4], "y": [0, 1], "pre_x": [0, 2], "pre_y": [0, 1], "has_pre": [0, 1]}
    with pytest.raises(ValueError):
        CupedStats.from_user_arrays(**{**cols, **bad})
    with pytest.raises(ValueError, match="non-negative integer"):
        CupedStats(*([1] * 20), -1)


# ---- the estimator --------------------------------------------------------------------------


def test_theta_recovers_a_known_regression_coefficient() -> None:
    """E[y | pre-period] = 1.0 for new users and 0.2 + 0.3·pre_y for returning ones, pre_x only
    through pre_y: θ = (pre_impressions 0, pre_downloads 0.3, has_pre_period −0.8)."""
    rng = np.random.default_rng(2)
    n = 200_000
    has_pre = rng.random(n) < 0.6
    pre_y = np.where(has_pre, rng.poisson(4.0, n), 0)
    pre_x = np.where(has_pre, pre_y + 1 + rng.poisson(10.0, n), 0)
    y = rng.poisson(np.where(has_pre, 0.2 + 0.3 * pre_y, 1.0))
    x = y + 1 + rng.poisson(5.0, n)
    arms = [CupedStats.from_user_arrays(x[i::2], y[i::2], pre_x[i::2], pre_y[i::2],
                                        has_pre[i::2].astype(int)) for i in (0, 1)]
    theta = cvr_uplift_cuped(*arms).theta
    assert theta == pytest.approx({"pre_impressions": 0.0, "pre_downloads": 0.3,
                                   "has_pre_period": -0.8}, abs=0.03)
    # and exactly least squares on the values centred within each arm
    z = np.column_stack([pre_x, pre_y, has_pre]).astype(float)
    arm = np.arange(n) % 2
    centred = [v - np.array([v[arm == a].mean(0) for a in (0, 1)])[arm] for v in (z, y)]
    ols = np.linalg.lstsq(centred[0], centred[1], rcond=None)[0]
    assert list(theta.values()) == pytest.approx(ols, rel=1e-6)


def test_ctr_is_regressed_on_its_linearisation() -> None:
    """With the same impressions for every user, the CTR's linearised value is (y − ȳ)/x: its θ
    is the CVR's over x and its variance reduction the same."""
    rng = np.random.default_rng(3)
    w = users(rng, 4000)
    w[:, 1] = 10
    t, c = stats(w[:2000]), stats(w[2000:])
    ctr, cvr = ctr_uplift_cuped(t, c), cvr_uplift_cuped(t, c)
    assert ctr.theta == pytest.approx({k: v / 10 for k, v in cvr.theta.items()}, rel=1e-6)
    assert ctr.variance_reduction == pytest.approx(cvr.variance_reduction, rel=1e-6)


def test_unadjusted_is_the_plain_uplift_of_the_report() -> None:
    rng = np.random.default_rng(4)
    t, c = users(rng, 3000, uplift=0.1), users(rng, 2900)
    plain = {"ctr": ctr_uplift, "cvr": cvr_uplift}
    fitted = {"ctr": ctr_uplift_cuped, "cvr": cvr_uplift_cuped}
    for metric in plain:
        expected = plain[metric](ArmStats.from_user_arrays(t[:, 1], t[:, 2]),
                                 ArmStats.from_user_arrays(c[:, 1], c[:, 2]))
        got = fitted[metric](stats(t), stats(c))
        assert got.unadjusted.value == pytest.approx(expected.value, rel=1e-9)
        assert got.unadjusted.se_log == pytest.approx(expected.se_log, rel=1e-9)
        assert got.units == 5900 and got.users_with_pre_period == t[:, 5].sum() + c[:, 5].sum()


@pytest.mark.parametrize("metric", ["ctr", "cvr"])
def test_adjusted_estimate_is_unbiased_with_the_reported_standard_error(metric) -> None:
    """2,000 A/B experiments of 500 users per arm, true uplift +10%: the CUPED estimates average
    to the truth like the plain ones, and their spread is the standard error it reports."""
    rng = np.random.default_rng(5)
    t = grams(users(rng, 500, uplift=0.1, size=(2000,)))
    c = grams(users(rng, 500, size=(2000,)))
    fit = cuped.fit(t, c, metric)
    truth = 0.1  # the clipping at 1 of p0·1.1 moves it by ~1e-10
    adjusted, plain = np.expm1(fit.log_ratio), np.expm1(fit.plain_log_ratio)
    mc_se = adjusted.std() / np.sqrt(adjusted.size)  # about 0.25 points
    print(metric, "mean plain", plain.mean(), "mean CUPED", adjusted.mean(), "MC se", mc_se)
    assert abs(adjusted.mean() - truth) < 4 * mc_se
    assert abs(adjusted.mean() - plain.mean()) < 4 * mc_se
    assert fit.log_ratio.std() == pytest.approx(np.mean(fit.se_log), rel=0.06)
    measured = 1 - fit.log_ratio.var() / fit.plain_log_ratio.var()
    assert measured == pytest.approx(np.mean(fit.variance_reduction), abs=0.06)
    assert np.mean(fit.variance_reduction) > 0.3


def test_reduction_is_rho_squared_for_a_linear_covariate() -> None:
    """y = pre_y + e with pre_y, e ~ Poisson(5) independent: ρ² = 1/2 (pre_x adds only noise)."""
    rng = np.random.default_rng(6)
    n = 40_000
    pre_y = rng.poisson(5.0, n)
    pre_x = pre_y + 1 + rng.poisson(3.0, n)
    y = pre_y + rng.poisson(5.0, n)
    x = y + 1 + rng.poisson(20.0, n)
    half = n // 2
    arms = [CupedStats.from_user_arrays(x[s], y[s], pre_x[s], pre_y[s], np.ones(half, int))
            for s in (slice(0, half), slice(half, None))]
    got = cvr_uplift_cuped(*arms)
    rho2 = np.corrcoef(y, pre_y)[0, 1] ** 2
    print("reduction", got.variance_reduction, "sample rho^2", rho2)
    assert got.variance_reduction == pytest.approx(rho2, abs=0.01)
    assert got.variance_reduction == pytest.approx(0.5, abs=0.03)
    assert got.theta["pre_downloads"] == pytest.approx(1.0, abs=0.03)


def test_new_users_only_leave_the_plain_estimate() -> None:
    rng = np.random.default_rng(7)
    t, c = users(rng, 800, uplift=0.1, new_share=1.0), users(rng, 800, new_share=1.0)
    for fitted in (ctr_uplift_cuped, cvr_uplift_cuped):
        got = fitted(stats(t), stats(c))
        assert got.uplift == got.unadjusted and got.variance_reduction == 0.0
        assert got.users_with_pre_period == 0 and set(got.theta.values()) == {0.0}


def test_the_reduction_shrinks_with_the_share_of_new_users() -> None:
    rng = np.random.default_rng(8)
    reductions = []
    for share in (0.0, 0.5, 0.9):
        t, c = users(rng, 20_000, new_share=share), users(rng, 20_000, new_share=share)
        reductions.append(cvr_uplift_cuped(stats(t), stats(c)).variance_reduction)
    print("reduction at 0%, 50%, 90% new users", reductions)
    assert reductions[0] > reductions[1] > reductions[2] > 0


def test_undefined_cases_are_nan_not_errors() -> None:
    one = stats(users(np.random.default_rng(9), 1))
    got = ctr_uplift_cuped(one, one)
    assert np.isnan(got.uplift.value) and np.isnan(got.variance_reduction)
    idle = CupedStats.from_user_arrays([0, 0, 0], [0, 0, 0], [1, 0, 2], [0, 0, 1], [1, 0, 1])
    assert np.isnan(ctr_uplift_cuped(idle, idle).uplift.value)  # no impressions: no CTR
    assert np.isnan(cvr_uplift_cuped(idle, idle).uplift.value)  # no downloads: no ratio


# ---- in the report ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_reports() -> tuple[dict, dict]:
    rng = np.random.default_rng(10)
    w = {"lr": users(rng, 2500), "deepfm": users(rng, 2450, uplift=0.15),
         "fm": users(rng, 2480, uplift=0.05)}
    arms = {a: ArmStats.from_user_arrays(v[:, 1], v[:, 2]) for a, v in w.items()}
    weights = dict.fromkeys(w, 1 / 3)
    cuped_stats = {a: stats(v) for a, v in w.items() if a != "fm"}  # fm: no CUPED sums
    return report(arms, "lr", weights), report(arms, "lr", weights, cuped=cuped_stats)


def test_report_adds_cuped_and_changes_nothing_else(two_reports) -> None:
    plain, rep = two_reports
    json.dumps(rep, allow_nan=False)
    assert rep["arms"]["lr"]["uplift"] is None and "cuped" in rep["methods"]
    stripped = json.loads(json.dumps(rep))
    stripped["methods"].pop("cuped")
    for entry in stripped["arms"].values():
        for up in (entry["uplift"] or {}).values():
            up.pop("cuped")
    assert stripped == plain
    for metric in ("ctr", "cvr"):
        up = rep["arms"]["deepfm"]["uplift"][metric]
        got = up["cuped"]
        assert set(got) == {"value", "lo", "hi", "p_value", "se_log", "sequential",
                            "variance_reduction", "units", "users_with_pre_period", "theta",
                            "unadjusted", "pre_period"}
        assert got["unadjusted"]["value"] == pytest.approx(up["value"], rel=1e-9)
        assert got["lo"] < got["value"] < got["hi"] and got["variance_reduction"] > 0.2
        assert got["se_log"] < up["se_log"]
        assert got["sequential"]["lo"] < got["lo"] and got["sequential"]["units"] == 4950
        assert got["pre_period"]["p_value"] > 0.001  # the arms were alike before the start
        missing = rep["arms"]["fm"]["uplift"][metric]["cuped"]  # an arm without sums: n/a
        assert missing["value"] is None and missing["units"] == 2500


def test_format_report_shows_the_cuped_line(two_reports) -> None:
    plain, rep = two_reports
    text = format_report(rep)
    assert "CUPED" not in format_report(plain)
    line = next(ln for ln in text.splitlines() if ln.startswith("  deepfm vs lr: CTR +"))
    assert "always-valid" in line and "variance -" in line and "with a pre-period" in line
    assert "fm vs lr: CTR n/a" in text
