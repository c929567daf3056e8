"""Model bundles (ONNX + manifest) and the registry directory that holds them; no torch."""

from ctrserve.bundles.load import Bundle, BundleError, load_bundle
from ctrserve.bundles.manifest import Manifest

__all__ = ["Bundle", "BundleError", "Manifest", "load_bundle"]
