"""The suite's overload and workers parts in --quick mode: they run, land in suite.json
with their targets, and their markdown tables carry one row per measured cell."""

from __future__ import annotations

import json

from ctrserve.loadtest import suite
from ctrserve.service.settings import default_workers
from tests.serving import copy_registry


def test_overload_and_workers_parts_write_their_tables(bundles, synth_dir, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry", models=("deepfm",))
    out = tmp_path / "suite"
    assert suite.main(["--registry", str(registry), "--features", str(synth_dir), "--quick",
                       "--out", str(out), "--parts", "overload,workers"]) == 0
    summary = json.loads((out / "suite.json").read_text())
    assert set(summary["targets"]) == {"overload", "workers"}
    assert set(summary["targets"]["overload"]) == {"goodput_ratio", "p99_ms", "client_lagged"}
    # the quick run has no 100-candidate cell: the workers' target is not measured, not met
    assert summary["targets"]["workers"] == {"default_workers_ratio": {
        "target": 0.75, "candidates": 100, "best": None, "met": False}}

    workers = json.loads((out / "workers.json").read_text())
    assert {(c["workers"], c["variant"]) for c in workers["cells"]} == {
        (1, "1"), (default_workers(), "default")}
    best = workers["best_rows_per_s"]
    for cell in workers["cells"]:
        assert cell["requests"] > 0 and cell["errors"] == 0, cell
        assert cell["ratio_to_limit"] == round(cell["candidates_per_s"] / best, 3)

    md = (out / "suite.md").read_text()
    overload_rows = section_rows(md, suite.TITLES["overload"])
    assert len(overload_rows) == 1 + 1  # header, one (candidates, load) cell
    assert overload_rows[1].startswith("| 10 | 2x |")
    workers_rows = section_rows(md, suite.TITLES["workers"])
    # the throughput table (header, one cell), then where a request's CPU went, per variant
    assert len(workers_rows) == 1 + 1 + 1 + 2 and workers_rows[1].startswith("| 10 | 16 |")
    assert [r.split(" | ")[0] for r in workers_rows[3:]] == ["| 1", "| default"]
    for row, cell in zip(workers_rows[3:], workers["cells"], strict=True):
        cpu = cell["cpu_ms_per_request"]
        assert cpu["inference"] > 0 and cpu["scorer_other"] > 0, cell
        assert row.endswith(f"| {cpu['inference']:.3f} | {cpu['scorer_other']:.3f} | "
                            f"{cpu['redis_server']:.3f} |")
    assert "at 100 candidates >= 0.75 of the limit: not measured" in \
        section(md, suite.TITLES["workers"])
    assert "Not run: not among --parts." in section(md, suite.TITLES["serving"])


def section(md: str, title: str) -> str:
    return md.split(f"#### {title}", 1)[1].split("#### ", 1)[0]


def section_rows(md: str, title: str) -> list[str]:
    return [line for line in section(md, title).splitlines()
            if line.startswith("| ") and "---" not in line]
