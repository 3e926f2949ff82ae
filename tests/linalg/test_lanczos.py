"""Tests of covariant.linalg.lanczos against dense float64 eigensolvers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from covariant.linalg import lanczos

from ._matrices import F64, _mv, _separated, _sym


def _check_pairs(res, a: torch.Tensor, b: torch.Tensor | None = None):
    """Residuals recomputed densely (relative to the spectral radius of B⁻¹A, in the B-norm)
    and B-orthonormality of the Ritz vectors."""
    b = torch.eye(a.shape[0], dtype=F64) if b is None else b
    radius = float(np.abs(scipy.linalg.eigh(a.numpy(), b.numpy(), eigvals_only=True)).max())
    x, lam = res.eigenvectors, res.eigenvalues
    r = torch.linalg.solve(b, a @ x) - x * lam
    rel = torch.sqrt(torch.einsum("ik,ij,jk->k", r, b, r)) / radius
    assert torch.allclose(x.T @ b @ x, torch.eye(len(lam), dtype=F64), atol=1e-10)
    assert bool((rel <= 1e-8).all())
    assert torch.allclose(rel, res.residuals, rtol=0, atol=1e-12)


@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_extreme_eigenvalues(which, indefinite):
    n, k = 200, 3
    eigs = _separated(n, indefinite)
    a = _sym(eigs, seed=11)
    res = lanczos(_mv(a), n, k, which=which)
    ref = torch.linalg.eigvalsh(a).flip(0)  # descending
    expected = {"largest": ref[:k], "smallest": ref[-k:], "both": torch.cat([ref[:k], ref[-k:]])}
    assert res.converged
    assert res.eigenvalues.shape == expected[which].shape
    assert torch.allclose(res.eigenvalues, expected[which], rtol=0, atol=1e-6)
    assert bool((res.residuals <= 1e-8).all())
    _check_pairs(res, a)


def test_lanczos_thick_restarts_converge_on_clustered_spectrum():
    n = 200
    a = _sym(torch.linspace(1.0, 2.0, n, dtype=F64), seed=4)
    res = lanczos(_mv(a), n, 1, num_steps=20)
    assert res.num_restarts > 0 and res.converged
    assert abs(float(res.eigenvalues[0]) - 2.0) <= 1e-6
    _check_pairs(res, a)


@pytest.mark.parametrize("restarts", [False, True])
def test_lanczos_residuals_from_kept_products_are_true_residuals(restarts):
    # A slightly non-symmetric operator: Lanczos' own estimate β|e_mᵀy| cannot see the
    # asymmetry, the residuals formed from the kept products A V must (and equal the dense
    # residual and the recomputed one, which costs k more products).
    n, k = 120, 2
    a = _sym(_separated(n, indefinite=False), seed=3)
    skew = torch.randn(n, n, generator=torch.Generator().manual_seed(9), dtype=F64)
    a = a + 1e-4 * (skew - skew.T)
    steps = 12 if restarts else None
    kept = lanczos(_mv(a), n, k, num_steps=steps)
    again = lanczos(_mv(a), n, k, num_steps=steps, residuals="recompute")
    assert (kept.num_restarts > 0) == restarts
    x, lam = kept.eigenvectors, kept.eigenvalues
    dense = torch.linalg.vector_norm(a @ x - x * lam, dim=0) / float(lam.abs().max())
    assert torch.allclose(kept.residuals, dense, rtol=1e-6, atol=1e-13)
    assert bool((dense > 1e-6).all()) and not kept.converged
    assert torch.allclose(again.residuals, kept.residuals, rtol=1e-6, atol=1e-13)
    assert again.num_matvecs == kept.num_matvecs + k


def test_lanczos_reports_non_convergence_without_raising():
    n = 200
    a = _sym(torch.linspace(1.0, 2.0, n, dtype=F64), seed=4)
    res = lanczos(_mv(a), n, 1, num_steps=8, max_restarts=0)
    assert not res.converged
    assert float(res.residuals[0]) > 1e-8


def test_lanczos_finds_repeated_zero_eigenvalues_of_low_rank_operator():
    n = 60
    u = torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    a = u @ u.T  # rank 4: a 56-fold zero eigenvalue
    res = lanczos(_mv(a), n, 3, which="both")
    ref = torch.linalg.eigvalsh(a).flip(0)
    assert res.converged
    assert torch.allclose(res.eigenvalues[:3], ref[:3], rtol=0, atol=1e-8)
    assert bool((res.eigenvalues[3:].abs() <= 1e-8).all())


def test_lanczos_generalized_matches_scipy_eigh():
    n, k = 150, 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, n, generator=g, dtype=F64)
    h = (x + x.T) / 2  # indefinite
    b = _sym(torch.logspace(0, 2, n, dtype=F64), seed=7)  # SPD, condition 100
    binv_h = torch.linalg.solve(b, h)
    res = lanczos(_mv(binv_h), n, k, which="both", inner_matvec=_mv(b))
    ref = scipy.linalg.eigh(h.numpy(), b.numpy(), eigvals_only=True)[::-1]
    expected = torch.tensor(np.concatenate([ref[:k], ref[-k:]]))
    assert res.converged
    assert torch.allclose(res.eigenvalues, expected, rtol=0, atol=1e-6)
    _check_pairs(res, h, b)
    # The Euclidean Lanczos of B⁻¹H (not self-adjoint there) is not what we computed:
    plain = torch.linalg.eigvalsh(h).flip(0)[:k]
    assert not torch.allclose(res.eigenvalues[:k], plain, atol=1e-2)


def test_lanczos_float32():
    a = _sym(_separated(100, indefinite=False), seed=2)
    res = lanczos(_mv(a.float()), 100, 2, dtype=torch.float32)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    assert res.converged
    expected = torch.tensor([50.0, 30.0], dtype=F64)
    assert torch.allclose(res.eigenvalues.double(), expected, rtol=0, atol=1e-3)
