"""loadtest/suite.py and loadtest/bench_serving.py in --quick mode: the commands work and write
what they promise. Their figures are smoke-run figures; nothing here asserts a speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrserve.loadtest import bench_serving, suite
from tests.conftest import shared_datasets

SIZES = {10, 100, 500, "mixed"}


@pytest.fixture(scope="module")
def quick_suite(bundles, synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    argv = ["--registry", str(bundles["deepfm"].parent), "--features", str(synth_dir),
            "--quick", "--out", str(out), "--parts", "serving"]
    assert suite.main(argv) == 0
    return out


def test_serving_cells_cover_every_scenario(quick_suite):
    result = json.loads((quick_suite / "serving.json").read_text())
    cells = result["cells"]
    assert {c["candidates"] for c in cells} == SIZES
    assert {(c["mode"], c["concurrency"]) for c in cells} == {
        (m, c) for m in ("batched", "unbatched") for c in (1, 16)}
    for c in cells:
        assert c["requests"] > 0 and c["errors"] == 0, c
        assert c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"] <= c["max_ms"]
        assert c["candidates_per_s"] == pytest.approx(
            c["requests_per_s"] * c["candidates_per_request"], rel=0.01)
        assert c["ratio_to_ort_limit"] == pytest.approx(
            c["candidates_per_s"] / result["ort_limit"]["best_rows_per_s"], abs=1e-3)
    assert result["ort_limit"]["best_rows_per_s"] > 0


def test_open_loop_cell_runs_at_the_asked_rate(quick_suite):
    result = json.loads((quick_suite / "serving.json").read_text())
    slo = result["at_fraction_of_peak"]
    peak = max(c["requests_per_s"] for c in result["cells"]
               if c["mode"] == "batched" and c["candidates"] == 100)
    assert slo["peak_requests_per_s"] == peak
    assert slo["target_rate_per_s"] == pytest.approx(0.7 * peak, rel=1e-3)
    assert slo["errors"] == 0 and slo["shed"] == 0
    # open loop: request i is due at i / rate whatever the replies, so the client sends exactly
    # rate x duration requests, and every one was answered (none failed, none was shed)
    rate = bench_serving.SLO_LOAD * peak
    assert slo["requests"] == int(rate * bench_serving.QUICK["duration"])
    # the achieved rate: never above the schedule (the last request is due at (n - 1) / rate);
    # below it only by how long the replies took on these shared cores, not absurdly so
    n = slo["requests"]
    assert slo["requests_per_s"] <= rate * n / (n - 1) + 0.1
    assert slo["requests_per_s"] >= 0.2 * rate, "the open-loop client fell far behind"


def test_targets_are_evaluated_where_their_cells_ran(quick_suite):
    summary = json.loads((quick_suite / "suite.json").read_text())
    targets = summary["targets"]["serving"]
    serving = summary["serving"]
    # each target is met exactly when its value, taken from the cells, reaches its goal
    ceiling = targets["ceiling_ratio"]
    assert ceiling["value"] == max(c["ratio_to_ort_limit"] for c in serving["cells"]
                                   if c["mode"] == "batched" and c["candidates"] == 100)
    assert (ceiling["goal"], ceiling["at_least"]) == (bench_serving.TARGET_CEILING_RATIO, True)
    assert ceiling["met"] is (ceiling["value"] >= ceiling["goal"])
    p99 = targets["p99_at_load_ms"]
    assert p99["value"] == serving["at_fraction_of_peak"]["p99_ms"]
    assert (p99["goal"], p99["at_least"]) == (bench_serving.SLO_P99_MS, False)
    assert p99["met"] is (p99["value"] < p99["goal"])
    # quick mode has no 64-client cell: the batching target says so instead of guessing
    assert targets["batching_speedup"]["value"] is None
    assert targets["batching_speedup"]["met"] is None
    assert "not in this run" in targets["batching_speedup"]["reason"]


def test_markdown_names_command_and_every_cell(quick_suite):
    md = (quick_suite / "suite.md").read_text()
    assert "python -m ctrserve.loadtest.suite" in md and "--quick" in md
    assert "smoke only" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 16 + 1  # header, 4 sizes x 2 clients x 2 modes, the open-loop cell
    assert "Not run: not among --parts." in md


def test_render_only_rewrites_the_readme_block(quick_suite, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{suite.BEGIN}\nold figures\n{suite.END}\nafter\n")
    assert suite.main(["--render-only", "--out", str(quick_suite), "--parts", "serving",
                       "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{suite.END}\nafter\n")
    block = text.split(suite.BEGIN)[1].split(suite.END)[0]
    assert block.strip() == (quick_suite / "suite.md").read_text().strip()
    assert "--render-only" not in block  # it names the command that measured


def test_quick_refuses_readme_and_unmarked_readme_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        suite.main(["--quick", "--registry", str(tmp_path), "--readme", "README.md"])
    assert exc.value.code == 2 and "--quick" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="suite:begin"):
        suite.write_readme(readme, "x\n")


@pytest.mark.skipif(shared_datasets() is None,
                    reason="MovieLens-100k and Frappe are absent (set CTR_DATA_DIR)")
def test_training_part_quick(tmp_path):
    out = tmp_path / "suite"
    assert suite.main(["--quick", "--parts", "training", "--out", str(out),
                       "--data-dir", str(shared_datasets()),
                       "--peers-python", str(tmp_path / "no-peers" / "python")]) == 0
    summary = json.loads((out / "suite.json").read_text())
    assert {s["library"] for s in summary["training"]["skipped"]} == {"fuxictr", "deepctr-torch"}
    assert set(summary["targets"]["training"]) == {"movielens", "frappe"}
    md = (out / "suite.md").read_text()
    assert "| movielens | ctrserve | DeepFM |" in md and "skipped fuxictr" in md
