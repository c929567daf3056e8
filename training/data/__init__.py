"""Data sources: the synthetic app-store world and readers for real click logs."""

from ctrserve.training.data.registry import open_source
from ctrserve.training.data.source import SPLITS, Chunk, DataError, DataSource, checked_chunks

__all__ = ["SPLITS", "Chunk", "DataError", "DataSource", "checked_chunks", "open_source"]
