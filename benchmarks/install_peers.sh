#!/usr/bin/env bash
# Install the peers that covariant's benchmarks and optional tests compare with, next to the
# torch that is already installed (typically the CPU wheel), WITHOUT pulling another torch.
#
#   PyHessian 0.1                 pyhessian.hessian(...).trace / .eigenvalues
#   curvlinops-for-pytorch 3.0.1  HessianLinearOperator, KFACLinearOperator, hutchinson_trace,
#                                 .to_scipy() (eigsh); covariant.metrics.from_curvlinops
#   laplace-torch 0.3             Laplace(..., hessian_structure="kron" | "full"),
#                                 log_marginal_likelihood (benchmarks/compat_laplace_torch.py)
#
# Why --no-deps: curvlinops declares backpack-for-pytorch, which declares torchvision, and
# laplace-torch declares torchvision and asdfghjkl==0.1a4 as well; resolving those pulls a CUDA
# torch of several GB over a CPU one. The packages below are the ones curvlinops 3.0.1 and
# laplace-torch 0.3 actually import; all of them are pure Python on top of torch, numpy, scipy
# (covariant's own dependencies), tqdm and packaging (both installed here too, --no-deps).
# PyHessian needs only torch and numpy.
# laplace-torch's own imports: torchmetrics (needs lightning-utilities), opt_einsum, and its
# curvature backends curvlinops, backpack (both above) and asdl, which laplace/baselaplace.py
# imports unconditionally; the PyPI package asdfghjkl 0.1a4 is that module `asdl` (pure Python
# on torch and numpy). The old `asdfghjkl` module (laplace-torch's Asdfghjkl* backends,
# LowRankLaplace) is a git-only install and is left out.
#
# These are benchmark-only peers: never part of covariant's core install or of an extra in
# pyproject.toml (the `bench` extra there names pyhessian only). tests/test_peers.py and
# tests/metrics/test_external.py use curvlinops when present and are skipped otherwise.
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
    "$PY" -m pip install --no-deps "laplace-torch==0.3" "asdfghjkl==0.1a4" torchmetrics \
        lightning-utilities opt_einsum tqdm packaging
fi

after="$(torch_version)"
if [[ "$before" != "$after" ]]; then
    echo "install_peers.sh: torch changed from $before to $after" >&2
    exit 1
fi
"$PY" - <<'EOF'
import importlib.metadata as md

import curvlinops  # noqa: F401
import laplace  # noqa: F401
import pyhessian  # noqa: F401
import torch
from laplace.curvature import BackPackGGN, CurvlinopsGGN  # noqa: F401  (the kron backends)

print(f"torch {torch.__version__}, pyhessian {md.version('pyhessian')}, "
      f"curvlinops-for-pytorch {md.version('curvlinops-for-pytorch')}, "
      f"laplace-torch {md.version('laplace-torch')}: importable")
EOF
