"""APG-DeepFM: DeepFM whose DNN dense layers are APG layers (adaptive parameter generation).

Each hidden layer is an APGLayer whose K x K matrix S_i is generated from a condition z_i:
- "self": z_i is the layer's own input;
- "group": z_i is the concatenated embeddings of `apg_condition_fields` (e.g. user activity,
  app category), the same for every layer;
- "mix": z_i is [group embeddings, layer input] (our reading of the paper's mix-wise
  strategy: both signals feed one generator).
"""

from __future__ import annotations

import torch
from torch import nn

from ctrserve.models.deepfm import DeepFM
from ctrserve.models.layers import APGLayer


class APGDeepFM(DeepFM):
    def build_deep(self) -> nn.Module:
        c = self.config
        if c.apg_condition not in ("self", "group", "mix"):
            raise ValueError(f"apg_condition must be self, group or mix, not {c.apg_condition!r}")
        self.group_index = self._condition_field_indices()
        group_dim = len(self.group_index) * c.embedding_dim
        layers, in_dim = [], self.deep_in
        for width in c.mlp:
            cond_dim = {"self": in_dim, "group": group_dim, "mix": group_dim + in_dim}
            layers.append(
                APGLayer(in_dim, width, c.apg_rank, cond_dim[c.apg_condition], c.apg_overparam,
                         c.apg_generator_hidden)
            )
            in_dim = width
        self.act = nn.ReLU()
        self.drop = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.out = nn.Linear(in_dim, 1)
        return nn.ModuleList(layers)

    def _condition_field_indices(self) -> list[int]:
        c = self.config
        if c.apg_condition == "self":
            return []
        names = [n for n, _ in self.layout["categorical"]] + [n for n, _ in self.layout["multi"]]
        names += list(self.layout["numeric"])
        if not c.apg_condition_fields:
            raise ValueError("apg_condition 'group'/'mix' needs apg_condition_fields")
        unknown = [f for f in c.apg_condition_fields if f not in names]
        if unknown:
            raise ValueError(f"apg_condition_fields {unknown} are not fields of the data")
        return [names.index(f) for f in c.apg_condition_fields]

    def deep(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb.flatten(start_dim=1)
        group = emb[:, self.group_index, :].flatten(start_dim=1) if self.group_index else None
        for layer in self.dnn:
            cond = {"self": x, "group": group}.get(self.config.apg_condition)
            if cond is None:
                cond = torch.cat([group, x], dim=1)
            x = self.drop(self.act(layer(x, cond)))
        return self.out(x).squeeze(-1)

    def fold(self) -> None:
        for layer in self.dnn:
            layer.fold()
