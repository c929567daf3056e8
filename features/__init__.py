"""The one feature encoder shared by trainer and scorer (numpy only, no torch)."""

from ctrserve.features.encoder import EncodedBatch, FeatureEncoder
from ctrserve.features.spec import DatasetSpec, FieldSpec, SpecError

__all__ = ["DatasetSpec", "EncodedBatch", "FeatureEncoder", "FieldSpec", "SpecError"]
