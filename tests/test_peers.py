"""Cross-checks against curvlinops, the peer the benchmarks compare with (optional).

curvlinops-for-pytorch (3.x) computes the same curvature products by its own code
(``torch.func`` forward-over-reverse for the Hessian, its own GGN products), so agreement to
1e-10 in float64 is an independent check of covariant's Euclidean HVP and GGN matvec, and of
the ``eigsh`` wiring that ``benchmarks/bench_flatness.py`` times (against a dense float64
eigendecomposition). Skipped where curvlinops is not installed
(``benchmarks/install_peers.sh`` installs it next to a CPU torch, never in the core install).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv

try:
    import curvlinops
except Exception as err:  # missing, or not importable against this torch
    pytest.skip(f"curvlinops is not installed ({type(err).__name__}: {err}); "
                "benchmarks/install_peers.sh installs it", allow_module_level=True)

RTOL = 1e-10


def _problem(loss: str, seed: int = 0):
    """A small smooth float64 MLP (tanh) on random data, its loss, and one batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    X = torch.randn(20, 5, dtype=torch.float64)
    if loss == "ce":
        crit: nn.Module = nn.CrossEntropyLoss()
        y = torch.randint(0, 3, (20,))
    else:
        crit = nn.MSELoss()
        y = torch.randn(20, 3, dtype=torch.float64)
    params = list(model.parameters())
    space, theta = cv.ParameterSpace.from_module(model, crit, (X, y))
    # covariant's flat vector is the parameters in module order, as curvlinops' list format
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in params]))
    return model, crit, params, X, y, space, theta


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_euclidean_hvp_matches_curvlinops_hessian(loss):
    model, crit, params, X, y, space, theta = _problem(loss)
    H = curvlinops.HessianLinearOperator(model, crit, params, [(X, y)])
    V = torch.randn(theta.shape[0], 4, dtype=torch.float64)
    theirs = H @ V
    ours = torch.stack([space.hvp(theta, v, riemannian=False) for v in V.T], 1)
    assert _relerr(ours, theirs) < RTOL
    # and both against the dense float64 Hessian (the ground truth of both)
    Hd = space.hessian(theta, riemannian=False)
    assert _relerr(ours, Hd @ V) < RTOL


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_matvec_matches_curvlinops_ggn(loss):
    model, crit, params, X, y, space, theta = _problem(loss, seed=1)
    G = curvlinops.GGNLinearOperator(model, crit, params, [(X, y)])
    ggn = cv.metrics.GGN.from_space(space)
    V = torch.randn(theta.shape[0], 4, dtype=torch.float64)
    theirs = G @ V
    ours = torch.stack([ggn.matvec(theta, v) for v in V.T], 1)
    assert _relerr(ours, theirs) < RTOL
    # the GGN differs from the Hessian here (a nonlinear net): the check can fail
    assert _relerr(space.hessian(theta, riemannian=False) @ V, theirs) > 1e-3


def test_eigsh_on_curvlinops_matches_dense_and_our_lanczos():
    """The benchmark's peer call (eigsh on to_scipy) and our top-5 agree with eigvalsh."""
    from scipy.sparse.linalg import eigsh

    model, crit, params, X, y, space, theta = _problem("ce", seed=2)
    H = curvlinops.HessianLinearOperator(model, crit, params, [(X, y)])
    truth = torch.linalg.eigvalsh(space.hessian(theta, riemannian=False)).flip(0)[:5]
    theirs = torch.tensor(sorted(eigsh(H.to_scipy(), k=5, which="LA", tol=1e-12,
                                       return_eigenvectors=False), reverse=True))
    ours = cv.flatness(space, theta, measures=("top_eigs",), method="stochastic", k=5,
                       lanczos_tol=1e-10, seed=0)["top_eigs"]
    assert _relerr(theirs, truth) < 1e-9
    assert _relerr(torch.as_tensor(ours.value), truth) < 1e-9
