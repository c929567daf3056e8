"""The README's main command and the model comparison, end to end on small data."""

from __future__ import annotations

import json
from pathlib import Path

from ctrserve.cli import main
from ctrserve.training.retrain import Gate
from tests.conftest import SMALL_MODEL_FLAGS


def test_demo_trains_exports_serves_retrains_and_reports(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--days", "3", "--impressions-per-day", "3000",
            "--epochs", "1", "--models", "lr,deepfm", "--ab-days", "3",
            "--ab-requests-per-day", "150", "--once", "--port", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test AUC" in out and "deepfm" in out
    # the demo prints tables and where its results are, not their JSON
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert f"results: {tmp_path / 'demo.json'}, {tmp_path / 'ab_test.json'}" in out
    assert "the scorer has stopped (--once)" in out
    assert [m["model"] for m in summary["models"]] == ["lr", "deepfm"]
    for row in summary["models"]:
        assert (tmp_path / "registry").joinpath(row["bundle"].split("/")[-1]).is_dir()
        assert row["parity"] <= 1e-5 and 0 < row["test_auc"] < 1
    ab = json.loads((tmp_path / "ab_test.json").read_text())
    assert summary["ab_test"] == str(tmp_path / "ab_test.json")
    assert "CTR uplift" in out and "Sample ratio" in out and "true CTR over the days" in out
    assert "/dashboard/ranker" in out and "until Ctrl-C" not in out
    days = ab["days"]
    assert len(days) == 3 and all(d["failed_requests"] == 0 for d in days)
    # the retrain runs once two days are logged (base data mixed in), not after the last day
    assert ["retrains" in d for d in days] == [False, True, False]
    assert set(days[1]["retrains"]) == {"lr", "deepfm"}
    for arm, decision in days[1]["retrains"].items():
        assert_gate_decided_by_its_rule(tmp_path / "registry", arm, decision)
    arms = ab["report"]["total"]["arms"]
    assert set(arms) == {"lr", "deepfm"}
    assert sorted(ab["report"]["days"]) == [d["day"] for d in days]  # the simulated days
    for d in days:
        served = ab["report"]["days"][d["day"]]["arms"]
        assert {a: served[a]["impressions"] for a in arms} == {
            a: d["arms"][a]["impressions"] for a in arms}
    for arm in arms:  # the scorer counted what the client reported, across the swaps
        assert arms[arm]["impressions"] == sum(d["arms"][arm]["impressions"] for d in days)
        assert arms[arm]["downloads"] == sum(d["arms"][arm]["downloads"] for d in days)

    # two days served by LR alone came first: CUPED's pre-period, read from the drained logs
    assert out.count("requests served by experiment baseline") == 2
    assert main(["analyze", "--experiment", "ranker", "--logs", str(tmp_path / "events"),
                 "--pre-days", "2", "--registry", str(tmp_path / "registry"), "--json"]) == 0
    logs = json.loads(capsys.readouterr().out)
    assert logs["cuped"]["pre_days"] == 2 and logs["cuped"]["start"] == days[0]["day"]
    returning = sum(a["users_with_pre_period"] for a in logs["cuped"]["arms"].values())
    assert 0 < returning <= sum(a["users"] for a in logs["cuped"]["arms"].values())
    cuped = logs["total"]["arms"]["deepfm"]["uplift"]["ctr"]["cuped"]
    assert cuped["users_with_pre_period"] > 0 and cuped["variance_reduction"] is not None


def assert_gate_decided_by_its_rule(registry: Path, arm: str, decision: dict) -> None:
    """The demo retrains with the default gate: the challenger is deployed exactly when its
    held-out AUC, logloss and calibration (the run record's) pass the gate's rule, and each
    reason to reject names a rule the figures break."""
    assert decision["decision"] in ("deployed", "rejected"), (arm, decision)
    (path,) = (registry / ".retrain").glob(f"ranker--{arm}--*.json")
    record = json.loads(path.read_text())
    challenger, champion = record["metrics"]["challenger"], record["metrics"]["champion"]
    assert (decision["challenger_auc"], decision["champion_auc"]) == (
        challenger["auc"], champion["auc"])
    assert 0 < challenger["auc"] < 1 and 0 < champion["auc"] < 1
    gate = Gate()  # the demo's: RetrainOptions' default
    low, high = gate.calibration_bounds
    broken = {"AUC": challenger["auc"] < champion["auc"] - gate.auc_tolerance,
              "logloss": challenger["logloss"] > champion["logloss"] + gate.logloss_tolerance,
              "calibration": not low <= challenger["calibration"] <= high}
    reasons = decision["reasons"]
    assert reasons == record["gate"]["reasons"]
    for rule, is_broken in broken.items():
        assert any(r.startswith(rule) for r in reasons) == is_broken, (arm, rule, record)
    assert all(r.split()[0] in (*broken, "export") for r in reasons), reasons
    assert (decision["decision"] == "deployed") == (not reasons), (arm, record)
    if decision["decision"] == "deployed":
        bundle = registry / record["challenger"]["bundle"]
        assert json.loads((bundle / "manifest.json").read_text())["version"] == decision[
            "version"]


def test_compare_writes_mean_and_spread_over_seeds(synth_dir, tmp_path, capsys):
    argv = ["compare", "--models", "lr,fm", "--seeds", "1,2", "--data", f"synth:{synth_dir}",
            "--out", str(tmp_path), "--epochs", "1", "--no-progress", *SMALL_MODEL_FLAGS]
    assert main(argv) == 0
    # without bars, a line per finished run still says where the comparison stands
    lines = [line for line in capsys.readouterr().err.splitlines() if "best epoch" in line]
    assert [line.split(":")[0] for line in lines] == ["lr seed 1", "lr seed 2", "fm seed 1",
                                                      "fm seed 2"]
    result = json.loads((tmp_path / "results.json").read_text())
    names = [s["model"] for s in result["summary"]]
    assert names == ["lr", "fm", "oracle (true probability)"]
    assert result["summary"][2]["auc"] > result["summary"][0]["auc"], "the truth ranks best"
    assert len(result["runs"]) == 4
    lr_runs = [r["test"]["auc"] for r in result["runs"] if r["model"] == "lr"]
    assert result["summary"][0]["auc"] == sum(lr_runs) / 2
    assert result["summary"][0]["auc_std"] > 0, "different seeds give different models"
    table = (tmp_path / "results.md").read_text()
    assert "| calibration | best epoch |" in table
    lr_row = next(line for line in table.splitlines() if line.startswith("| lr |"))
    calibration = sum(r["test"]["calibration"] for r in result["runs"] if r["model"] == "lr") / 2
    assert f"| {calibration:.3f} | 1, 1 |" in lr_row  # one epoch each: the best is the first
