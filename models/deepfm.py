"""DeepFM (DeepFM-D): an FM component and a DNN sharing one embedding table.

y = sigmoid(y_FM + y_DNN), where y_FM = first-order + pairwise FM term and y_DNN is an MLP
over the concatenated field embeddings. `deep_layer` lets APG-DeepFM swap the DNN.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import CTRModel
from models.layers import MLP, FeatureEmbedding, FMInteraction
from models.linear import LinearTerm


class DeepFM(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        self.fm = FMInteraction()
        self.deep_in = self.embedding.num_fields * config.embedding_dim
        self.dnn = self.build_deep()
        self._emb: torch.Tensor | None = None

    def build_deep(self) -> nn.Module:
        c = self.config
        return MLP(self.deep_in, c.mlp, 1, c.dropout, c.batch_norm)

    def deep(self, emb: torch.Tensor) -> torch.Tensor:
        return self.dnn(emb.flatten(start_dim=1)).squeeze(-1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        return self.linear(named) + self.fm(self._emb) + self.deep(self._emb)

    def regularized_embeddings(self) -> list[torch.Tensor]:
        return [self._emb] if self._emb is not None else []
