"""Train DeepCTR-Torch's DeepFM on the exported split; write test predictions and timing.

    .venv-peers/bin/python loadtest/peers/run_deepctr.py JOB.json

DeepCTR-Torch's own pieces throughout: SparseFeat / VarLenSparseFeat feature columns, its
DeepFM, and its BaseModel.fit loop (DataLoader over a TensorDataset, shuffled) with its
EarlyStopping callback on the validation AUC that `fit` computes after every epoch.

Inputs are our encoder's ids: categorical fields as SparseFeat, the multi-valued field as a
VarLenSparseFeat with combiner "mean" (DeepCTR-Torch masks ids == 0, our padding), in both the
linear and the deep/FM part, as the library does for a varlen feature.

Shims, here and not in site-packages:
- `deepctr_torch/__init__.py` starts a thread that asks pypi.python.org for the latest version
  on import; a stand-in `deepctr_torch.utils` module switches that check off.
- Its EarlyStopping restores the best weights only when patience runs out, not when the last
  epoch is reached first; `RestoreBest` below restores them at the end of training as well,
  so every library is scored at its best validation epoch.
"""

from __future__ import annotations

import sys
import time
import types

sys.modules["deepctr_torch.utils"] = types.SimpleNamespace(check_version=lambda version: None)

import importlib.metadata  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from deepctr_torch.callbacks import Callback, EarlyStopping  # noqa: E402
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat  # noqa: E402
from deepctr_torch.models import DeepFM  # noqa: E402
from peer_common import EpochClock, field_names, load_job, load_split, write_result  # noqa: E402

# DeepCTR-Torch defaults kept as they are (our settings have no counterpart or differ):
LIBRARY_DEFAULTS = {
    "init_std": 1e-4,  # normal init of embeddings and of the DNN weights
    "loss_reduction": "sum",  # fit() sums the batch loss (with Adam the scale barely matters)
    "dataloader": "torch DataLoader over a TensorDataset, num_workers 0",
}


class Timing(Callback):
    """Epoch wall time less the validation pass (fit() evaluates inside the epoch)."""

    def __init__(self, clock: EpochClock, samples: int):
        super().__init__()
        self.clock, self.samples = clock, samples

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.begin()

    def on_epoch_end(self, epoch, logs=None):
        self.clock.end(self.samples, float((logs or {}).get("val_auc", float("nan"))))


class RestoreBest(Callback):
    def __init__(self, stopper: EarlyStopping):
        super().__init__()
        self.stopper = stopper

    def on_train_end(self, logs=None):
        if self.stopper.best_weights is not None:
            self.model.load_state_dict(self.stopper.best_weights)


def main() -> None:
    job = load_job()
    s = job["settings"]
    torch.set_num_threads(int(s["threads"]))
    seed = int(s["seed"])
    np.random.seed(seed)
    torch.manual_seed(seed)
    dim = int(s["embedding_dim"])
    columns = [SparseFeat(name, vocabulary_size=int(size), embedding_dim=dim)
               for name, size in job["fields"]["categorical"]]
    columns += [VarLenSparseFeat(SparseFeat(name, vocabulary_size=int(size), embedding_dim=dim),
                                 maxlen=int(job["fields"]["multi_len"]), combiner="mean")
                for name, size in job["fields"]["multi"]]
    names = field_names(job)
    splits = {split: load_split(job, split) for split in ("train", "valid", "test")}
    x = {split: {n: data[n] for n in names} for split, data in splits.items()}
    y = {split: data["label"].astype(np.float32) for split, data in splits.items()}

    model = DeepFM(columns, columns, use_fm=True, dnn_hidden_units=tuple(s["mlp"]),
                   l2_reg_linear=0.0, l2_reg_embedding=0.0, l2_reg_dnn=0.0, dnn_dropout=0.0,
                   dnn_use_bn=False, dnn_activation="relu", seed=seed, task="binary",
                   device="cpu")
    if s["optimizer"] != "adam":
        raise SystemExit(f"run_deepctr.py: optimizer {s['optimizer']!r} not wired up")
    model.compile(torch.optim.Adam(model.parameters(), lr=float(s["learning_rate"])),
                  "binary_crossentropy", metrics=["auc"])

    clock = EpochClock()
    evaluate = model.evaluate

    def timed_evaluate(*args, **kwargs):
        t = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            clock.add_eval(time.perf_counter() - t)

    model.evaluate = timed_evaluate
    stopper = EarlyStopping(monitor="val_auc", mode="max", patience=int(s["patience"]),
                            restore_best_weights=True)
    model.fit(x["train"], y["train"], batch_size=int(s["batch_size"]), epochs=int(s["epochs"]),
              verbose=0, validation_data=(x["valid"], y["valid"]), shuffle=True,
              callbacks=[Timing(clock, len(y["train"])), stopper, RestoreBest(stopper)])
    predictions = model.predict(x["test"], batch_size=int(s["batch_size"]))
    write_result(job, predictions, {
        "library": "deepctr-torch", "model": "DeepFM",
        "version": importlib.metadata.version("deepctr-torch"), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {**s, "loss": "binary_crossentropy", "l2_reg": 0.0, "dropout": 0,
                     "batch_norm": False,
                     "multi_valued": "VarLenSparseFeat, combiner mean (mask ids != 0)"},
        "library_defaults_kept": LIBRARY_DEFAULTS,
        **clock.summary(),
    })


if __name__ == "__main__":
    main()
