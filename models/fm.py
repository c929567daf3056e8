"""Factorization machine: first-order weights plus pairwise <v_i, v_j> interactions."""

from __future__ import annotations

import torch

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import FeatureEmbedding, FMInteraction
from ctrserve.models.linear import LinearTerm


class FM(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        self.fm = FMInteraction()
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        return self.linear(named) + self.fm(self._emb)
