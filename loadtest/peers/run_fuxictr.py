"""Train FuxiCTR's DeepFM on the exported split; write test predictions and timing.

    .venv-peers/bin/python loadtest/peers/run_fuxictr.py JOB.json

FuxiCTR's own pieces throughout: its FeatureMap, its NpzDataLoader (through RankDataLoader),
its layers, and its BaseModel.fit loop with its early stopping (monitor AUC, patience, best
checkpoint reloaded at the end). The PyPI wheel ships no model_zoo/DeepFM, so the model below
is put together from the library's layers the way its model zoo's DeepFM is: a
FeatureEmbedding, a FactorizationMachine (first-order LR + pairwise product sum) and an
MLP_Block over the flattened embeddings, output through a sigmoid.

Inputs are our encoder's ids: categorical fields with 0 = unseen (FuxiCTR's padding_idx 0,
a zero vector; our own OOV row is never trained either) and the multi-valued field as a
FuxiCTR "sequence" feature with padding 0 and its default MaskedAveragePooling (mean over the
non-padding ids), max_len as exported.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from fuxictr.features import FeatureMap
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything
from peer_common import EpochClock, load_job, write_result

# FuxiCTR defaults kept as they are (our settings have no counterpart or differ):
LIBRARY_DEFAULTS = {
    "reduce_lr_on_plateau": True,  # lr x 0.1 after each epoch without validation gain
    "max_gradient_norm": 10.0,  # gradient clipping inside train_step
    "linear_init": "xavier_normal (BaseModel.reset_parameters)",
    "embedding_init": "normal(std=1e-4)",
    "num_workers": 1,  # NpzDataLoader's default: one loader process
}


class DeepFM(BaseModel):
    """FuxiCTR's DeepFM (model_zoo/DeepFM) from the library's layers."""

    def __init__(self, feature_map, embedding_dim, hidden_units, learning_rate, **kwargs):
        super().__init__(feature_map, model_id="DeepFM", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fm = FactorizationMachine(feature_map)
        self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                             hidden_units=hidden_units, hidden_activations="ReLU",
                             output_activation=None, dropout_rates=0, batch_norm=False)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        feature_emb = self.embedding_layer(X)
        y_pred = self.fm(X, feature_emb)
        y_pred = y_pred + self.mlp(feature_emb.flatten(start_dim=1))
        return {"y_pred": self.output_activation(y_pred)}


def feature_map(job: dict, work: Path) -> FeatureMap:
    fmap = FeatureMap(f"{job['dataset']}-bench", str(work))
    features = OrderedDict()
    for name, size in job["fields"]["categorical"]:
        features[name] = {"source": "", "type": "categorical", "padding_idx": 0,
                          "vocab_size": int(size)}
    for name, size in job["fields"]["multi"]:
        features[name] = {"source": "", "type": "sequence", "padding_idx": 0,
                          "vocab_size": int(size), "max_len": int(job["fields"]["multi_len"]),
                          "feature_encoder": "layers.MaskedAveragePooling()"}
    fmap.features = features
    fmap.labels = ["label"]
    fmap.default_emb_dim = int(job["settings"]["embedding_dim"])
    fmap.num_fields = fmap.get_num_fields()
    fmap.total_features = sum(int(f["vocab_size"]) for f in features.values())
    fmap.set_column_index()
    return fmap


def main() -> None:
    job = load_job()
    s = job["settings"]
    torch.set_num_threads(int(s["threads"]))
    logging.basicConfig(level=logging.WARNING)
    seed_everything(int(s["seed"]))
    out = Path(job["out"])
    fmap = feature_map(job, out)
    workers = int(s.get("fuxictr_num_workers", LIBRARY_DEFAULTS["num_workers"]))
    train_gen, valid_gen, test_gen = RankDataLoader(
        fmap, stage="both", train_data=job["data"]["train"], valid_data=job["data"]["valid"],
        test_data=job["data"]["test"], batch_size=int(s["batch_size"]), shuffle=True,
        data_format="npz", num_workers=workers)
    model = DeepFM(fmap, embedding_dim=int(s["embedding_dim"]), hidden_units=list(s["mlp"]),
                   learning_rate=float(s["learning_rate"]), optimizer=s["optimizer"],
                   loss="binary_crossentropy", metrics=["AUC", "logloss"],
                   task="binary_classification", monitor="AUC", monitor_mode="max",
                   early_stop_patience=int(s["patience"]), save_best_only=True,
                   embedding_regularizer=None, net_regularizer=None, verbose=0,
                   model_root=str(out / "checkpoints"))

    Path(model.model_dir).mkdir(parents=True, exist_ok=True)  # run_expid.py's job in FuxiCTR

    # Timing hooks around the library's own methods (its loop is untouched): an epoch is
    # train_epoch, validation (evaluate + checkpoint + early-stop bookkeeping) is eval_step.
    clock = EpochClock()
    samples = train_gen.num_samples
    aucs: list[float] = []
    train_epoch, eval_step = model.train_epoch, model.eval_step
    checkpoint = model.checkpoint_and_earlystop

    def timed_epoch(gen):
        clock.begin()
        train_epoch(gen)
        clock.end(samples, aucs[-1] if aucs else None)

    def timed_eval():
        t = time.perf_counter()
        eval_step()
        clock.add_eval(time.perf_counter() - t)

    def record(logs, *args, **kwargs):
        aucs.append(float(logs["AUC"]))
        return checkpoint(logs, *args, **kwargs)

    model.train_epoch, model.eval_step, model.checkpoint_and_earlystop = (
        timed_epoch, timed_eval, record)
    model.fit(train_gen, epochs=int(s["epochs"]), validation_data=valid_gen)
    predictions = model.predict(test_gen)
    write_result(job, predictions, {
        "library": "fuxictr", "model": "DeepFM",
        "version": importlib.metadata.version("fuxictr"), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {**s, "loss": "binary_crossentropy (mean)", "regularizers": None,
                     "dropout": 0, "batch_norm": False, "num_workers": workers,
                     "multi_valued": "sequence feature, MaskedAveragePooling"},
        "library_defaults_kept": LIBRARY_DEFAULTS,
        **clock.summary(),
    })


if __name__ == "__main__":
    main()
