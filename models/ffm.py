"""FFM (Juan et al. 2016): field-aware factorization machine.

y = w0 + sum_f w_f(x_f) + sum_{i<j} <v_{i,f_j}, v_{j,f_i}>

Every feature has one latent vector per field (F vectors of size D). We get them from one
FeatureEmbedding of width F*D, so the fields (categorical, mean-pooled multi-valued,
numeric scaled by the value), the per-field id offsets and the single Gather are exactly
FeatureEmbedding's; its output [B, F, F*D] is viewed as [B, F, F, D] with
vectors[b, i, f] = v_{i,f} (field i's feature, as seen by field f).

The pairs i<j are fixed by F: the flat indices i*F + j and j*F + i are computed once in
__init__ (non-persistent buffers), so the export sees two constant Gathers over the
[B, F*F, D] view and no data-dependent shapes.

Our choices: the per-feature vector of a multi-valued field is the mean of its ids' vectors
(as in FeatureEmbedding); the table is vocab x (F*D), F times FM's, so keep D small.
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import FeatureEmbedding
from ctrserve.models.linear import LinearTerm


class FFMInteraction(nn.Module):
    """sum_{i<j} <v_{i,f_j}, v_{j,f_i}> from the field-aware vectors [B, F, F, D] -> [B]."""

    def __init__(self, num_fields: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("left", rows * num_fields + cols, persistent=False)   # v_{i,f_j}
        self.register_buffer("right", cols * num_fields + rows, persistent=False)  # v_{j,f_i}
        self.num_fields = num_fields

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        flat = vectors.flatten(start_dim=1, end_dim=2)  # [B, F*F, D]
        left = flat.index_select(1, self.left)
        right = flat.index_select(1, self.right)
        return (left * right).sum(dim=(1, 2))


class FFM(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)
        num_fields = sum(len(layout[k]) for k in ("categorical", "multi", "numeric"))
        self.dim = config.embedding_dim
        self.embedding = FeatureEmbedding(layout, num_fields * self.dim,
                                          config.embedding_init_std)
        self.ffm = FFMInteraction(num_fields)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = self.named_inputs(inputs)
        self._emb = self.embedding(named)
        vectors = self._emb.unflatten(2, (self.ffm.num_fields, self.dim))
        return self.linear(named) + self.ffm(vectors)
