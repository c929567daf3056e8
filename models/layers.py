"""Reusable building blocks: feature embedding, FM interaction, MLP, APG layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FeatureEmbedding(nn.Module):
    """One shared table for every categorical and multi-valued field, plus numeric vectors.

    Returns [B, F, dim] in field order: categorical, multi (mean-pooled over non-padding
    ids), numeric (a learned vector per field scaled by the value). Field-local ids from the
    encoder are shifted by per-field offsets, so one Gather serves all fields.
    """

    def __init__(self, layout: dict[str, Any], dim: int, init_std: float = 1e-4):
        super().__init__()
        cat_sizes = [size for _, size in layout["categorical"]]
        multi_sizes = [size for _, size in layout["multi"]]
        sizes = cat_sizes + multi_sizes
        starts = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)[:-1]
        self.register_buffer("cat_offsets", starts[: len(cat_sizes)].clone(), persistent=False)
        self.register_buffer("multi_offsets", starts[len(cat_sizes) :].clone(), persistent=False)
        self.table = nn.Embedding(max(sum(sizes), 1), dim)
        nn.init.normal_(self.table.weight, std=init_std)
        n_numeric = len(layout["numeric"])
        self.numeric = nn.Parameter(torch.randn(n_numeric, dim) * init_std) if n_numeric else None
        self.num_fields = len(sizes) + n_numeric

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if "cat_ids" in inputs:
            parts.append(self.table(inputs["cat_ids"] + self.cat_offsets))
        if "multi_ids" in inputs:
            ids = inputs["multi_ids"]
            vectors = self.table(ids + self.multi_offsets[None, :, None])
            mask = (ids > 0).to(vectors.dtype).unsqueeze(-1)
            count = mask.sum(dim=2).clamp(min=1.0)
            parts.append((vectors * mask).sum(dim=2) / count)
        if self.numeric is not None:
            parts.append(inputs["numeric"].unsqueeze(-1) * self.numeric)
        return torch.cat(parts, dim=1)


class FMInteraction(nn.Module):
    """Second-order FM term: sum over pairs <v_i, v_j>, in O(F * dim)."""

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class MLP(nn.Module):
    """Dense layers with ReLU, optional batch norm and dropout, and a final linear output."""

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...],
        out_dim: int | None = 1,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_dim, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class APGLayer(nn.Module):
    """Adaptive parameter generation: y = U S_i V x + b with S_i = I + G(z_i), K x K.

    Decomposed feed-forward: V x (rank K), then the per-instance K x K S_i, then U, so the
    full per-instance W_i = U S_i V is never built. U and V are shared by all instances.
    With overparam P > 0, U = U_l U_r and V = V_l V_r (P-wide inner dimension) during
    training; `fold()` multiplies them out for inference and export, which changes no output.
    S_i is generated as a residual around the identity (our choice: the layer starts as a
    plain low-rank layer and the generator learns the instance-specific part).
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, cond_dim: int, overparam: int,
                 generator_hidden: int):
        super().__init__()
        self.rank = rank
        if overparam > 0:
            self.v_l = nn.Linear(overparam, rank, bias=False)
            self.v_r = nn.Linear(in_dim, overparam, bias=False)
            self.u_l = nn.Linear(overparam, out_dim, bias=False)
            self.u_r = nn.Linear(rank, overparam, bias=False)
            self.v = self.u = None
        else:
            self.v = nn.Linear(in_dim, rank, bias=False)
            self.u = nn.Linear(rank, out_dim, bias=False)
        self._init_factors()
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.generator = nn.Sequential(
            nn.Linear(cond_dim, generator_hidden), nn.ReLU(), nn.Linear(generator_hidden, rank**2)
        )
        nn.init.zeros_(self.generator[-1].weight)
        nn.init.zeros_(self.generator[-1].bias)
        self.register_buffer("eye", torch.eye(rank), persistent=False)

    def _init_factors(self) -> None:
        """Variance-preserving init of the chain V_r, V_l, U_r, U_l (He gain on the first).

        PyTorch's default Linear init shrinks the variance threefold per matrix; over a chain
        of four factors per layer the signal vanishes and training diverged in our runs.
        """
        chain = [self.v, self.u] if self.v is not None else [self.v_r, self.v_l, self.u_r,
                                                              self.u_l]
        for i, linear in enumerate(chain):
            gain = 2.0 if i == 0 else 1.0
            nn.init.normal_(linear.weight, std=(gain / linear.in_features) ** 0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.v(x) if self.v is not None else self.v_l(self.v_r(x))
        s = self.generator(cond).view(-1, self.rank, self.rank) + self.eye
        h = torch.bmm(s, h.unsqueeze(-1)).squeeze(-1)
        out = self.u(h) if self.u is not None else self.u_l(self.u_r(h))
        return out + self.bias

    @torch.no_grad()
    def fold(self) -> None:
        """Replace U_l U_r and V_l V_r by their products (inference form)."""
        if self.v is not None:
            return
        v_weight = self.v_l.weight @ self.v_r.weight  # [rank, in]
        u_weight = self.u_l.weight @ self.u_r.weight  # [out, rank]
        self.v = nn.Linear(v_weight.shape[1], self.rank, bias=False)
        self.u = nn.Linear(self.rank, u_weight.shape[0], bias=False)
        self.v.weight.copy_(v_weight)
        self.u.weight.copy_(u_weight)
        del self.v_l, self.v_r, self.u_l, self.u_r
