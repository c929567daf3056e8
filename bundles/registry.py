"""The registry directory: immutable bundles named `<model_type>-<version>`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ctrserve.bundles.manifest import Manifest


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


def registry_entry(registry: Path, name: str) -> Path | None:
    """The bundle directory `name` of the registry, or None when `name` is not a plain name
    there or leads outside it (a symlink to elsewhere: every scorer would refuse it)."""
    path = registry / name
    if Path(name).name != name or not path.is_dir():
        return None
    return path if path.resolve().is_relative_to(registry.resolve()) else None


def known_bundles(registry: Path, shown: int = 12) -> str:
    """The registry's bundle names for an error message: "a, b, c (and 4 more)"."""
    try:
        names = [p.name for p in list_bundles(registry)]
    except OSError:
        return f"none: {registry} cannot be read"
    if not names:
        return f"none: {registry} holds no bundle"
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[-shown:]) + more
