"""PNN (ipnn, opnn, pnn-star) and DeepFM-P: product layers, training and export via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctrserve.bundles import load_bundle
from ctrserve.cli import main
from ctrserve.models.product import InnerProduct, OuterProduct
from tests.conftest import train_cli
from tests.model_checks import PARITY, independent_parity

PNN_MODELS = ("ipnn", "opnn", "pnn-star", "deepfm-ipnn", "deepfm-opnn", "deepfm-pnn-star")


def test_inner_product_is_every_pairwise_dot_product():
    torch.manual_seed(0)
    emb = torch.randn(3, 5, 4)
    layer = InnerProduct(5)
    expected = torch.stack([torch.stack([emb[b, i] @ emb[b, j]
                                         for i in range(5) for j in range(i + 1, 5)])
                            for b in range(3)])
    assert layer.out_dim == 10
    torch.testing.assert_close(layer(emb), expected)


def test_outer_product_is_the_sum_pooled_outer_product():
    torch.manual_seed(0)
    emb = torch.randn(3, 5, 4)
    layer = OuterProduct(4)
    pooled = emb.sum(dim=1)
    expected = torch.stack([torch.outer(pooled[b], pooled[b]).flatten() for b in range(3)])
    assert layer.out_dim == 16
    torch.testing.assert_close(layer(emb), expected)
    # the memory-friendly form equals the superposition of all pairwise e_i e_j^T
    brute = torch.stack([sum(torch.outer(emb[b, i], emb[b, j]) for i in range(5)
                             for j in range(5)).flatten() for b in range(3)])
    torch.testing.assert_close(layer(emb), brute)


@pytest.mark.parametrize("model", PNN_MODELS)
def test_pnn_model_trains_exports_and_verifies(synth_dir, tmp_path, model):
    run, registry = tmp_path / "run", tmp_path / "registry"
    assert train_cli(synth_dir, run, model, "--epochs", "1") == 0
    assert main(["export", str(run), "--registry", str(registry)]) == 0
    (bundle_dir,) = list(registry.iterdir())
    assert main(["verify", str(bundle_dir)]) == 0
    m = load_bundle(bundle_dir).manifest
    assert m.model_type == model
    assert all(t.shape[0] == "batch" for t in m.inputs), "dynamic batch axis"
    assert m.parity.rows >= 1000 and m.parity.max_abs_diff <= 1e-5
    # recomputed here, not read from the exporter's record: ONNX against the run's weights
    assert independent_parity(run, bundle_dir, synth_dir) <= PARITY
    auc = json.loads((Path(run) / "run.json").read_text())["metrics"]["test"]["auc"]
    print(f"{model}: test auc {auc:.4f}, parity {m.parity.max_abs_diff:.2e}")
    assert auc > 0.55
    assert m.metrics["test"]["auc"] == pytest.approx(auc)
