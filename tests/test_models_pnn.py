"""PNN (ipnn, opnn, pnn-star) and DeepFM-P: the product layers against brute force (training,
export and serving of every model: tests/test_model_contract.py)."""

from __future__ import annotations

import torch

from ctrserve.models.product import InnerProduct, OuterProduct


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
