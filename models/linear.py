"""First-order term shared by LR, FM and DeepFM: a scalar weight per feature value."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ctrserve.models.layers import FeatureEmbedding


class LinearTerm(nn.Module):
    """w0 + sum_f w_f(x_f): a 1-dim FeatureEmbedding summed over fields."""

    def __init__(self, layout: dict[str, Any]):
        super().__init__()
        self.weights = FeatureEmbedding(layout, dim=1, init_std=1e-4)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.weights(inputs).sum(dim=(1, 2)) + self.bias
