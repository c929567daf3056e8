"""Product-based neural networks (Qu et al.) and DeepFM-P (the DeepFM paper's variant).

PNN (ipnn, opnn, pnn-star): y = sigmoid(MLP([z, p])) over FeatureEmbedding's field
embeddings, so F and D are the same as DeepFM's (categorical, mean-pooled multi-valued and
numeric fields). As in the paper there is no separate first-order term; the logit's bias is
the MLP's output bias, which `set_prior` starts at the training log-odds.

DeepFM-P (deepfm-ipnn, deepfm-opnn, deepfm-pnn-star): DeepFM with its DNN replaced by the
PNN deep part, sharing one embedding table: y = sigmoid(linear + FM + y_PNN).

See models/product.py for the product layers and the choices made there (raw products
concatenated with z; OPNN's sum-pooled f_S f_S^T form).
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import CTRModel
from models.deepfm import DeepFM
from models.layers import FeatureEmbedding
from models.product import ProductDeep


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
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._emb = self.embedding(self.named_inputs(inputs))
        return self.dnn(self._emb)

    @torch.no_grad()
    def set_prior(self, positive_rate: float) -> None:
        """No linear term: the MLP's output bias starts at the training log-odds."""
        rate = min(max(positive_rate, 1e-6), 1 - 1e-6)
        self.dnn.mlp.net[-1].bias.fill_(float(torch.logit(torch.tensor(rate))))

    def regularized_embeddings(self) -> list[torch.Tensor]:
        return [self._emb] if self._emb is not None else []


class IPNN(PNN):
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
