"""The coverage harness (loadtest/ab_coverage.py) in small: bounds on the A/B statistics that fail
when the always-valid interval stops being valid under daily looks, or stops being needed, and
when CUPED stops covering the truth or stops reducing the variance; and its spot check through
the real counting path (the event script into an embedded Redis, the report read back), which
fails when one count or figure of the report differs from the harness's."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ctrserve.loadtest import ab_coverage
from ctrserve.loadtest.ab_coverage import (
    Config,
    World,
    arm_stats,
    format_table,
    json_diff,
    run,
    user_grams,
    user_vectors,
)
from ctrserve.service.experiments.cuped import CupedStats
from ctrserve.service.experiments.stats import ArmStats

EXPERIMENTS = 200  # of each kind; a 5% rate has a Monte Carlo standard error of 1.5 points


@pytest.fixture(scope="module")
def result() -> dict:
    return run(Config(experiments=EXPERIMENTS, days=14, seed=7))


@pytest.mark.parametrize("metric", ["ctr", "cvr"])
def test_sequential_interval_survives_daily_looks(result, metric) -> None:
    seq, fixed = result["results"][metric]["sequential"], result["results"][metric]["fixed"]
    print(metric, "A/A FPR over 14 looks: fixed", fixed["fpr"]["any_look"],
          "sequential", seq["fpr"]["any_look"])
    assert seq["fpr"]["any_look"] <= 0.08  # target 5%, +2 Monte Carlo standard errors
    assert fixed["fpr"]["any_look"] >= 0.12  # peeking at the fixed interval: ~23%
    assert fixed["fpr"]["any_look"] > seq["fpr"]["any_look"] + 0.08
    assert seq["coverage_min_look"] >= 0.92
    assert seq["coverage_all_looks"] >= 0.92
    assert seq["aa_coverage_min_look"] >= 0.92


@pytest.mark.parametrize("metric", ["ctr", "cvr"])
def test_fixed_interval_is_right_once_and_sequential_pays_in_power(result, metric) -> None:
    seq, fixed = result["results"][metric]["sequential"], result["results"][metric]["fixed"]
    assert 0.90 <= fixed["coverage_end"] <= 0.99
    assert fixed["fpr"]["end"] <= 0.10
    assert fixed["coverage_all_looks"] < seq["coverage_all_looks"]
    # +10% is found at day 14 by the fixed test more often than by the always-valid one
    assert fixed["power"]["end"] >= 0.4
    assert 0.1 <= seq["power"]["end"] < fixed["power"]["end"]
    assert seq["power"]["any_look"] >= seq["power"]["end"]


def test_srm_check_rarely_false_alarms(result) -> None:
    assert result["srm"]["experiments"] == 2 * EXPERIMENTS
    assert result["srm"]["end"] <= 0.01
    assert result["srm"]["any_look"] <= 0.04  # true rate 0.7% (14 correlated looks at 0.1%)


@pytest.mark.parametrize("metric", ["ctr", "cvr"])
def test_cuped_covers_the_truth_and_reduces_the_variance(result, metric) -> None:
    by = result["results"][metric]
    cuped, plain, red = by["cuped"], by["fixed"], by["variance_reduction"]
    print(metric, "coverage at the end: plain", plain["coverage_end"], "CUPED",
          cuped["coverage_end"], "variance reduction reported", red["reported_end"],
          "measured", red["measured_end"])
    assert cuped["coverage_end"] >= 0.92 and cuped["coverage_min_look"] >= 0.90
    assert cuped["fpr"]["end"] <= 0.10 and cuped["aa_coverage_min_look"] >= 0.90
    seq = by["cuped_sequential"]
    assert seq["coverage_min_look"] >= 0.92 and seq["fpr"]["any_look"] <= 0.08
    # 30% new users, the rest with a pre-period of the same propensity and activity: ~45%
    assert 0.3 <= red["reported_end"] <= 0.6
    assert min(red["reported_by_look"]) > 0.3
    assert abs(red["measured_end"] - red["reported_end"]) < 0.12  # 200 experiments: noisy
    assert cuped["power"]["end"] > plain["power"]["end"] + 0.1
    est = by["estimate_end"]  # unbiased: the mean of 200 estimates, se about 0.5 points
    assert abs(est["cuped_mean"] - est["true"]) < 0.015
    assert abs(est["cuped_mean"] - est["plain_mean"]) < 0.015


def test_cuped_without_any_pre_period_is_the_plain_estimate() -> None:
    res = run(Config(experiments=40, days=3, seed=3, world=World(new_share=1.0)))
    for metric in ("ctr", "cvr"):
        by = res["results"][metric]
        assert by["variance_reduction"]["reported_by_look"] == [0.0, 0.0, 0.0]
        assert by["variance_reduction"]["measured_end"] == pytest.approx(0.0, abs=1e-9)
        assert by["cuped"]["coverage_by_look"] == by["fixed"]["coverage_by_look"]
        assert by["cuped_sequential"]["coverage_by_look"] == \
            by["sequential"]["coverage_by_look"]


def test_targets_are_reported(result) -> None:
    targets = result["targets"]
    assert set(targets) == {f"{m}_{i}_{t}" for m in ("ctr", "cvr")
                            for i in ("sequential", "cuped_sequential")
                            for t in ("fpr_daily_looks", "coverage_every_look")} | {
        f"{m}_cuped_coverage_end" for m in ("ctr", "cvr")}
    assert all(t["met"] == (t["value"] <= 0.05 if "fpr" in name else t["value"] >= t["limit"])
               for name, t in targets.items())
    assert {t["limit"] for name, t in targets.items() if "every_look" in name} == {0.95}
    assert targets["ctr_cuped_coverage_end"]["limit"] == 0.9192  # 95% less 2 MC se at 200
    assert result["seconds"] < 20


def test_true_uplift_accounts_for_the_clipping_at_one() -> None:
    rng = np.random.default_rng(2)
    world = World(control_beta=(0.5, 1.5))  # mean 25%, a fat right tail: clipping matters
    p0 = rng.beta(*world.control_beta, 2_000_000)
    for uplift in (0.1, 1.0, -0.3):
        mc = np.minimum(p0 * (1 + uplift), 1).mean() / p0.mean() - 1
        assert world.true_uplift(uplift) == pytest.approx(mc, abs=2e-3)
    assert world.true_uplift(1.0) < 0.9 and World().true_uplift(0.1) == pytest.approx(0.1)


def test_user_grams_are_the_sums_of_the_report() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((3, 50)) < 0.5
    w = user_vectors(rng, World(), 0.1, mask)
    grams = user_grams(w, mask)
    for row in range(3):
        x, y, pre_x, pre_y, has_pre = (w[row][mask[row]][:, k].astype(int) for k in range(1, 6))
        assert CupedStats.from_gram(grams[row].astype(int)) == \
            CupedStats.from_user_arrays(x, y, pre_x, pre_y, has_pre)
        assert arm_stats(grams[row]) == ArmStats.from_user_arrays(x, y)
    assert set(np.unique(w[..., 5])) <= {0.0, 1.0}
    assert np.all((w[..., 3] > 0) == (w[..., 5] == 1))  # a pre-period has an impression


def test_cli_writes_json_and_prints_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "cov.json"
    argv = ["--experiments", "20", "--days", "3", "--seed", "5", "--out", str(out)]
    assert ab_coverage.main([*argv, "--through-redis", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sequential" in printed and "FPR 3 looks" in printed and str(out) in printed
    assert "cuped sequential" in printed and "day 3" in printed
    assert "Through Redis (coverage-ab-1: 3 looks" in printed
    assert "equals the harness's figures at every look" in printed
    first = json.loads(out.read_text())
    assert first["config"]["experiments"] == 20 and first["config"]["tuned_for_units"] == 2400
    assert len(first["results"]["ctr"]["fixed"]["coverage_by_look"]) == 3
    assert first["through_redis"]["equal"] and first["through_redis"]["looks"] == 3
    ab_coverage.main([*argv, "--through-redis", "0"])  # the same seed gives the same figures,
    second = json.loads(out.read_text())  # with or without the spot check
    assert second["through_redis"] is None and "Through Redis" not in capsys.readouterr().out
    same = {"seconds", "through_redis", "config"}
    assert {k: v for k, v in first.items() if k not in same} == \
        {k: v for k, v in second.items() if k not in same}
    assert {**first["config"], "through_redis": 0} == second["config"]
    with pytest.raises(SystemExit):
        ab_coverage.main(["--experiments", "1", "--through-redis", "3"])


SPOT = Config(experiments=5, days=4, seed=11, world=World(users_per_arm=150), through_redis=2)


def test_spot_check_through_redis_equals_the_harness() -> None:
    """Two experiments (one A/B, one A/A) through the event script into an embedded Redis: the
    report read back equals the harness's at each of the 4 looks, to the count and the bit."""
    spot = run(SPOT)["through_redis"]
    print({k: v for k, v in spot.items() if k != "entry"})
    assert spot["checked"] == ["coverage-ab-1", "coverage-aa-1"] and spot["looks"] == 8
    assert spot["equal"] is True and spot["max_abs_diff"] == 0.0
    assert spot["first_difference"] is None
    assert spot["counted"] == spot["events"] > 0
    # 300 new users a day for 4 days in each, every one with impressions (~20 on average)
    assert spot["users"] == 2 * 4 * 300
    assert spot["users"] + spot["downloads"] == spot["events"]  # one impression event a user
    assert 10 * spot["users"] < spot["impressions"] and spot["downloads"] > 0


def test_spot_check_fails_when_redis_counts_differ(monkeypatch) -> None:
    """One download of each simulated day withheld from Redis: the check says so, and where."""
    real = ab_coverage.day_events

    def one_download_less(*args):
        events = list(real(*args))
        lost = next(i for i, (event, _) in enumerate(events) if event.type == "download")
        return iter(events[:lost] + events[lost + 1:])

    monkeypatch.setattr(ab_coverage, "day_events", one_download_less)
    result = run(replace(SPOT, through_redis=1))
    spot = result["through_redis"]
    assert spot["equal"] is False and spot["max_abs_diff"] >= 1.0
    assert spot["counted"] == spot["events"] > 0  # Redis counted all it was given
    first = spot["first_difference"]
    assert first.startswith("coverage-ab-1 look 1 total.arms.") and ".downloads: Redis " in first
    assert "DIFFERS from the harness's figures" in format_table(result)


def test_json_diff() -> None:
    assert json_diff({"a": [1, None, 0.5]}, {"a": [1, float("nan"), 0.5]})[0] == 0.0
    assert json_diff({"a": 1, "b": 2.0}, {"a": 1, "b": 2.25}, "r") == (0.25, "r.b: Redis 2.0, "
                                                                       "harness 2.25")
    assert json_diff({"a": 1}, {"a": 1, "b": 2})[0] == float("inf")
    assert json_diff({"d": "keep running"}, {"d": "treatment better"})[0] == float("inf")
    assert json_diff({"f": True}, {"f": 1})[0] == float("inf")
    assert json_diff(None, {"users": 3})[0] == float("inf")
    assert json_diff([1, 2], [1, 2, 3])[0] == float("inf")
