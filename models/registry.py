"""Model names accepted by the CLI and the classes behind them."""

from __future__ import annotations

from typing import Any

from ctrserve.models.apg_deepfm import APGDeepFM
from ctrserve.models.base import CTRModel, ModelConfig
from ctrserve.models.ccpm import CCPM
from ctrserve.models.deepfm import DeepFM
from ctrserve.models.ffm import FFM
from ctrserve.models.fm import FM
from ctrserve.models.fnn import FNN
from ctrserve.models.kpnn import KFM, KPNN
from ctrserve.models.lr import LR
from ctrserve.models.pin import NIFM, PIN
from ctrserve.models.pnn import IPNN, OPNN, DeepFMIPNN, DeepFMOPNN, DeepFMPNNStar, PNNStar

MODELS: dict[str, type[CTRModel]] = {
    "lr": LR,
    "fm": FM,
    "deepfm": DeepFM,
    "apg-deepfm": APGDeepFM,
    "ipnn": IPNN,
    "opnn": OPNN,
    "pnn-star": PNNStar,
    "deepfm-ipnn": DeepFMIPNN,
    "deepfm-opnn": DeepFMOPNN,
    "deepfm-pnn-star": DeepFMPNNStar,
    "fnn": FNN,
    "ffm": FFM,
    "ccpm": CCPM,
    "kpnn": KPNN,
    "pin": PIN,
    "kfm": KFM,
    "nifm": NIFM,
}


def build_model(config: ModelConfig, layout: dict[str, Any]) -> CTRModel:
    if config.name not in MODELS:
        raise ValueError(f"unknown model {config.name!r}; expected one of {sorted(MODELS)}")
    return MODELS[config.name](config, layout)
