#!/usr/bin/env bash
# The peer libraries of loadtest/bench_training.py in their own virtual environment.
#
#   bash loadtest/peers/setup.sh          creates .venv-peers (gitignored) beside the checkout
#
# FuxiCTR and DeepCTR-Torch are benchmark peers only: never dependencies of ctrserve. The
# runners in this folder read the split that the harness exported (.npz), so ctrserve itself
# is not installed here. torch comes first, pinned to the CPU build served on these machines
# (any other torch version pulls GBs of CUDA packages); after every install the script checks
# that torch is still that build and stops if a peer's dependencies replaced it.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
FUXICTR_VERSION=2.3.10
DEEPCTR_TORCH_VERSION=0.3.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
pip() { "$VENV/bin/python" -m pip install -q "$@"; }
check_torch() {
  local v
  v=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
  case "$v" in
    "$TORCH_VERSION"|"$TORCH_VERSION"+cpu) echo "torch $v ($1)" ;;
    *) echo "setup.sh: torch is $v after $1, expected $TORCH_VERSION (CPU build)" >&2; exit 1 ;;
  esac
}

pip "torch==$TORCH_VERSION"
check_torch "torch"

# DeepCTR-Torch declares torch>=2.4, tqdm, scikit-learn; its package __init__ also imports
# requests (undeclared) for a version check that run_deepctr.py switches off.
pip --no-deps "deepctr-torch==$DEEPCTR_TORCH_VERSION"
pip numpy scikit-learn tqdm requests
check_torch "deepctr-torch"

# FuxiCTR declares no torch; its dataloader package imports ray and its metrics polars, so
# its own dependencies (ray[data], polars, pandas, h5py, ...) are installed as it asks.
pip "fuxictr==$FUXICTR_VERSION"
check_torch "fuxictr"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sys
import types

sys.modules["deepctr_torch.utils"] = types.SimpleNamespace(check_version=lambda v: None)
import deepctr_torch.models  # noqa: E402,F401
import fuxictr.pytorch.dataloaders  # noqa: E402,F401
import fuxictr.pytorch.layers  # noqa: E402,F401
import fuxictr.pytorch.models  # noqa: E402,F401
import torch  # noqa: E402

print("peers ready:", ", ".join(f"{p} {md.version(p)}" for p in
                                ("torch", "fuxictr", "deepctr-torch", "numpy", "scikit-learn")))
PY
