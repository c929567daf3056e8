"""loadtest.bench_overload --quick: both scorers answer, every cell carries its figures, the
cost of a shed is measured, and the client runs on its own core."""

from __future__ import annotations

import json
import os

from ctrserve.loadtest.bench_overload import main
from tests.serving import copy_registry


def test_quick_overload_run_measures_both_scorers(bundles, synth_dir, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry", models=("deepfm",))
    out = tmp_path / "overload.json"
    cores = sorted(os.sched_getaffinity(0))
    pinned = ["--client-cores", "1"] if len(cores) > 1 else []
    assert main(["--quick", "--registry", str(registry), "--features", str(synth_dir),
                 *pinned, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    if pinned:  # the client on the first core, the scorers on the others
        assert result["cores"] == {"client": cores[:1], "scorer": cores[1:]}
    [shed] = result["shed_cost"]  # every request to the scorer with its one slot held: a 503
    assert set(shed["statuses"]) == {"503"} and shed["server_us_per_shed"] > 0
    modes = {c["mode"] for c in result["cells"]}
    assert modes == {"admission", "no-admission"}
    open_loop = [c for c in result["cells"] if c["load"] != "closed"]
    assert {c["mode"] for c in open_loop} == modes
    for cell in result["cells"]:
        assert cell["sent"] > 0 and cell["ok"] > 0 and cell["p99_ms"] is not None
        assert cell["server_cpu_cores"] > 0 and cell["server_ms_per_on_time"] > 0
    for cell in open_loop:
        assert cell["rate"] == round(cell["load"] * cell["saturation_per_s"], 1)
        assert cell["send_lag_p99_ms"] is not None
    assert set(result["targets"]) == {"goodput_ratio", "p99_ms", "client_lagged"}
    lagged = result["targets"]["client_lagged"]
    assert lagged["of"] == sum(c["mode"] == "admission" for c in open_loop)
    assert lagged["cells"] == [f"{c['candidates']}@{c['load']:g}x" for c in open_loop
                               if c["mode"] == "admission"
                               and c["send_lag_p99_ms"] > lagged["send_lag_p99_ms_above"]]
