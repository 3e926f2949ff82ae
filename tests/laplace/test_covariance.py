"""Covariance operators: dense truth for each, the (2,0) rule, samples with the covariance."""

from __future__ import annotations

import torch

from covariant import laplace as cvl
from covariant.laplace.covariance import DenseCovariance, DiagonalCovariance, LowRankCovariance
from covariant.metrics import Constant

from ._problems import CHARTS, _in_chart, _t


def test_covariance_is_a_20_tensor(problem):
    space, theta = problem
    sig_theta = cvl.laplace(space, theta, riemannian=True).covariance
    h = CHARTS["affine∘sinh"]()
    new, psi = _in_chart(space, theta, h, riemannian=True)
    res = cvl.laplace(new, psi, riemannian=True)
    J = h.jacobian(psi)
    expected = torch.linalg.solve(J, torch.linalg.solve(J, sig_theta).T)  # J⁻¹ Σ J⁻ᵀ
    assert torch.allclose(res.covariance, expected, rtol=1e-8, atol=1e-12)
    # the classic one (at the classic MAP, with the Euclidean Hessian) is not
    new_c, psi_c = _in_chart(space, theta, h, riemannian=False)
    sig_c = cvl.laplace(new_c, psi_c, riemannian=False).covariance
    Jc = h.jacobian(psi_c)
    mapped = Jc @ sig_c @ Jc.T
    assert float((mapped - sig_theta).abs().max()) > 1e-3


def test_samples_have_the_covariance(problem):
    space, theta = problem
    for structure in ("full", "diag", "lowrank"):
        res = cvl.laplace(space, theta, riemannian=False, structure=structure, rank=1,
                          lowrank_floor=1.0)
        S = res.sample(4000, seed=1)
        assert S.shape == (4000, 2)
        cov = res.covariance if isinstance(res.covariance, torch.Tensor) else \
            res.covariance.dense()
        assert torch.allclose(S.mean(0), theta, atol=0.05)
        assert float((torch.cov(S.T) - cov).abs().max() / cov.abs().max()) < 0.1
        assert torch.allclose(res.covariance_operator.dense(), cov)


def _check_operator(op, sigma):
    """matvec, matmat, diagonal, dense and S Sᵀ = Σ against the dense Σ."""
    d = sigma.shape[0]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    M = torch.randn(d, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(op.dense(), sigma, atol=1e-12)
    assert torch.allclose(op.matvec(v), sigma @ v, atol=1e-12)
    assert torch.allclose(op.matmat(M), sigma @ M, atol=1e-12)
    assert torch.allclose(op.diagonal(), torch.diagonal(sigma), atol=1e-12)
    S = op.sqrt_matmat(torch.eye(d, dtype=torch.float64))
    assert torch.allclose(S @ S.T, sigma, atol=1e-12)
    summary = op.summary()
    assert summary["dim"] == d


def test_each_operator_against_its_dense_matrix():
    A = _t([[3.0, 0.5, 0.2], [0.5, 2.0, 0.1], [0.2, 0.1, 1.5]])
    _check_operator(DenseCovariance(torch.linalg.cholesky(A)), torch.linalg.inv(A))
    h = _t([2.0, 4.0, 0.5])
    _check_operator(DiagonalCovariance(h), torch.diag(1 / h))
    # low rank in a G-inner product: precision λ₀G + Σ (λ_i − λ₀) G u uᵀ G
    G = _t([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.5]])
    u = torch.linalg.solve(torch.linalg.cholesky(G).T, _t([1.0, 0.0, 0.0]))  # uᵀGu = 1
    lam, floor = _t([5.0]), 0.7
    P = floor * G + (lam[0] - floor) * (G @ u)[:, None] * (G @ u)[None, :]
    op = LowRankCovariance(u[:, None], lam, floor, Constant(G), torch.zeros(3,
                                                                          dtype=torch.float64))
    _check_operator(op, torch.linalg.inv(P))
    assert op.summary()["eigenvalues"] == [5.0] and op.summary()["floor"] == floor
