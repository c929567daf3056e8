"""Warm start: a challenger begins from the champion bundle's weights; a model begins from
another run's embedding table (`ctrserve train --init-embeddings RUN`, FNN's FM pre-training).

The bundle carries ONNX, not a PyTorch checkpoint; the exporter names each initializer
`model.<state dict key>`, so the weights come back by name and shape. The challenger must
use the champion's encoder (its vocabularies fix the embedding rows), so a warm-started
retrain does not refit it: ids first seen since the champion map to OOV.

APG layers are exported folded (U = U_l U_r, V = V_l V_r multiplied out). Unfolding keeps
the random U_r and V_l and solves for the other factor with the pseudo-inverse
(U_l = U pinv(U_r), V_r = pinv(V_l) V), which reproduces U and V exactly (U_r has full column
rank, V_l full row rank) while every inner dimension stays trainable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

PREFIX = "model."


def bundle_weights(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """The named initializers of a bundle's model.onnx, keyed as in the state dict."""
    model = onnx.load(str(Path(bundle_dir) / "model.onnx"))
    return {init.name[len(PREFIX):]: numpy_helper.to_array(init)
            for init in model.graph.initializer if init.name.startswith(PREFIX)}


class WeightMismatch(ValueError):
    """Weights that the model cannot start from."""


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict[str, np.ndarray],
                 require_all: bool = False) -> dict[str, Any]:
    """Copy matching weights into `model`; returns what was loaded and what stayed fresh.

    With `require_all` every weight given must exist in the model with its shape (a run's
    embedding table); otherwise what does not fit is skipped (a champion of another shape)."""
    if require_all:
        _check_all_fit(model.state_dict(), weights)
    weights = {**weights, **_unfold_apg(model, weights)}
    loaded, fresh = [], []
    for key, tensor in model.state_dict().items():
        value = weights.get(key)
        if value is None or tuple(value.shape) != tuple(tensor.shape):
            fresh.append(key)
            continue
        tensor.copy_(torch.as_tensor(np.array(value), dtype=tensor.dtype))
        loaded.append(key)
    if not loaded:
        raise ValueError("warm start: no weight of the champion fits the challenger")
    return {"loaded": len(loaded), "fresh": fresh}


def run_embeddings(run_dir: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The encoder and the shared embedding table (`embedding.*` weights) of a trained run.

    The new model must use that encoder as it is: its vocabularies fix the table's rows.
    First-order weights and the interaction are not carried over (FNN has neither)."""
    from ctrserve.training.run_dir import load_run

    run = load_run(run_dir)
    state = torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=True)
    weights = {k: v.numpy() for k, v in state.items() if k.startswith("embedding.")}
    if not weights:
        raise WeightMismatch(f"{run_dir}: model {run.info['model']['name']!r} has no "
                             "embedding table to start from")
    return run.encoder, weights


def _check_all_fit(state: dict[str, torch.Tensor], weights: dict[str, np.ndarray]) -> None:
    for key, value in weights.items():
        if key not in state:
            raise WeightMismatch(f"the model has no {key!r} to start from the run's")
        if tuple(state[key].shape) != tuple(value.shape):
            raise WeightMismatch(f"{key}: the run's shape {tuple(value.shape)} does not fit "
                                 f"the model's {tuple(state[key].shape)} (same --embedding-dim?)")


def _unfold_apg(model: torch.nn.Module, weights: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    state = model.state_dict()
    out = {}
    for key in state:
        if not key.endswith(".u_l.weight"):
            continue
        layer = key[: -len(".u_l.weight")]
        u, v = weights.get(f"{layer}.u.weight"), weights.get(f"{layer}.v.weight")
        if u is None or v is None:
            continue
        u_r = state[f"{layer}.u_r.weight"].double().numpy()
        v_l = state[f"{layer}.v_l.weight"].double().numpy()
        out[f"{layer}.u_l.weight"] = u.astype(np.float64) @ np.linalg.pinv(u_r)
        out[f"{layer}.v_r.weight"] = np.linalg.pinv(v_l) @ v.astype(np.float64)
    return out
