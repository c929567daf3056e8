"""Data-parallel training (torchrun, gloo, two CPU processes) matches one process closely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ctrserve.training.evaluate import predict
from ctrserve.training.run_dir import load_run
from tests.conftest import SMALL_MODEL_FLAGS, train_cli


def test_two_process_ddp_matches_single_process(synth_dir: Path, tmp_path: Path):
    # one process with batch 512 takes the same steps as two processes with 256 rows each
    single = tmp_path / "single"
    assert train_cli(synth_dir, single, "deepfm", "--epochs", "1", "--batch-size", "512") == 0
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ctrserve", "train", "--model", "deepfm", "--data", f"synth:{synth_dir}",
           "--out", str(ddp), "--epochs", "1", *SMALL_MODEL_FLAGS, "--batch-size", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    info = json.loads((ddp / "run.json").read_text())
    assert info["world_size"] == 2
    a, b = load_run(single), load_run(ddp)
    rows = a.parity_inputs()
    diff = np.abs(predict(a.load_model(), rows) - predict(b.load_model(), rows)).max()
    assert diff < 2e-3, f"DDP and single-process predictions differ by {diff}"
    auc_a = json.loads((single / "run.json").read_text())["metrics"]["test"]["auc"]
    assert abs(info["metrics"]["test"]["auc"] - auc_a) < 2e-3
