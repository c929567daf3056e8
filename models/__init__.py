"""CTR models in PyTorch: reusable layers (layers.py) and the models that compose them."""

from ctrserve.models.base import CTRModel, ModelConfig
from ctrserve.models.registry import MODELS, build_model

__all__ = ["MODELS", "CTRModel", "ModelConfig", "build_model"]
