"""Product-network-in-network (Qu et al. 2018): PIN and NIFM.

The product of a field pair is a micro network ("sub-net") over [e_i, e_j, e_i * e_j]:

    f_ij = W2_ij relu(W1_ij [e_i, e_j, e_i * e_j] + b1_ij) + b2_ij

Our choices: one sub-net *per pair* (weights not shared across pairs), computed for all
F(F-1)/2 pairs at once with batched matrix products (einsum) over constant pair indices;
one hidden layer of `subnet_hidden` units; no layer normalisation inside the sub-net.

PIN: y = sigmoid(MLP([z, f])), z the flattened field embeddings and f every pair's sub-net
output (`subnet_out` each) concatenated (our choice: z is kept beside the products, as in
our PNN). No separate first-order term; the MLP's output bias starts at the training log-odds.

NIFM: y = sigmoid(w0 + sum_f w_f(x_f) + sum_{i<j} f_ij), a shallow FM whose pairwise term
is a scalar sub-net output (`subnet_out` = 1), no MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import MLP, FeatureEmbedding
from ctrserve.models.linear import LinearTerm


class MicroNetProduct(nn.Module):
    """Per-pair sub-nets over [e_i, e_j, e_i * e_j]: [B, F, D] -> [B, F(F-1)/2, out]."""

    def __init__(self, num_fields: int, dim: int, hidden: int, out: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        pairs = int(rows.numel())
        self.pairs, self.out = pairs, out
        # He init on the hidden layer, Glorot-like on the output (each pair's own Linear)
        self.w1 = nn.Parameter(torch.randn(pairs, 3 * dim, hidden) * math.sqrt(2 / (3 * dim)))
        self.b1 = nn.Parameter(torch.zeros(pairs, hidden))
        self.w2 = nn.Parameter(torch.randn(pairs, hidden, out) * math.sqrt(1 / hidden))
        self.b2 = nn.Parameter(torch.zeros(pairs, out))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        left = emb.index_select(1, self.rows)
        right = emb.index_select(1, self.cols)
        x = torch.cat([left, right, left * right], dim=-1)  # [B, P, 3D]
        h = torch.relu(torch.einsum("bpi,pih->bph", x, self.w1) + self.b1)
        return torch.einsum("bph,pho->bpo", h, self.w2) + self.b2


class PIN(CTRModel):
    subnet_hidden = 16
    subnet_out = 4

    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        num_fields = self.embedding.num_fields
        self.product = MicroNetProduct(num_fields, config.embedding_dim, self.subnet_hidden,
                                       self.subnet_out)
        in_dim = num_fields * config.embedding_dim + self.product.pairs * self.subnet_out
        self.mlp = MLP(in_dim, config.mlp, 1, config.dropout, config.batch_norm)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._emb = self.embedding(self.named_inputs(inputs))
        z = self._emb.flatten(start_dim=1)
        f = self.product(self._emb).flatten(start_dim=1)
        return self.mlp(torch.cat([z, f], dim=1)).squeeze(-1)

    def output_biases(self) -> list[torch.Tensor]:
        """No linear term: the MLP's output bias starts at the training log-odds."""
        return [self.mlp.net[-1].bias]


class NIFM(CTRModel):
    subnet_hidden = 16

    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        self.product = MicroNetProduct(self.embedding.num_fields, config.embedding_dim,
                                       self.subnet_hidden, 1)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        return self.linear(named) + self.product(self._emb).sum(dim=(1, 2))
