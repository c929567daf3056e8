"""loadtest.bench_state --quick against Debian's redis-server: the figures it reports are sane."""

from __future__ import annotations

import json

from ctrserve.loadtest.bench_state import main
from tests.serving import copy_registry


def test_quick_run_reports_positive_entries_and_bounded_bytes_per_request(bundles, tmp_path,
                                                                         redis_binaries):
    registry = copy_registry(bundles, tmp_path / "registry", models=("deepfm",))
    assert main(["--quick", "--registry", str(registry), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "bench_state.json").read_text())
    assert result["traffic"]["errors"] == 0, result["traffic"]
    assert result["traffic"]["events"]["accepted"] > 0
    entries = result["per_entry"]
    assert set(entries) == {"dedup_entry", "user_day", "user_total", "serve_entry",
                            "event_entry", "day_sums"}
    assert all(v is not None and v > 0 for v in entries.values()), entries
    # the quick run is noisy; the full run's figure is the one to quote
    assert 0 < result["per_request"]["used_memory"] < 1000
    assert {row["dedup_window_s"] for row in result["capacity"]} == {3600, 6 * 3600}
