"""CCPM (Liu et al. 2015): convolutional click prediction model.

The field embeddings from FeatureEmbedding form an F x D matrix per row (fields along the
"sentence" axis, embedding dimensions as independent rows of the paper's figure). Each layer:

    wide 1-D convolution over the field axis (kernel width w, zero padding w-1, applied to
    every embedding dimension with shared weights: a Conv2d with kernel (w, 1))
    -> flexible p-max pooling over the field axis (keep the p largest; see below)
    -> tanh

and the last layer's maps are flattened into one linear output (the logit).

Pooling sizes follow the paper: p_i = (1 - (i/l)^(l-i)) * n for layer i of l, with n = F and
p_l = 3 for the last layer, each clamped to [1, length after the convolution]. They are
computed from F in __init__, so the export has constant TopK sizes.

Our choices (small and fixed): two layers, kernel widths (3, 3), channels (4, 4); no
dropout before the output layer. No separate first-order term: the output layer's bias
starts at the training log-odds.

Deviation from the paper: the pooling keeps the p largest values in *descending* order, not
in their original field order (`keep_order = False`). Order-preserving k-max pooling is
discontinuous where the p-th and (p+1)-th values nearly tie: which position survives, and
so where every later value lands, flips on float rounding, and PyTorch and onnxruntime round
differently. Measured on the synthetic data after one epoch: 2 of 2048 parity rows off by
up to 5.3e-6 (limit 1e-5), and the jump can grow with the weights. The sorted top-k values are
a continuous function of the input, so the export stays within rounding noise. Set
`keep_order = True` for the paper's form (ties then rank by position, earlier field first).
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import FeatureEmbedding


class KMaxPooling(nn.Module):
    """The k largest values along dim 2 of [B, C, L, D]: in descending order, or in their
    original order with keep_order (the paper's; see the module docstring for why not here)."""

    def __init__(self, k: int, length: int, keep_order: bool = False):
        super().__init__()
        self.k, self.keep_order = k, keep_order
        # a tiny position penalty makes equal values rank by position, deterministically
        self.register_buffer("tiebreak", torch.arange(length, dtype=torch.float32)[:, None]
                             * 1e-6, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keep_order:
            return torch.topk(x, self.k, dim=2).values
        _, index = torch.topk(x - self.tiebreak, self.k, dim=2)
        index, _ = torch.sort(index, dim=2)
        return torch.gather(x, 2, index)


class CCPM(CTRModel):
    widths: tuple[int, ...] = (3, 3)
    channels: tuple[int, ...] = (4, 4)
    last_k = 3
    keep_order = False

    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        n = self.embedding.num_fields
        layers: list[nn.Module] = []
        length, in_channels, depth = n, 1, len(self.widths)
        pairs = zip(self.widths, self.channels, strict=True)
        for i, (width, out_channels) in enumerate(pairs, start=1):
            layers.append(nn.Conv2d(in_channels, out_channels, (width, 1),
                                    padding=(width - 1, 0)))
            length += width - 1
            k = self.last_k if i == depth else int((1 - (i / depth) ** (depth - i)) * n)
            k = min(max(k, 1), length)
            layers += [KMaxPooling(k, length, self.keep_order), nn.Tanh()]
            length, in_channels = k, out_channels
        self.conv = nn.Sequential(*layers)
        self.output = nn.Linear(in_channels * length * config.embedding_dim, 1)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._emb = self.embedding(self.named_inputs(inputs))
        maps = self.conv(self._emb.unsqueeze(1))  # [B, C, k, D]
        return self.output(maps.flatten(start_dim=1)).squeeze(-1)

    def output_biases(self) -> list[torch.Tensor]:
        """No linear term: the output layer's bias starts at the training log-odds."""
        return [self.output.bias]
