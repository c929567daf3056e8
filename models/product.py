"""Product layers of the product-based neural networks (Qu et al., PNN) and DeepFM-P.

Both layers take the field embeddings [B, F, D] from FeatureEmbedding and return a flat
[B, P] signal that is concatenated with the linear signal z (the flattened embeddings) and
fed to the first hidden layer of an MLP (`ProductDeep`).
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.layers import MLP


class InnerProduct(nn.Module):
    """IPNN's product signal: <e_i, e_j> for every field pair i < j, shape [B, F(F-1)/2].

    The pair indices come from torch.triu_indices with the constant F, computed once in
    __init__ and kept as (non-persistent) buffers, so the export sees two constant Gathers.
    """

    def __init__(self, num_fields: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = int(rows.numel())

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb.index_select(1, self.rows) * emb.index_select(1, self.cols)).sum(dim=-1)


class OuterProduct(nn.Module):
    """OPNN's product signal in the paper's memory-friendly form, shape [B, D*D].

    Instead of the F^2 outer products e_i e_j^T (F^2 * D^2 per row), the field embeddings are
    sum-pooled first, f_S = sum_i e_i, and the single outer product f_S f_S^T (D x D) is
    taken and flattened row-major. This equals sum_{i,j} e_i e_j^T, i.e. the superposition of
    all pairwise outer products, including i = j and both orders.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim * dim

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        pooled = emb.sum(dim=1)
        return (pooled.unsqueeze(2) * pooled.unsqueeze(1)).flatten(start_dim=1)


class ProductDeep(nn.Module):
    """The deep part of PNN: MLP([z, p]) -> logit [B].

    z is the flattened field embeddings (F * D) and p the raw product signals (inner, outer,
    or both for PNN*), concatenated. Our choice: the paper's first-layer D1 projections of z
    and p (l_z, l_p) are not separate learned matrices here; the first Linear of the MLP
    over [z, p] is exactly such a projection (l_z + l_p + b_1 = W [z; p] + b_1), so nothing
    is lost, and the product signals stay raw and inspectable.
    """

    def __init__(self, num_fields: int, dim: int, products: tuple[str, ...],
                 hidden: tuple[int, ...], dropout: float, batch_norm: bool):
        super().__init__()
        unknown = set(products) - {"inner", "outer"}
        if not products or unknown:
            raise ValueError(f"products must be a non-empty subset of inner/outer, got {products}")
        self.inner = InnerProduct(num_fields) if "inner" in products else None
        self.outer = OuterProduct(dim) if "outer" in products else None
        in_dim = num_fields * dim
        in_dim += self.inner.out_dim if self.inner is not None else 0
        in_dim += self.outer.out_dim if self.outer is not None else 0
        self.mlp = MLP(in_dim, hidden, 1, dropout, batch_norm)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        parts = [emb.flatten(start_dim=1)]
        if self.inner is not None:
            parts.append(self.inner(emb))
        if self.outer is not None:
            parts.append(self.outer(emb))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)
