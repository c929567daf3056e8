"""FNN (Zhang et al. 2016): factorization-machine supported neural network.

y = sigmoid(MLP(z)), z = the field embeddings from FeatureEmbedding concatenated ([B, F*D]),
the same F and D as DeepFM and PNN (categorical, mean-pooled multi-valued, numeric fields).

Our choices: the paper initialises the embeddings (and the first-order weights) from a
pre-trained FM; by default we train end to end from the usual small random init, which is how
FNN is run as a baseline in the PNN papers. FM pre-training is optional:
`ctrserve train --model fnn --init-embeddings FM_RUN` starts from an FM run's encoder and
embedding table (the FM's first-order weights have no place here and are dropped). Like PNN
there is no separate first-order term; the MLP's output bias is the model's bias, started at
the training log-odds by `set_prior`.
"""

from __future__ import annotations

import torch

from ctrserve.models.base import CTRModel
from ctrserve.models.layers import MLP, FeatureEmbedding


class FNN(CTRModel):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.embedding = FeatureEmbedding(layout, config.embedding_dim, config.embedding_init_std)
        in_dim = self.embedding.num_fields * config.embedding_dim
        self.mlp = MLP(in_dim, config.mlp, 1, config.dropout, config.batch_norm)
        self._emb: torch.Tensor | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._emb = self.embedding(self.named_inputs(inputs))
        return self.mlp(self._emb.flatten(start_dim=1)).squeeze(-1)

    def output_biases(self) -> list[torch.Tensor]:
        """No linear term: the MLP's output bias starts at the training log-odds."""
        return [self.mlp.net[-1].bias]
