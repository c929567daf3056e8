"""The run directory written by `ctrserve train` and read by `ctrserve export`.

run.json            model and training config, data provenance, metrics, throughput
encoder.json        the fitted feature encoder
learning_curve.json one entry per epoch (train loss, validation AUC/logloss, samples/s)
model.pt            the best weights (state dict)
parity_inputs.npz   held-out encoded test rows used for the export parity check
abundance.json      information abundance per field and embedding set (training/abundance.py;
                    absent for models without an embedding table)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrserve.common.errors import UserError
from ctrserve.features import FeatureEncoder
from ctrserve.models import CTRModel, ModelConfig, build_model
from ctrserve.training.batches import Encoded

RUN_FILE, ENCODER_FILE, CURVE_FILE = "run.json", "encoder.json", "learning_curve.json"
WEIGHTS_FILE, PARITY_FILE = "model.pt", "parity_inputs.npz"
PARITY_ROWS = 2048


class RunError(UserError):
    """A run directory that cannot be read."""


def write_run(out: Path, info: dict[str, Any], curve: list[dict[str, Any]],
              encoder: FeatureEncoder, model: CTRModel, test: Encoded) -> None:
    out.mkdir(parents=True, exist_ok=True)
    encoder.save(out / ENCODER_FILE)
    (out / CURVE_FILE).write_text(json.dumps(curve, indent=1))
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    rows = test.take(slice(0, PARITY_ROWS))
    np.savez(out / PARITY_FILE, labels=rows.labels,
             **dict(zip(encoder.input_names(), rows.inputs, strict=True)))
    (out / RUN_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))


@dataclass
class Run:
    path: Path
    info: dict[str, Any]
    encoder: FeatureEncoder

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.info["model"])

    def load_model(self) -> CTRModel:
        model = build_model(self.model_config, self.encoder.layout())
        state = torch.load(self.path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()

    def parity_inputs(self) -> Encoded:
        with np.load(self.path / PARITY_FILE) as data:
            names = self.encoder.input_names()
            return Encoded(tuple(data[n] for n in names), data["labels"])


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a run directory")
    missing = [f for f in (RUN_FILE, ENCODER_FILE, WEIGHTS_FILE, PARITY_FILE)
               if not (path / f).exists()]
    if missing:
        raise RunError(f"{path}: incomplete run, missing {missing}")
    try:
        info = json.loads((path / RUN_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path / RUN_FILE}: not valid JSON ({exc})") from None
    return Run(path, info, FeatureEncoder.load(path / ENCODER_FILE))
