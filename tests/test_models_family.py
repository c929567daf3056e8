"""The rest of the product-nets family (FNN, FFM, CCPM, KPNN, PIN, KFM, NIFM): their layers, and
FNN's start from a trained FM (every model's training, export and serving:
tests/test_model_contract.py)."""

from __future__ import annotations

import json

import pytest
import torch

from ctrserve.models.ccpm import KMaxPooling
from ctrserve.models.ffm import FFMInteraction
from ctrserve.models.kpnn import KernelProduct
from tests.conftest import train_cli


def test_ffm_interaction_matches_a_brute_force_loop():
    torch.manual_seed(0)
    batch, fields, dim = 3, 5, 4
    vectors = torch.randn(batch, fields, fields, dim)  # vectors[b, i, f] = v_{i,f}
    expected = torch.stack([sum(vectors[b, i, j] @ vectors[b, j, i]
                                for i in range(fields) for j in range(i + 1, fields))
                            for b in range(batch)])
    torch.testing.assert_close(FFMInteraction(fields)(vectors), expected)


def test_kernel_product_starts_as_the_inner_product():
    torch.manual_seed(0)
    emb = torch.randn(2, 4, 3)
    layer = KernelProduct(4, 3)
    expected = torch.stack([torch.stack([emb[b, i] @ emb[b, j]
                                         for i in range(4) for j in range(i + 1, 4)])
                            for b in range(2)])
    torch.testing.assert_close(layer(emb), expected)


def test_k_max_pooling_keeps_the_largest():
    x = torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0]).view(1, 1, 5, 1)
    assert KMaxPooling(3, 5)(x).flatten().tolist() == [5.0, 4.0, 3.0]
    assert KMaxPooling(3, 5, keep_order=True)(x).flatten().tolist() == [3.0, 5.0, 4.0]


def test_fnn_starts_from_a_trained_fm(trained_runs, synth_dir, tmp_path):
    """FNN's FM pre-training: --init-embeddings carries the FM run's encoder and table."""
    fm = trained_runs["fm"]
    out = tmp_path / "fnn-from-fm"
    # a vanishing learning rate: what the FNN ends with is what it started from
    assert train_cli(synth_dir, out, "fnn", "--epochs", "1", "--lr", "1e-12",
                     "--init-embeddings", str(fm)) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["warm_start"]["source"] == str(fm)
    assert info["warm_start"]["loaded"] == 2  # the table and the numeric fields' vectors
    assert json.loads((out / "encoder.json").read_text()) == json.loads(
        (fm / "encoder.json").read_text())
    fnn_state = torch.load(out / "model.pt", weights_only=True)
    fm_state = torch.load(fm / "model.pt", weights_only=True)
    for key in ("embedding.table.weight", "embedding.numeric"):
        torch.testing.assert_close(fnn_state[key], fm_state[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["dim", "lr", "missing"])
def test_init_embeddings_refuses_what_does_not_fit(trained_runs, synth_dir, tmp_path, capsys,
                                                   case):
    source = {"dim": trained_runs["fm"], "lr": trained_runs["lr"],
              "missing": tmp_path / "nope"}[case]
    extra = ["--embedding-dim", "4"] if case == "dim" else []
    out = tmp_path / "run"
    assert train_cli(synth_dir, out, "fnn", "--init-embeddings", str(source), *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ctrserve train: error: --init-embeddings:"), err
    assert {"dim": "embedding-dim", "lr": "no embedding table",
            "missing": "not a run directory"}[case] in err
    assert not (out / "model.pt").exists()
