"""The README's main command and the model comparison, end to end on small data."""

from __future__ import annotations

import json

from ctrserve.cli import main
from tests.conftest import SMALL_MODEL_FLAGS


def test_demo_trains_exports_serves_retrains_and_reports(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--days", "3", "--impressions-per-day", "3000",
            "--epochs", "1", "--models", "lr,deepfm", "--ab-days", "3",
            "--ab-requests-per-day", "150", "--once", "--port", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test AUC" in out and "deepfm" in out
    printed = json.loads(out[out.index("\n{") + 1:])  # the last thing printed: short
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert printed == summary and len(out[out.index("\n{"):].splitlines()) < 40
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
    for arm, decision in days[1]["retrains"].items():
        assert decision["decision"] in ("deployed", "rejected"), (arm, decision)
        assert decision["challenger_auc"] is not None
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


def test_compare_writes_mean_and_spread_over_seeds(synth_dir, tmp_path):
    argv = ["compare", "--models", "lr,fm", "--seeds", "1,2", "--data", f"synth:{synth_dir}",
            "--out", str(tmp_path), "--epochs", "1", *SMALL_MODEL_FLAGS]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    names = [s["model"] for s in result["summary"]]
    assert names == ["lr", "fm", "oracle (true probability)"]
    assert result["summary"][2]["auc"] > result["summary"][0]["auc"], "the truth ranks best"
    assert len(result["runs"]) == 4
    lr_runs = [r["test"]["auc"] for r in result["runs"] if r["model"] == "lr"]
    assert result["summary"][0]["auc"] == sum(lr_runs) / 2
    assert result["summary"][0]["auc_std"] > 0, "different seeds give different models"
    assert "| lr |" in (tmp_path / "results.md").read_text()
