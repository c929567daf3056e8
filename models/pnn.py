"""Product-based neural networks (Qu et al.) and DeepFM-P (the DeepFM paper's variant).

PNN (ipnn, opnn, pnn-star): y = sigmoid(MLP([z, p])) over FeatureEmbedding's field
embeddings, so F and D are the same as DeepFM's (categorical, mean-pooled multi-valued and
numeric fields). As in the paper there is no separate first-order term; the logit's bias is
the MLP's output bias, which `set_prior` starts at the training log-odds.

DeepFM-P (deepfm-ipnn, deepfm-opnn, deepfm-pnn-star): DeepFM with its DNN replaced by the
PNN deep part, sharing one embedding table: y = sigmoid(linear + FM + y_PNN).

Multi-embedding (config.embedding_sets = M > 1, IPNN only): M independent FeatureEmbedding
tables, each with its own product layer and MLP (its own ProductDeep); the M logits are
averaged, y = sigmoid(1/M sum_m PNN_m(E_m)), and every MLP's output bias starts at the
training log-odds, so the average does too. Set 0 keeps the plain names (`embedding`, `dnn`);
sets 1..M-1 live in `extra_embeddings` / `extra_dnns` (empty for M = 1).

See models/product.py for the product layers and the choices made there (raw products
concatenated with z; OPNN's sum-pooled f_S f_S^T form).
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.base import CTRModel
from ctrserve.models.deepfm import DeepFM
from ctrserve.models.layers import FeatureEmbedding
from ctrserve.models.product import ProductDeep


def _product_deep(model: CTRModel, num_fields: int) -> ProductDeep:
    c = model.config
    return ProductDeep(num_fields, c.embedding_dim, model.products, c.mlp, c.dropout,
                       c.batch_norm)


class PNN(CTRModel):
    """PNN with the product layers named in `products` (set by the subclasses below)."""

    products: tuple[str, ...] = ()

    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        self.dnn = _product_deep(self, self.embedding.num_fields)
        extra = range(config.embedding_sets - 1)
        self.extra_embeddings = nn.ModuleList(
            FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
            for _ in extra)
        self.extra_dnns = nn.ModuleList(
            _product_deep(self, self.embedding.num_fields) for _ in extra)
        self._emb: torch.Tensor | None = None
        self._extra_emb: list[torch.Tensor] = []

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        if not self.extra_embeddings:
            return self.dnn(self._emb)
        self._extra_emb = [emb(named) for emb in self.extra_embeddings]
        total = self.dnn(self._emb)
        for emb, dnn in zip(self._extra_emb, self.extra_dnns, strict=True):
            total = total + dnn(emb)
        return total / len(self.embedding_tables())

    def output_biases(self) -> list[torch.Tensor]:
        """No linear term: each MLP's output bias starts at the training log-odds."""
        return [dnn.mlp.net[-1].bias for dnn in (self.dnn, *self.extra_dnns)]

    def regularized_embeddings(self) -> list[torch.Tensor]:
        return [self._emb, *self._extra_emb] if self._emb is not None else []

    def embedding_tables(self) -> list[nn.Module]:
        return [self.embedding, *self.extra_embeddings]


class IPNN(PNN):
    multi_embedding = True
    products = ("inner",)


class OPNN(PNN):
    products = ("outer",)


class PNNStar(PNN):
    """PNN*: inner and outer product signals, both concatenated with z."""

    products = ("inner", "outer")


class DeepFMPNN(DeepFM):
    """DeepFM-P: sigmoid(linear + FM + y_PNN) with one shared embedding table."""

    products: tuple[str, ...] = ()

    def build_deep(self) -> nn.Module:
        return _product_deep(self, self.embedding.num_fields)

    def deep(self, emb: torch.Tensor) -> torch.Tensor:
        return self.dnn(emb)


class DeepFMIPNN(DeepFMPNN):
    products = ("inner",)


class DeepFMOPNN(DeepFMPNN):
    products = ("outer",)


class DeepFMPNNStar(DeepFMPNN):
    products = ("inner", "outer")
