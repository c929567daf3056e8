"""Warm start: a challenger begins from the champion bundle's weights.

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


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Copy matching weights into `model`; returns what was loaded and what stayed fresh."""
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
