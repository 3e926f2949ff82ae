"""The peers the benchmarks compare with, as their users call them (not part of the library).

- :func:`peer_versions`: which peers are importable here, and their versions ("not installed"
  otherwise), so that a missing peer is skipped and recorded instead of failing the run;
- curvlinops (``curvlinops-for-pytorch`` 3.x): its ``HessianLinearOperator``,
  ``hutchinson_trace`` on it, and ``scipy.sparse.linalg.eigsh`` on its ``to_scipy()``
  wrapper (what a curvlinops user runs for top eigenvalues).

PyHessian's shims stay in ``_common`` (:data:`_common.PYHESSIAN_NOTES`). Install both peers
next to a CPU torch with ``benchmarks/install_peers.sh``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import nn

NOT_INSTALLED = "not installed"

# import name -> distribution name
PEERS = {"pyhessian": "pyhessian", "curvlinops": "curvlinops-for-pytorch"}

CURVLINOPS_NOTES = [
    "HessianLinearOperator(model, crit, params, [(X, y)], check_deterministic=False): one "
    "batch, so its normalisation is 1 and the operator is the Hessian of crit's mean loss on "
    "that batch, the same one ours and PyHessian use. check_deterministic=True (its default) "
    "costs extra products at construction; it is switched off in favour of the peer.",
    "curvlinops 3.x operators are torch-based (PyTorchLinearOperator): `H @ M` multiplies a "
    "(d,) vector or a (d, m) matrix; hutchinson_trace(H, num_matvecs=N) draws all N "
    "Rademacher probes at once and runs one vmapped matmat (torch.func jvp of jacrev) on them.",
    "eigsh runs on H.to_scipy() (a scipy LinearOperator whose products run in torch float32; "
    "to_scipy's dtype defaults to float64, so ARPACK works in float64), which='LA' (the k "
    "largest, as ours), return_eigenvectors=False (cheaper, in favour of the peer), the "
    "default ncv, and a fixed v0 (seeded) so that runs repeat.",
]


def peer_versions() -> dict[str, str]:
    """``{import name: version or "not installed"}`` for each peer."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for mod, dist in PEERS.items():
        try:
            importlib.import_module(mod)
        except Exception:  # missing, or broken against this torch
            out[mod] = NOT_INSTALLED
            continue
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:
            out[mod] = "unknown version"
    return out


def available(versions: dict[str, str], peer: str) -> bool:
    return versions.get(peer, NOT_INSTALLED) != NOT_INSTALLED


def curvlinops_hessian(model: nn.Module, crit: nn.Module, X: torch.Tensor,
                       y: torch.Tensor) -> Any:
    """curvlinops' Hessian operator of ``crit(model(X), y)`` (one batch)."""
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, crit, params, [(X, y)], check_deterministic=False)


def curvlinops_trace(model: nn.Module, crit: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     num_probes: int, seed: int = 0) -> float:
    """``hutchinson_trace(HessianLinearOperator(...), num_matvecs=N)`` (Rademacher probes)."""
    from curvlinops import hutchinson_trace

    torch.manual_seed(seed)
    H = curvlinops_hessian(model, crit, X, y)
    return float(hutchinson_trace(H, num_matvecs=num_probes))


def curvlinops_eigsh(model: nn.Module, crit: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     k: int, tol: float, seed: int = 0) -> tuple[list[float], int]:
    """Top-k eigenvalues by ``scipy.sparse.linalg.eigsh`` on curvlinops' Hessian, descending,
    and the number of Hessian-vector products ARPACK asked for."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    H = curvlinops_hessian(model, crit, X, y).to_scipy()
    count = {"matvecs": 0}

    def mv(v: np.ndarray) -> np.ndarray:
        count["matvecs"] += 1 if v.ndim == 1 else v.shape[1]
        return H @ v

    A = LinearOperator(H.shape, matvec=mv, dtype=H.dtype)
    v0 = np.random.default_rng(seed).standard_normal(H.shape[0])
    vals = eigsh(A, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return sorted((float(v) for v in vals), reverse=True), count["matvecs"]
