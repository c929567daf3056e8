"""loadtest/bench_training.py: the harness in --quick mode (ctrserve only: CI has no peers'
environment), the skip of the peers' runners without .venv-peers, and the summary's arithmetic.

The peers themselves (loadtest/peers/setup.sh) run here only with CTRSERVE_TEST_PEERS=1 and
.venv-peers present: they take longer than this file's budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ctrserve.loadtest import bench_training as bt

REPO = Path(__file__).resolve().parents[1]

SUMMARY_KEYS = {"dataset", "library", "label", "model", "auc", "auc_std", "logloss",
                "logloss_std", "samples_per_second", "samples_per_second_std",
                "fastest_epoch_samples_per_second", "peak_rss_mb",
                "epochs_run", "best_epoch", "parameters", "seeds"}
RESULT_KEYS = {"benchmark", "quick", "created_at", "command", "machine", "settings", "seeds",
               "datasets", "libraries", "summary", "targets", "skipped", "failed", "runs",
               "table"}


def movielens_root() -> Path:
    """The shared real datasets: $CTR_DATA_DIR, else ../shared/datasets beside the checkout."""
    env = os.environ.get("CTR_DATA_DIR")
    root = Path(env) if env else REPO.parent / "shared" / "datasets"
    if not (root / "movielens-100k").is_dir():
        pytest.skip("MovieLens-100k is absent (set CTR_DATA_DIR to the shared datasets folder)")
    return root


def read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_quick_ctrserve_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = movielens_root()
    out = tmp_path / "out"
    code = bt.main(["--quick", "--datasets", "movielens", "--seeds", "5,6",
                    "--libraries", "ctrserve-deepfm,fuxictr,deepctr-torch",
                    "--peers-python", str(tmp_path / "no-peers" / "bin" / "python"),
                    "--data-dir", str(root), "--out", str(out)])
    assert code == 0
    result, table = read(out)
    assert set(result) >= RESULT_KEYS
    assert result["quick"] is True and result["seeds"] == [5]  # --quick: one seed
    assert result["settings"]["epochs"] == 1
    assert result["settings"]["embedding_dim"] == 16
    assert result["settings"]["mlp"] == [400, 400, 400]
    assert result["settings"]["batch_size"] == 1024
    assert result["failed"] == []
    [row] = result["summary"]
    assert set(row) >= SUMMARY_KEYS
    assert row["library"] == "ctrserve-deepfm" and row["seeds"] == 1
    assert 0.0 < row["auc"] < 1.0 and row["logloss"] > 0 and row["samples_per_second"] > 0
    assert row["peak_rss_mb"] > 50  # a python with torch imported, read by os.wait4
    [run] = result["runs"]
    assert run["checks"] == {"same_test_labels": True, "same_encoder": True}
    assert run["test"]["rows"] == bt.QUICK_ROWS["test"]
    assert result["datasets"]["movielens"]["rows"] == bt.QUICK_ROWS
    assert not result["targets"]["movielens"]["evaluated"]  # no peer ran
    # the peers were skipped, with a message that says how to get them
    assert {s["library"] for s in result["skipped"]} == {"fuxictr", "deepctr-torch"}
    assert all("loadtest/peers/setup.sh" in s["reason"] for s in result["skipped"])
    assert "skipping fuxictr, deepctr-torch: no peers environment" in capsys.readouterr().err
    assert table.startswith("| dataset | library | model | test AUC | test logloss |")
    assert "| movielens | ctrserve | DeepFM |" in table
    assert "skipped fuxictr: no peers environment" in table
    assert "--quick: smoke only" in table
    # the report rebuilt from results.json alone is the same
    assert bt.main(["--report-only", "--out", str(out)]) == 0
    assert read(out)[1] == table


def test_peers_skipped_without_their_environment(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture):
    """Only peers asked for and no .venv-peers: nothing is read, the report says why."""
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "out"
    code = bt.main(["--quick", "--libraries", "fuxictr,deepctr-torch", "--data-dir", str(empty),
                    "--peers-python", str(tmp_path / ".venv-peers" / "bin" / "python"),
                    "--out", str(out)])
    assert code == 0
    result, table = read(out)
    assert result["runs"] == [] and result["summary"] == []
    assert [s["library"] for s in result["skipped"]] == ["fuxictr", "deepctr-torch"]
    err = capsys.readouterr().err
    assert "no peers environment at" in err and "bash loadtest/peers/setup.sh" in err
    assert "skipped deepctr-torch" in table


def test_summary_targets_and_table() -> None:
    def run(library: str, seed: int, auc: float, sps: float) -> dict:
        return {"dataset": "movielens", "library": library, "seed": seed,
                "test": {"auc": auc, "logloss": 0.6}, "samples_per_second": sps,
                "peak_rss_mb": 500.0 + seed, "epochs_run": 3, "best_epoch": 1,
                "parameters": 10, "curve": [{"samples": 1000, "seconds": 1000 / sps},
                                            {"samples": 1000, "seconds": 500 / sps}]}

    runs = [run("ctrserve-deepfm", 1, 0.709, 3000), run("ctrserve-deepfm", 2, 0.711, 5000),
            run("fuxictr", 1, 0.712, 2000), run("fuxictr", 2, 0.712, 2000),
            run("deepctr-torch", 1, 0.705, 5000), run("deepctr-torch", 2, 0.707, 3000),
            {"dataset": "movielens", "library": "deepctr-torch", "seed": 3, "error": "x"}]
    libs = ["ctrserve-deepfm", "fuxictr", "deepctr-torch"]
    summary = bt.summarize(runs, ["movielens"], libs)
    ours = summary[0]
    assert ours["auc"] == pytest.approx(0.710) and ours["auc_std"] == pytest.approx(0.001414, 1e-3)
    assert ours["peak_rss_mb"] == 502.0 and summary[2]["seeds"] == 2  # the failed run left out
    t = bt.targets(summary, ["movielens"])["movielens"]
    assert t["best_peer"] == "FuxiCTR" and t["auc_gap_to_best_peer"] == pytest.approx(-0.002)
    assert t["auc_target_met"] is True  # within 0.002 counts
    assert t["fastest_peer"] == "DeepCTR-Torch"
    assert t["speed_ratio_to_fastest_peer"] == pytest.approx(1.0) and t["speed_target_met"]
    assert ours["fastest_epoch_samples_per_second"] == pytest.approx(10_000)
    assert t["speed_ratio_fastest_epochs"] == pytest.approx(1.0)
    result = {"summary": summary, "targets": {"movielens": t}, "skipped": [], "failed": [],
              "machine": {"cores": 2, "cpu": "x", "load_before": [1.0], "load_after": [2.0]},
              "settings": {"threads": 2}, "quick": False}
    table = bt.markdown(result)
    assert "| movielens | FuxiCTR | DeepFM | 0.7120 ± 0.0000 |" in table
    assert "target >= -0.002: met" in table and "target >= x1.00: met" in table


@pytest.mark.skipif(os.environ.get("CTRSERVE_TEST_PEERS") != "1",
                    reason="peers' runners take ~1 min: set CTRSERVE_TEST_PEERS=1 (and run "
                           "loadtest/peers/setup.sh) to include them")
def test_quick_with_peers(tmp_path: Path) -> None:
    if not bt.DEFAULT_PEERS_PYTHON.is_file():
        pytest.skip(f"no peers environment at {bt.DEFAULT_PEERS_PYTHON}: "
                    "run bash loadtest/peers/setup.sh")
    root = movielens_root()
    out = tmp_path / "out"
    code = bt.main(["--quick", "--datasets", "movielens", "--data-dir", str(root),
                    "--libraries", "ctrserve-deepfm,fuxictr,deepctr-torch", "--out", str(out)])
    assert code == 0
    result, _ = read(out)
    assert {r["library"] for r in result["summary"]} == {"ctrserve-deepfm", "fuxictr",
                                                         "deepctr-torch"}
    assert result["targets"]["movielens"]["evaluated"]
    params = {r["library"]: r["parameters"] for r in result["summary"]}
    # the same DeepFM: equal up to a bias term
    assert max(params.values()) - min(params.values()) <= 1
