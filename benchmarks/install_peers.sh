#!/usr/bin/env bash
# Install the peers that benchmarks/bench_flatness.py compares covariant with, next to the
# torch that is already installed (typically the CPU wheel), WITHOUT pulling another torch.
#
#   PyHessian 0.1                 pyhessian.hessian(...).trace / .eigenvalues
#   curvlinops-for-pytorch 3.0.1  HessianLinearOperator, hutchinson_trace, .to_scipy() (eigsh)
#
# Why --no-deps: curvlinops declares backpack-for-pytorch, which declares torchvision, and
# resolving those pulls a CUDA torch of several GB over a CPU one. The packages below are the
# ones curvlinops 3.0.1 actually imports; all of them are pure Python on top of torch, numpy and
# scipy (covariant's own dependencies). PyHessian needs only torch and numpy.
#
# These are benchmark-only peers: never part of covariant's core install or of an extra in
# pyproject.toml (the `bench` extra there names pyhessian only). tests/test_peers.py uses
# curvlinops when present and is skipped otherwise.
#
# Usage:
#   bash benchmarks/install_peers.sh            # install, then check the imports and torch
#   bash benchmarks/install_peers.sh --check    # only check what is installed
#   PYTHON=/path/to/python bash benchmarks/install_peers.sh
set -euo pipefail

PY="${PYTHON:-python}"

torch_version() { "$PY" -c "import torch; print(torch.__version__)"; }

if ! before="$(torch_version 2>/dev/null)"; then
    echo "install_peers.sh: torch is not importable with $PY; install torch (CPU wheel) first" >&2
    exit 1
fi

if [[ "${1:-}" != "--check" ]]; then
    "$PY" -m pip install --no-deps "pyhessian==0.1"
    "$PY" -m pip install --no-deps "curvlinops-for-pytorch==3.0.1" backpack-for-pytorch \
        einconv linear_operator jaxtyping wadler_lindig einops unfoldNd
fi

after="$(torch_version)"
if [[ "$before" != "$after" ]]; then
    echo "install_peers.sh: torch changed from $before to $after" >&2
    exit 1
fi
"$PY" - <<'EOF'
import importlib.metadata as md

import curvlinops  # noqa: F401
import pyhessian  # noqa: F401
import torch

print(f"torch {torch.__version__}, pyhessian {md.version('pyhessian')}, "
      f"curvlinops-for-pytorch {md.version('curvlinops-for-pytorch')}: importable")
EOF
