"""manifest.json: everything needed to serve, verify and explain a model.onnx."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE, MODEL_FILE = "manifest.json", "model.onnx"
MANIFEST_FORMAT = 1
PARITY_TOLERANCE = 1e-5


class TensorInfo(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]


class Parity(BaseModel):
    """ONNX Runtime against PyTorch on held-out rows: max |p_onnx - p_torch|."""

    rows: int = Field(ge=1)
    max_abs_diff: float
    tolerance: float = PARITY_TOLERANCE
    fold_max_abs_diff: float | None = None  # APG: folded vs over-parameterised PyTorch model


class Manifest(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    format: int = MANIFEST_FORMAT
    version: str
    model_type: str
    hyperparameters: dict[str, Any]
    encoder: dict[str, Any]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    data: dict[str, Any]
    metrics: dict[str, Any]
    parity: Parity
    sha256: str
    created_at: str
    producer: dict[str, Any] = {}
    run: dict[str, Any] = {}
    # information abundance of the run's embeddings (training/abundance.py manifest_summary):
    # embedding_sets, mean per set, overall_mean, fields {name: [IA per set]}; absent in
    # bundles exported before issue 8 and for models without an embedding table
    abundance: dict[str, Any] | None = None

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(self.model_dump_json(indent=1))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_version(model_sha256: str, encoder: dict[str, Any]) -> str:
    """A bundle's version: a hash of what decides its outputs (the model and the encoder)."""
    canonical = json.dumps(encoder, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((model_sha256 + canonical).encode()).hexdigest()[:16]
