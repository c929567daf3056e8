"""The model contract, generated from the model registry (in the spirit of scikit-learn's
estimator checks): every model in models/registry.py trains briefly through the CLI, exports a
bundle that verifies, has its ONNX/PyTorch parity recomputed here (tests/model_checks.py, not
the exporter's record), warm-starts strictly from its own bundle (every weight of a fresh model
comes from the bundle, and the warm model scores as the bundle does), and serves a request on a
real scorer whose scores equal the bundle's own onnxruntime session on the same rows.

A model added to the registry is checked without touching this file.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ctrserve.bundles import load_bundle
from ctrserve.cli import main
from ctrserve.models import ModelConfig, build_model
from ctrserve.models.registry import MODELS
from ctrserve.service.settings import Settings
from ctrserve.training.warm_start import bundle_weights, load_weights
from tests.conftest import train_cli
from tests.model_checks import PARITY, independent_parity, raw_rows
from tests.serving import LiveServer, World, direct_scores

REGISTERED = sorted(MODELS)


@pytest.mark.parametrize("model", REGISTERED)
def test_model_contract(model: str, synth_dir: Path, tmp_path: Path) -> None:
    run, registry = tmp_path / "run", tmp_path / "registry"
    assert train_cli(synth_dir, run, model, "--epochs", "1") == 0
    assert main(["export", str(run), "--registry", str(registry)]) == 0
    (bundle_dir,) = [p for p in registry.iterdir() if not p.name.startswith(".")]
    assert main(["verify", str(bundle_dir)]) == 0
    manifest = load_bundle(bundle_dir).manifest
    assert manifest.model_type == model
    assert all(t.shape[0] == "batch" for t in manifest.inputs), "dynamic batch axis"
    assert independent_parity(run, bundle_dir, synth_dir) <= PARITY
    assert warm_start_gap(bundle_dir, synth_dir) <= PARITY
    served, direct = one_request(registry, bundle_dir, synth_dir)
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-6)


def test_the_contract_covers_the_registry() -> None:
    assert len(REGISTERED) >= 17 and len(set(REGISTERED)) == len(REGISTERED)


def warm_start_gap(bundle_dir: Path, synth_dir: Path) -> float:
    """A fresh model of the bundle's configuration, warm-started from the bundle's weights:
    nothing may stay at its random start, and its probabilities must be the bundle's."""
    bundle = load_bundle(bundle_dir)
    config = ModelConfig.from_dict(bundle.manifest.hyperparameters["model"])
    model = build_model(config, bundle.encoder.layout())
    info = load_weights(model, bundle_weights(bundle_dir))
    # an APG layer is exported folded (u = u_l·u_r, v = v_l·v_r): the warm start keeps the
    # fresh u_r and v_l and solves u_l and v_r from them, so the product is the bundle's
    free = [k for k in info["fresh"] if not k.endswith((".u_r.weight", ".v_l.weight"))]
    assert free == [], f"weights left at their random start: {free}"
    model.eval()
    table = raw_rows(synth_dir)
    feeds = bundle.encoder.transform({n: table.column(n) for n in bundle.encoder.spec.names})
    with torch.no_grad():
        logits = model(*(torch.from_numpy(np.ascontiguousarray(feeds[name]))
                         for name in bundle.encoder.input_names()))
    warm = torch.sigmoid(logits).numpy().reshape(-1).astype(np.float64)
    onnx = bundle.session.run(None, feeds)[0].reshape(-1).astype(np.float64)
    return float(np.abs(warm - onnx).max())


def one_request(registry: Path, bundle_dir: Path, synth_dir: Path
                ) -> tuple[np.ndarray, np.ndarray]:
    """One score request to a real scorer serving the bundle (its feature store loaded from the
    synthetic world), and the bundle's own scores of the rows that request stands for."""
    world = World(synth_dir)
    user, apps = sorted(world.users)[3], sorted(world.apps)[:8]
    body = {"user_id": user, "context": {"hour": 20, "weekday": 2},
            "candidates": [{"item_id": a} for a in apps]}
    settings = Settings(registry=registry, bundle=bundle_dir.name, load_features=synth_dir,
                        warmup_rounds=1, admission=False)
    with LiveServer(settings) as server:
        reply = httpx.post(server.url + "/v1/score", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["model_version"] == load_bundle(bundle_dir).version
    assert data["item_ids"] == apps and data["missing_fields"] == []
    return np.asarray(data["scores"]), direct_scores(bundle_dir, world.rows(body))
