"""What every training runner shares: the job file, the exported split, the result files.

Imported by `run_fuxictr.py` and `run_deepctr.py` (run with .venv-peers/bin/python, where
ctrserve is not installed: this module needs numpy and the standard library only) and by
`run_ctrserve.py`. A runner is called as `RUNNER JOB.json`; the job names the exported split
(one .npz per split: a column per field, multi-valued fields as [rows, max_len] id arrays,
and `label`), the field layout, the matched settings, and the folder for the results:
`predictions.npy` (test click probabilities, in test-row order) and `result.json`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FILE, PREDICTIONS_FILE = "result.json", "predictions.npy"


def load_job(argv: list[str] | None = None) -> dict[str, Any]:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} JOB.json")
    return json.loads(Path(args[0]).read_text())


def load_split(job: dict[str, Any], split: str) -> dict[str, np.ndarray]:
    with np.load(job["data"][split]) as data:
        return {k: data[k] for k in data.files}


def field_names(job: dict[str, Any]) -> list[str]:
    fields = job["fields"]
    return [name for name, _ in fields["categorical"]] + [name for name, _ in fields["multi"]]


def peak_rss_mb() -> float:
    """This process's own peak resident set size (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochClock:
    """Training seconds per epoch with evaluation taken out (the `samples/s` of every library
    is training rows over training seconds, validation passes excluded)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._start = 0.0
        self._eval = 0.0

    def begin(self) -> None:
        self._start, self._eval = time.perf_counter(), 0.0

    def add_eval(self, seconds: float) -> None:
        self._eval += seconds

    def end(self, samples: int, valid_auc: float | None) -> None:
        seconds = time.perf_counter() - self._start - self._eval
        self.epochs.append({"epoch": len(self.epochs) + 1, "seconds": seconds,
                            "samples": samples, "valid_auc": valid_auc,
                            "eval_seconds": self._eval})

    def summary(self) -> dict[str, Any]:
        seconds = sum(e["seconds"] for e in self.epochs)
        samples = sum(e["samples"] for e in self.epochs)
        aucs = [e["valid_auc"] for e in self.epochs]
        best = (1 + max(range(len(aucs)), key=lambda i: aucs[i])
                if aucs and None not in aucs else None)
        return {"train_seconds": seconds, "train_samples": samples,
                "samples_per_second": samples / seconds if seconds > 0 else float("nan"),
                "epochs_run": len(self.epochs), "best_epoch": best, "curve": self.epochs}


def write_result(job: dict[str, Any], predictions: np.ndarray, result: dict[str, Any]) -> None:
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / PREDICTIONS_FILE, np.asarray(predictions, dtype=np.float64).reshape(-1))
    result = {**result, "peak_rss_mb_self": peak_rss_mb(), "pid": os.getpid(),
              "python": platform.python_version()}
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1, default=str))
