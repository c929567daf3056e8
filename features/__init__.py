"""The one feature encoder shared by trainer and scorer (numpy only, no torch)."""

from features.encoder import EncodedBatch, FeatureEncoder
from features.spec import DatasetSpec, FieldSpec, SpecError

__all__ = ["DatasetSpec", "EncodedBatch", "FeatureEncoder", "FieldSpec", "SpecError"]
