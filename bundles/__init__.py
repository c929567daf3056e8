"""Model bundles (ONNX + manifest) and the registry directory that holds them; no torch."""

from bundles.load import Bundle, BundleError, load_bundle
from bundles.manifest import Manifest

__all__ = ["Bundle", "BundleError", "Manifest", "load_bundle"]
