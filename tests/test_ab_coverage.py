"""The coverage harness (loadtest/ab_coverage.py) in small: bounds on the A/B statistics that fail
when the always-valid interval stops being valid under daily looks, or stops being needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest import ab_coverage
from loadtest.ab_coverage import Config, run, user_sums
from service.experiments.stats import ArmStats

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


def test_targets_are_reported(result) -> None:
    targets = result["targets"]
    assert set(targets) == {f"{m}_sequential_{t}" for m in ("ctr", "cvr")
                            for t in ("fpr_daily_looks", "coverage_every_look")}
    assert all(t["met"] == (t["value"] <= 0.05 if "fpr" in name else t["value"] >= 0.95)
               for name, t in targets.items())
    assert result["seconds"] < 20


def test_user_sums_are_from_user_arrays() -> None:
    rng = np.random.default_rng(1)
    x = rng.geometric(0.05, (3, 50))
    y = rng.binomial(x, 0.05)
    mask = rng.random((3, 50)) < 0.5
    sums = user_sums(x, y, mask)
    for row in range(3):
        expected = ArmStats.from_user_arrays(x[row][mask[row]], y[row][mask[row]])
        assert ArmStats(*sums[row].tolist()) == expected


def test_cli_writes_json_and_prints_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "cov.json"
    argv = ["--experiments", "20", "--days", "3", "--seed", "5", "--out", str(out)]
    assert ab_coverage.main(argv) == 0
    printed = capsys.readouterr().out
    assert "sequential" in printed and "FPR 3 looks" in printed and str(out) in printed
    first = json.loads(out.read_text())
    assert first["config"]["experiments"] == 20 and first["config"]["tuned_for_units"] == 2400
    assert len(first["results"]["ctr"]["fixed"]["coverage_by_look"]) == 3
    ab_coverage.main(argv)  # the same seed gives the same figures
    second = json.loads(out.read_text())
    assert {k: v for k, v in first.items() if k != "seconds"} == \
        {k: v for k, v in second.items() if k != "seconds"}
