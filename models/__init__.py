"""CTR models in PyTorch: reusable layers (layers.py) and the models that compose them."""

from models.base import CTRModel, ModelConfig
from models.registry import MODELS, build_model

__all__ = ["MODELS", "CTRModel", "ModelConfig", "build_model"]
