"""Tests of covariant.linalg.nystrom against dense float64 matrices."""

from __future__ import annotations

import pytest
import torch

from covariant.linalg import cg
from covariant.linalg.nystrom import NystromPreconditioner, nystrom

F64 = torch.float64


def _psd(d: int, lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    lam = torch.cat([lam, torch.zeros(d - lam.shape[0], dtype=F64)])
    return (Q * lam) @ Q.T


def test_exact_on_a_matrix_of_lower_rank():
    # rank 20 < ℓ = 30: the Nyström approximation is A itself (up to the shift ν)
    A = _psd(200, 10.0 ** torch.linspace(1, -3, 20, dtype=F64))
    approx = nystrom(lambda V: A @ V, 200, 30, seed=3)
    rebuilt = (approx.U * approx.eigenvalues) @ approx.U.T
    assert float((rebuilt - A).norm()) <= 1e-10 * float(A.norm())
    assert torch.allclose(approx.U.T @ approx.U, torch.eye(30, dtype=F64), atol=1e-12)
    top = torch.linalg.eigvalsh(A).flip(0)[:20]
    assert torch.allclose(approx.eigenvalues[:20], top, rtol=1e-9, atol=1e-12)
    assert approx.num_matvecs == 30


def test_preconditioner_is_the_closed_form_and_spd():
    A = _psd(150, 10.0 ** torch.linspace(2, -6, 150, dtype=F64))
    mu = 1e-3
    approx = nystrom(lambda V: A @ V, 150, 50, seed=0)
    P = NystromPreconditioner(approx, mu)
    U, lam = approx.U, approx.eigenvalues
    dense = (lam[-1] + mu) * (U / (lam + mu)) @ U.T + torch.eye(150, dtype=F64) - U @ U.T
    probe = torch.eye(150, dtype=F64)
    applied = torch.stack([P(e) for e in probe], 1)
    assert float((applied - dense).norm()) <= 1e-12 * float(dense.norm())
    assert float(torch.linalg.eigvalsh(0.5 * (dense + dense.T))[0]) > 0
    # the preconditioned spectrum (that of P^{-1/2}(A + μI)P^{-1/2}) spans far less
    shifted = A + mu * torch.eye(150, dtype=F64)
    evals = torch.linalg.eigvals(dense @ shifted).real
    before = torch.linalg.eigvalsh(shifted)
    assert float(evals.max() / evals.min()) < 1e-2 * float(before[-1] / before[0])


def test_pcg_agrees_with_dense_solve_in_fewer_iterations():
    A = _psd(400, 10.0 ** torch.linspace(2, -9, 400, dtype=F64), seed=1)
    mu = 1.0  # condition number 1e2: rtol 1e-12 pins the solution to 1e-10
    b = torch.randn(400, generator=torch.Generator().manual_seed(2), dtype=F64)
    exact = torch.linalg.solve(A + mu * torch.eye(400, dtype=F64), b)
    plain = cg(lambda v: A @ v + mu * v, b, rtol=1e-12)
    P = NystromPreconditioner(nystrom(lambda V: A @ V, 400, 100, seed=0), mu)
    pre = cg(lambda v: A @ v + mu * v, b, rtol=1e-12, preconditioner=P)
    for res in (plain, pre):
        assert float((res.x - exact).norm()) <= 1e-10 * float(exact.norm())
    assert pre.num_iters < plain.num_iters / 3


def test_rejects_bad_arguments():
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="rank"):
        nystrom(lambda V: A @ V, 5, 6)
    with pytest.raises(ValueError, match="mu"):
        NystromPreconditioner(nystrom(lambda V: A @ V, 5, 2), 0.0)
