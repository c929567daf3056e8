"""Prediction over a split and the metrics reported everywhere (scikit-learn's AUC, logloss)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from ctrserve.models import CTRModel
from ctrserve.training.batches import Encoded


@torch.no_grad()
def predict(model: CTRModel, data: Encoded, batch_size: int = 16384) -> np.ndarray:
    """Click probabilities for every row, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        part = data.take(slice(i, i + batch_size))
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in part.inputs)
        out.append(torch.sigmoid(model(*inputs)).numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, logloss, and calibration (mean predicted over observed positive rate)."""
    probs64 = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    positive_rate = float(labels.mean())
    has_both = 0 < positive_rate < 1
    return {
        "auc": float(roc_auc_score(labels, probs64)) if has_both else float("nan"),
        "logloss": float(log_loss(labels, probs64, labels=[0, 1])),
        "calibration": float(probs64.mean() / positive_rate) if positive_rate else float("nan"),
        "rows": int(len(labels)),
        "positive_rate": positive_rate,
    }


def evaluate(model: CTRModel, data: Encoded) -> dict[str, float]:
    return metrics(data.labels, predict(model, data))
