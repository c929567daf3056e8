"""The registry directory: immutable bundles named `<model_type>-<version>`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bundles.manifest import Manifest


def bundle_name(manifest: Manifest) -> str:
    return f"{manifest.model_type}-{manifest.version}"


def install(staged: Path, registry: Path, manifest: Manifest) -> Path:
    """Move a fully written bundle into the registry with one atomic rename.

    A bundle with the same content-derived version already present is kept as it is.
    """
    registry.mkdir(parents=True, exist_ok=True)
    target = registry / bundle_name(manifest)
    if target.exists():
        shutil.rmtree(staged)
        return target
    os.replace(staged, target)
    return target


def list_bundles(registry: Path) -> list[Path]:
    return sorted(p for p in registry.iterdir() if (p / "manifest.json").exists())
