"""Load and verify a bundle: hash, parity record, and ONNX inputs that match the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from pydantic import ValidationError

from ctrserve.bundles.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    content_version,
    sha256_file,
)
from ctrserve.common.errors import UserError
from ctrserve.features import FeatureEncoder


class BundleError(UserError):
    """A bundle that must not be served; the message names the file and the problem."""


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    encoder: FeatureEncoder
    session: ort.InferenceSession

    @property
    def version(self) -> str:
        return self.manifest.version


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.exists():
        raise BundleError(f"{file}: missing (not a bundle directory?)")
    try:
        return Manifest.model_validate_json(file.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{file}: field {where!r}: {first['msg']}") from None


def verify_files(path: str | Path) -> Manifest:
    """Check the manifest, the model hash, the version it derives and the parity record,
    without starting a session."""
    path = Path(path)
    manifest = read_manifest(path)
    model = path / MODEL_FILE
    if not model.exists():
        raise BundleError(f"{model}: missing")
    actual = sha256_file(model)
    if actual != manifest.sha256:
        raise BundleError(f"{model}: sha256 {actual[:12]}… does not match the manifest's "
                          f"{manifest.sha256[:12]}…; the bundle was modified or corrupted")
    # the version is derived from the content: a model altered together with its recorded
    # hash must not be served under the genuine version
    derived = content_version(actual, manifest.encoder)
    if derived != manifest.version:
        raise BundleError(f"{path / MANIFEST_FILE}: version {manifest.version} is not the one "
                          f"its model and encoder derive ({derived}); the bundle was modified")
    parity = manifest.parity
    if not parity.max_abs_diff <= parity.tolerance:
        raise BundleError(f"{path / MANIFEST_FILE}: parity {parity.max_abs_diff:.2e} exceeds "
                          f"tolerance {parity.tolerance:.0e}")
    return manifest


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Serving defaults: few threads and no idle spinning (spin-waits burn a core for nothing)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def load_bundle(path: str | Path, providers: list[str] | None = None,
                threads: int = 1) -> Bundle:
    """Verify a bundle and open an onnxruntime session for it."""
    path = Path(path)
    manifest = verify_files(path)
    session = ort.InferenceSession(str(path / MODEL_FILE), sess_options=session_options(threads),
                                   providers=providers or ["CPUExecutionProvider"])
    expected = [t.name for t in manifest.inputs]
    actual = [i.name for i in session.get_inputs()]
    if actual != expected:
        raise BundleError(f"{path / MODEL_FILE}: inputs {actual} differ from manifest {expected}")
    return Bundle(path, manifest, FeatureEncoder.from_dict(manifest.encoder), session)
