"""loadtest.bench_overload --quick: both scorers answer, every cell carries its figures."""

from __future__ import annotations

import json

from ctrserve.loadtest.bench_overload import main
from tests.serving import copy_registry


def test_quick_overload_run_measures_both_scorers(bundles, synth_dir, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry", models=("deepfm",))
    out = tmp_path / "overload.json"
    assert main(["--quick", "--registry", str(registry), "--features", str(synth_dir),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    modes = {c["mode"] for c in result["cells"]}
    assert modes == {"admission", "no-admission"}
    open_loop = [c for c in result["cells"] if c["load"] != "closed"]
    assert {c["mode"] for c in open_loop} == modes
    for cell in result["cells"]:
        assert cell["sent"] > 0 and cell["ok"] > 0 and cell["p99_ms"] is not None
    for cell in open_loop:
        assert cell["rate"] == round(cell["load"] * cell["saturation_per_s"], 1)
    assert set(result["targets"]) == {"goodput_ratio", "p99_ms"}
