"""Checks of trained runs and exported bundles that do not trust the exporter's own record.

`independent_parity` rebuilds the run's PyTorch model from its files (run.json, encoder.json,
model.pt) through the public model registry, encodes raw rows of the synthetic world with the
run's encoder, and compares the model's click probabilities in eval mode with what
onnxruntime computes from the bundle's model.onnx on the same rows. Nothing of the manifest's
`parity` record or of the run's parity_inputs.npz is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import torch

from ctrserve.bundles import load_bundle
from ctrserve.features import FeatureEncoder
from ctrserve.models import ModelConfig, build_model

PARITY_ROWS = 2000
PARITY = 1e-5  # the serving contract: ONNX and PyTorch probabilities agree to 1e-5 (APG too:
               # it is exported folded; the fold changes its output by far less)


def raw_rows(synth_dir: Path, rows: int = PARITY_ROWS):
    """The first `rows` impressions of the synthetic world's last day (raw, not encoded)."""
    day = sorted((synth_dir / "impressions").glob("*.parquet"))[-1]
    table = pq.read_table(day)
    assert table.num_rows >= rows, f"{day} has only {table.num_rows} rows"
    return table.slice(0, rows)


def torch_probabilities(run_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The run's PyTorch model (model.pt) in eval mode: sigmoid of its logits, per row."""
    info = json.loads((run_dir / "run.json").read_text())
    encoder = FeatureEncoder.load(run_dir / "encoder.json")
    model = build_model(ModelConfig.from_dict(info["model"]), encoder.layout())
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every weight of the run, nothing left at random
    model.eval()
    with torch.no_grad():
        logits = model(*(torch.from_numpy(np.ascontiguousarray(feeds[name]))
                         for name in encoder.input_names()))
    return torch.sigmoid(logits).numpy().reshape(-1)


def independent_parity(run_dir: Path, bundle_dir: Path, synth_dir: Path,
                       rows: int = PARITY_ROWS) -> float:
    """Max |ONNX - PyTorch| over raw rows, recomputed here; asserts the batch is meaningful."""
    table = raw_rows(synth_dir, rows)
    encoder = FeatureEncoder.load(run_dir / "encoder.json")
    columns = {name: table.column(name) for name in encoder.spec.names}
    feeds = encoder.transform(columns)
    # the bundle's encoder is the run's: the scorer feeds the ONNX model exactly these inputs
    bundle_feeds = load_bundle(bundle_dir).encoder.transform(columns)
    assert sorted(bundle_feeds) == sorted(feeds)
    for name, value in feeds.items():
        np.testing.assert_array_equal(bundle_feeds[name], value, err_msg=name)

    expected = torch_probabilities(run_dir, feeds)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
    assert set(inputs) == set(feeds), "the ONNX model takes every encoded input"
    got = session.run(None, inputs)[0].reshape(-1)
    assert got.shape == expected.shape == (rows,)
    assert np.all(np.isfinite(got)) and np.all((got > 0) & (got < 1))
    # a model that scores every row alike would agree with a constant: the scores must spread
    # well past the tolerance, so that an ONNX model answering one value would fail
    spread = float(np.ptp(expected))
    assert spread > 4 * PARITY, f"the PyTorch model scores all rows within {spread:.1e}"
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
