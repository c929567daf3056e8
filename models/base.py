"""What every model shares: its config, its inputs, and the exported output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn


@dataclass
class ModelConfig:
    """Hyper-parameters of a model; stored in the run directory and the bundle manifest."""

    name: str = "deepfm"
    embedding_dim: int = 16
    mlp: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.0
    batch_norm: bool = False
    embedding_init_std: float = 1e-4
    # APG-DeepFM: rank K of U S_i V, width P of the over-parameterisation (0 = off),
    # condition: "self" (the layer input), "group" (embeddings of condition_fields) or "mix"
    apg_rank: int = 32
    apg_overparam: int = 64
    apg_condition: str = "self"
    apg_condition_fields: tuple[str, ...] = field(default_factory=tuple)
    apg_generator_hidden: int = 64
    # multi-embedding (issue 8): M independent embedding sets, each with its own interaction
    # module, averaged; 1 is the plain model. Only models that declare
    # `multi_embedding = True` accept M > 1 (see check_embedding_sets).
    embedding_sets: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.embedding_sets, bool) or not isinstance(self.embedding_sets, int) \
                or self.embedding_sets < 1:
            raise ValueError(f"embedding_sets must be an integer >= 1, got {self.embedding_sets!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        out = cls(**data)
        out.mlp = tuple(out.mlp)
        out.apg_condition_fields = tuple(out.apg_condition_fields)
        return out


def check_embedding_sets(model_class: type, config: ModelConfig) -> None:
    """Refuse embedding_sets > 1 for a model class that does not implement multi-embedding.

    The flag is read from the class's own namespace, not inherited: a subclass that changes
    the interaction (APG-DeepFM, DeepFM-P) must opt in itself.
    """
    if config.embedding_sets != 1 and not vars(model_class).get("multi_embedding", False):
        raise ValueError(f"model {config.name!r} does not support embedding_sets="
                         f"{config.embedding_sets} (multi-embedding is implemented for "
                         "deepfm and ipnn); use embedding_sets=1")


class CTRModel(nn.Module):
    """Base class: forward(*inputs) in the encoder's input order returns logits of shape [B].

    `inputs` are the encoder outputs named in `input_names` (`cat_ids`, `multi_ids`,
    `numeric`, whichever the dataset has), passed positionally so ONNX export sees plain
    tensors.
    """

    multi_embedding = False  # True: accepts config.embedding_sets > 1 (not inherited)

    def __init__(self, config: ModelConfig, layout: dict[str, Any]):
        super().__init__()
        check_embedding_sets(type(self), config)
        self.config = config
        self.layout = layout
        groups = (("cat_ids", "categorical"), ("multi_ids", "multi"), ("numeric", "numeric"))
        self.input_names = [name for name, key in groups if layout[key]]

    def named_inputs(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names, inputs, strict=True))

    def output_biases(self) -> list[torch.Tensor]:
        """The biases added last to the logit (the linear term's, by default)."""
        return [self.linear.bias]

    @torch.no_grad()
    def set_prior(self, positive_rate: float) -> None:
        """Start the output bias at the training log-odds, so step one predicts the base rate."""
        rate = min(max(positive_rate, 1e-6), 1 - 1e-6)
        for bias in self.output_biases():
            bias.fill_(float(torch.logit(torch.tensor(rate))))

    def regularized_embeddings(self) -> list[torch.Tensor]:
        """Embeddings looked up in the last forward pass, for the L2 penalty: the ones a
        model keeps in `self._emb` (none for LR)."""
        emb = getattr(self, "_emb", None)
        return [emb] if emb is not None else []

    def embedding_tables(self) -> list[nn.Module]:
        """The model's FeatureEmbedding modules, one per embedding set (for information
        abundance); empty for models without one (LR)."""
        from ctrserve.models.layers import FeatureEmbedding

        emb = getattr(self, "embedding", None)
        return [emb] if isinstance(emb, FeatureEmbedding) else []


class ProbabilityHead(nn.Module):
    """Wraps a model for export: the same inputs, the click probability as output."""

    def __init__(self, model: CTRModel):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(*inputs))
