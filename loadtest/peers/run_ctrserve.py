"""Train ctrserve's DeepFM or APG-DeepFM with training.train.train; write test predictions.

    python -m ctrserve.loadtest.peers.run_ctrserve JOB.json      (ctrserve's own .venv)

Unlike the peers, which read the split the harness exported, this reads the raw dataset with
ctrserve's reader and fits its encoder as `ctrserve train` does; the harness checks that the
fitted encoder and the test labels equal the ones it exported for the peers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ctrserve.loadtest.peers.peer_common import load_job, write_result
from ctrserve.models import ModelConfig
from ctrserve.training.batches import encode_split
from ctrserve.training.evaluate import predict
from ctrserve.training.run_dir import load_run
from ctrserve.training.train import TrainConfig, train


def encoder_digest(encoder) -> str:
    return hashlib.sha256(json.dumps(encoder.to_dict(), sort_keys=True).encode()).hexdigest()


def main() -> None:
    from ctrserve.loadtest.bench_training import open_dataset

    job = load_job()
    s = job["settings"]
    torch.set_num_threads(int(s["threads"]))
    source = open_dataset(job["dataset"], job["source"]["root"], job["source"]["limits"])
    model_cfg = ModelConfig(name=job["model"], embedding_dim=int(s["embedding_dim"]),
                            mlp=tuple(int(w) for w in s["mlp"]))
    train_cfg = TrainConfig(epochs=int(s["epochs"]), batch_size=int(s["batch_size"]),
                            learning_rate=float(s["learning_rate"]), optimizer=s["optimizer"],
                            patience=int(s["patience"]), seed=int(s["seed"]))
    run_dir = Path(job["out"]) / "run"
    info = train(source, model_cfg, train_cfg, run_dir, progress=False)
    run = load_run(run_dir)
    test = encode_split(source, "test", run.encoder)
    predictions = predict(run.load_model(), test)
    curve = json.loads((run_dir / "learning_curve.json").read_text())
    seconds = sum(e["seconds"] for e in curve)
    samples = round(sum(e["samples_per_second"] * e["seconds"] for e in curve))
    np.save(Path(job["out"]) / "test_labels.npy", test.labels)
    write_result(job, predictions, {
        "library": "ctrserve", "model": job["model"], "version": "this checkout",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "parameters": info["parameters"],
        "settings": {**s, "train_config": info["train"], "model_config": info["model"]},
        "encoder_sha256": encoder_digest(run.encoder),
        "train_seconds": seconds, "train_samples": samples,
        "samples_per_second": info["train_samples_per_second"],
        "epochs_run": info["epochs_run"], "best_epoch": info["best_epoch"],
        "curve": [{"epoch": e["epoch"], "seconds": e["seconds"],
                   "samples": round(e["samples_per_second"] * e["seconds"]),
                   "valid_auc": e["valid_auc"]} for e in curve],
        "own_test_metrics": info["metrics"]["test"],
    })


if __name__ == "__main__":
    main()
