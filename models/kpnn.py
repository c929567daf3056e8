"""Kernel product (Qu et al. 2018): KPNN and KFM.

The kernel product of a field pair is p_ij = e_i^T K_ij e_j with a learned kernel per pair.
Our choice of kernel: the paper's *vector* kernel, K_ij = diag(k_ij), so
p_ij = sum_d e_i,d k_ij,d e_j,d (F(F-1)/2 x D parameters). The kernels start at 1, so at
init KPNN's product signal is IPNN's and KFM is an FM; the matrix kernel (D x D per pair)
is not implemented.

KPNN: y = sigmoid(MLP([z, p])), z the flattened field embeddings, p the F(F-1)/2 kernel
products (as in models/product.py, the first Linear of the MLP plays the paper's l_z + l_p).
No separate first-order term; the MLP's output bias starts at the training log-odds.

KFM: y = sigmoid(w0 + sum_f w_f(x_f) + sum_{i<j} p_ij), a shallow FM with the kernel
product in place of the inner product (no MLP).
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import MLP, FeatureEmbedding
from ctrserve.models.linear import LinearTerm


class KernelProduct(nn.Module):
    """p_ij = sum_d e_i,d k_ij,d e_j,d for every field pair i < j, shape [B, F(F-1)/2].

    Pair indices are constant buffers from torch.triu_indices (two Gathers in the export).
    """

    def __init__(self, num_fields: int, dim: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = int(rows.numel())
        self.kernel = nn.Parameter(torch.ones(self.out_dim, dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        left = emb.index_select(1, self.rows)
        right = emb.index_select(1, self.cols)
        return (left * self.kernel * right).sum(dim=-1)


class KPNN(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        num_fields = self.embedding.num_fields
        self.product = KernelProduct(num_fields, config.embedding_dim)
        in_dim = num_fields * config.embedding_dim + self.product.out_dim
        self.mlp = MLP(in_dim, config.mlp, 1, config.dropout, config.batch_norm)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._emb = self.embedding(self.named_inputs(inputs))
        z = self._emb.flatten(start_dim=1)
        return self.mlp(torch.cat([z, self.product(self._emb)], dim=1)).squeeze(-1)

    def output_biases(self) -> list[torch.Tensor]:
        """No linear term: the MLP's output bias starts at the training log-odds."""
        return [self.mlp.net[-1].bias]


class KFM(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        self.product = KernelProduct(self.embedding.num_fields, config.embedding_dim)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        return self.linear(named) + self.product(self._emb).sum(dim=1)
