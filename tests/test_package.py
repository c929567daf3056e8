"""The distribution: one import package, `ctrserve`, whose layers keep their top-level folders
in the repository (pyproject.toml maps them), and an import graph that keeps the layers.

The wheel is built from the checkout and unpacked as pip would install it; the tests read it,
import from it in a fresh interpreter outside the checkout, and run import-linter's contracts
(pyproject.toml [tool.importlinter]) on it: import-linter reads a package from disk, and the
editable install maps the layers' folders in at import time, so the wheel is what it can read.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("service", "training", "models", "features", "bundles", "loadtest")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from the checkout, unpacked into a folder (a pip --target install)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ into the source tree, which tests running in
    # parallel must not share
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("ctrserve", *LAYERS):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp), str(source)], check=True,
                   capture_output=True, cwd=tmp)
    (wheel,) = tmp.glob("ctrserve-*.whl")
    target = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return target


def _python(target: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=target.parent, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_wheel_holds_one_top_level_package_with_every_module(installed: Path) -> None:
    tops = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    assert tops == {"ctrserve"}
    expected = {f"ctrserve/{layer}/{p.relative_to(REPO / layer)}"
                for layer in LAYERS for p in (REPO / layer).rglob("*")
                if p.suffix in (".py", ".sql") and "__pycache__" not in p.parts}
    expected |= {f"ctrserve/{p.relative_to(REPO / 'ctrserve')}"
                 for p in (REPO / "ctrserve").rglob("*.py") if "__pycache__" not in p.parts}
    shipped = {str(p.relative_to(installed)) for p in (installed / "ctrserve").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert expected - shipped == set()
    assert {s for s in shipped if s.endswith(".sql")} == {
        e for e in expected if e.endswith(".sql")} != set()


def test_importing_every_module_brings_no_generic_top_level_name(installed: Path) -> None:
    out = _python(installed, """
import importlib, json, pkgutil, sys
import ctrserve
names = [m.name for m in pkgutil.walk_packages(ctrserve.__path__, "ctrserve.")
         if not m.name.startswith("ctrserve.loadtest.peers.")  # the peers' own environments
         and not m.name.endswith(".__main__")]
for name in names:
    importlib.import_module(name)
tops = sorted({m.split(".")[0] for m in sys.modules} & {"service", "training", "models",
                                                         "features", "bundles", "loadtest"})
files = sorted({sys.modules[n].__file__ for n in names})
print(json.dumps({"modules": len(names), "tops": tops, "files": files}))
""")
    result = json.loads(out)
    assert result["tops"] == []
    assert result["modules"] > 100
    assert all(f.startswith(str(installed)) for f in result["files"])


def _lint_imports(site: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(lint), "--no-cache", str(REPO / "pyproject.toml")],
                          capture_output=True, text=True, cwd=site.parent, env=env, timeout=300)


def test_the_import_contracts_hold(installed: Path) -> None:
    done = _lint_imports(installed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_a_scorer_module_that_imports_torch_breaks_the_contracts(installed: Path,
                                                                 tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    (site / "ctrserve" / "service" / "uses_torch.py").write_text(
        "from ctrserve.training import train  # noqa\nimport torch  # noqa\n")
    done = _lint_imports(site)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Contracts: 0 kept, 2 broken." in done.stdout
    assert "ctrserve.service.uses_torch -> torch" in done.stdout


def test_the_trainer_uses_the_service_only_through_its_state_interface() -> None:
    used = set()
    for path in (REPO / "training").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "ctrserve.service"):
                used |= {node.module} if node.module != "ctrserve.service" else {
                    f"ctrserve.service.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith("ctrserve.service")}
    assert used == {"ctrserve.service.state"}
