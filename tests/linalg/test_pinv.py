"""Tests of covariant.linalg.pinv_solve against dense float64 pseudo-inverses."""

from __future__ import annotations

import pytest
import torch

from covariant.errors import NonFiniteError, NotConvergedError
from covariant.linalg import cg, pinv_solve

from ._matrices import F64, _mv, _spd, _sym


def _low_rank(n: int, rank: int, seed: int) -> torch.Tensor:
    """A PSD matrix of the given rank with spread nonzero eigenvalues."""
    eigs = torch.cat([torch.logspace(0, 2, rank, dtype=F64), torch.zeros(n - rank, dtype=F64)])
    return _sym(eigs, seed)


@pytest.mark.parametrize("rank", [5, 17, 40])
def test_pinv_solve_matches_dense_pinv(rank):
    a = _low_rank(40, rank, seed=rank)
    b = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=F64)  # has a null part
    exact = torch.linalg.pinv(a, rtol=1e-10, hermitian=True) @ b
    res = pinv_solve(_mv(a), b)
    assert res.converged and res.rank == rank
    assert torch.linalg.vector_norm(res.x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)
    assert res.num_matvecs == res.num_iters <= rank + 1
    # x lies in the range: no component along the null space of a
    evals, evecs = torch.linalg.eigh(a)
    null = evecs[:, evals.abs() <= 1e-8]
    assert float(torch.linalg.vector_norm(null.T @ res.x)) <= 1e-10


def test_pinv_solve_on_spd_matches_solve_and_cg():
    a = _spd(60, cond=1e3)
    b = torch.randn(60, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = torch.linalg.solve(a, b)
    res = pinv_solve(_mv(a), b)
    assert res.converged and res.rank == res.num_iters
    assert torch.linalg.vector_norm(res.x - exact) <= 1e-9 * torch.linalg.vector_norm(exact)
    assert torch.allclose(res.x, cg(_mv(a), b, rtol=1e-13).x, rtol=0, atol=1e-9)


def test_pinv_solve_zero_rhs_and_dtype():
    res = pinv_solve(_mv(_spd(10)), torch.zeros(10, dtype=F64))
    assert res.converged and res.num_matvecs == 0 and bool((res.x == 0).all())
    a = _low_rank(30, 8, seed=1)
    b = torch.ones(30, dtype=F64)
    res32 = pinv_solve(_mv(a.float()), b.float())
    exact = torch.linalg.pinv(a, rtol=1e-10, hermitian=True) @ b
    assert res32.x.dtype == torch.float32 and res32.converged
    assert torch.linalg.vector_norm(res32.x.double() - exact) <= 1e-4 * torch.linalg.vector_norm(
        exact)


def test_pinv_solve_not_converged_and_non_finite():
    a = _spd(50, cond=1e3)
    b = torch.ones(50, dtype=F64)
    with pytest.raises(NotConvergedError, match="did not converge in 3 iterations"):
        pinv_solve(_mv(a), b, maxiter=3)
    res = pinv_solve(_mv(a), b, maxiter=3, raise_on_failure=False)
    assert not res.converged and res.num_iters == 3 and res.residual > 0
    with pytest.raises(NonFiniteError):
        pinv_solve(lambda v: v * float("nan"), b)
    with pytest.raises(NonFiniteError):
        pinv_solve(_mv(a), b * float("inf"))
