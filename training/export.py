"""`ctrserve export`: a trained run becomes a verified, immutable ONNX bundle in a registry."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ctrserve.bundles.load import load_bundle
from ctrserve.bundles.manifest import (
    MODEL_FILE,
    PARITY_TOLERANCE,
    Manifest,
    Parity,
    TensorInfo,
    content_version,
    sha256_file,
)
from ctrserve.bundles.registry import install
from ctrserve.common.errors import UserError
from ctrserve.models.base import CTRModel, ProbabilityHead
from ctrserve.training.abundance import (
    ABUNDANCE_FILE,
    compute_abundance,
    manifest_summary,
    read_abundance,
)
from ctrserve.training.batches import Encoded
from ctrserve.training.evaluate import predict
from ctrserve.training.run_dir import Run, load_run

OUTPUT_NAME = "probability"
OPSET = 18


class ExportError(UserError):
    """Export that must not produce a bundle (for instance parity above tolerance)."""


def export_run(run_dir: str | Path, registry: str | Path) -> Path:
    """Export, check parity against PyTorch, write the manifest, install; returns the bundle."""
    run = load_run(run_dir)
    model = run.load_model()
    rows = run.parity_inputs()
    fold_diff = _fold(model, rows)
    staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(Path(registry))))
    _to_onnx(model, rows, staged / MODEL_FILE)
    parity = _parity(model, rows, staged / MODEL_FILE, fold_diff)
    manifest = _manifest(run, model, staged / MODEL_FILE, parity)
    manifest.write(staged)
    bundle = install(staged, Path(registry), manifest)
    load_bundle(bundle)  # the same verification every scorer runs before serving
    return bundle


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fold(model: CTRModel, rows: Encoded) -> float | None:
    """Fold APG over-parameterisation into single matrices; returns the output change."""
    if not hasattr(model, "fold"):
        return None
    before = predict(model, rows)
    model.fold()
    return float(np.abs(predict(model, rows) - before).max())


def _to_onnx(model: CTRModel, rows: Encoded, path: Path) -> None:
    head = ProbabilityHead(model).eval()
    example = tuple(torch.from_numpy(np.ascontiguousarray(x[:4])) for x in rows.inputs)
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in example)
    # the exporter narrates its steps on stdout and warns about torchvision; keep stdout clean
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(head, example, dynamo=True, dynamic_shapes=(shapes,),
                                    input_names=list(model.input_names),
                                    output_names=[OUTPUT_NAME], opset_version=OPSET,
                                    external_data=False, verbose=False)
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))


def _parity(model: CTRModel, rows: Encoded, path: Path, fold_diff: float | None) -> Parity:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(model.input_names, rows.inputs, strict=True))
    onnx_probs = session.run([OUTPUT_NAME], feeds)[0]
    torch_probs = predict(model, rows)
    diff = float(np.abs(onnx_probs - torch_probs).max())
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"ONNX/PyTorch parity {diff:.2e} over {len(rows)} rows exceeds "
                          f"{PARITY_TOLERANCE:.0e}; no bundle written")
    return Parity(rows=len(rows), max_abs_diff=diff, fold_max_abs_diff=fold_diff)


def _manifest(run: Run, model: CTRModel, model_file: Path, parity: Parity) -> Manifest:
    sha = sha256_file(model_file)
    encoder = run.encoder.to_dict()
    graph = onnx.load(str(model_file), load_external_data=False).graph
    inputs = [_tensor_info(v) for v in graph.input]
    return Manifest(
        version=content_version(sha, encoder),
        model_type=run.info["model"]["name"],
        hyperparameters={"model": run.info["model"], "train": run.info["train"]},
        encoder=encoder,
        inputs=inputs,
        outputs=[_tensor_info(v) for v in graph.output],
        data=run.info["data"],
        metrics=run.info["metrics"],
        parity=parity,
        sha256=sha,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        producer={"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET,
                  "onnxruntime": ort.__version__},
        run={"path": str(run.path.resolve()), "created_at": run.info.get("created_at")},
        abundance=_abundance(run, model),
    )


def _abundance(run: Run, model: CTRModel) -> dict[str, Any] | None:
    """The compact information-abundance summary: the run's abundance.json, or computed from
    the model for runs written before it existed; None for models without embeddings."""
    if (run.path / ABUNDANCE_FILE).is_file():
        result = read_abundance(run.path)
    else:
        result = compute_abundance(model, run.encoder.layout())
    return manifest_summary(result) if result is not None else None


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return TensorInfo(name=value.name, dtype=dtype, shape=dims)
