"""DeepFM (DeepFM-D): an FM component and a DNN sharing one embedding table.

y = sigmoid(y_FM + y_DNN), where y_FM = first-order + pairwise FM term and y_DNN is an MLP
over the concatenated field embeddings. `deep_layer` lets APG-DeepFM swap the DNN.

Multi-embedding (config.embedding_sets = M > 1, "On the Embedding Collapse When Scaling up
Recommendation Models"): M independent FeatureEmbedding tables, each with its own FM and its
own DNN; our choice for the head: the M (FM + DNN) logits are averaged and the shared
first-order linear part is added once,
    y = sigmoid(linear + 1/M sum_m (FM(E_m) + DNN_m(E_m))).
Set 0 keeps the plain model's names (`embedding`, `dnn`); sets 1..M-1 live in
`extra_embeddings` / `extra_dnns` (empty for M = 1, so the state dict and the graph of the
plain model are unchanged). Only plain DeepFM opts in (`multi_embedding`); its subclasses
(APG-DeepFM, DeepFM-P) refuse M > 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import MLP, FeatureEmbedding, FMInteraction
from ctrserve.models.linear import LinearTerm


class DeepFM(CTRModel):
    multi_embedding = True

    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        self.fm = FMInteraction()
        self.deep_in = self.embedding.num_fields * config.embedding_dim
        self.dnn = self.build_deep()
        extra = range(config.embedding_sets - 1)
        self.extra_embeddings = nn.ModuleList(
            FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
            for _ in extra)
        self.extra_dnns = nn.ModuleList(self.build_deep() for _ in extra)
        self._emb: torch.Tensor | None = None
        self._extra_emb: list[torch.Tensor] = []

    def build_deep(self) -> nn.Module:
        c = self.config
        return MLP(self.deep_in, c.mlp, 1, c.dropout, c.batch_norm)

    def deep(self, emb: torch.Tensor) -> torch.Tensor:
        return self.dnn(emb.flatten(start_dim=1)).squeeze(-1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        if not self.extra_embeddings:
            return self.linear(named) + self.fm(self._emb) + self.deep(self._emb)
        self._extra_emb = [emb(named) for emb in self.extra_embeddings]
        total = self.fm(self._emb) + self.deep(self._emb)
        for emb, dnn in zip(self._extra_emb, self.extra_dnns, strict=True):
            total = total + self.fm(emb) + dnn(emb.flatten(start_dim=1)).squeeze(-1)
        return self.linear(named) + total / len(self.embedding_tables())

    def regularized_embeddings(self) -> list[torch.Tensor]:
        return [self._emb, *self._extra_emb] if self._emb is not None else []

    def embedding_tables(self) -> list[nn.Module]:
        return [self.embedding, *self.extra_embeddings]
