"""Logistic regression over one-hot features: the well-engineered baseline."""

from __future__ import annotations

import torch

from ctrserve.models.base import CTRModel
from ctrserve.models.linear import LinearTerm


class LR(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.linear = LinearTerm(layout)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.named_inputs(inputs))
