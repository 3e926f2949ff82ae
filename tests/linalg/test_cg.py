"""Tests of covariant.linalg.cg against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

from covariant.errors import NotConvergedError, SingularMetricError
from covariant.linalg import cg

from ._matrices import F64, _mv, _spd, _sym


def test_cg_matches_dense_solve():
    a = _spd(120, cond=1e3)
    b = torch.randn(120, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = torch.linalg.solve(a, b)
    res = cg(_mv(a), b, rtol=1e-13)
    assert res.converged
    assert torch.linalg.vector_norm(res.x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)
    assert res.residual_norm == pytest.approx(float(torch.linalg.vector_norm(b - a @ res.x)))
    # Jacobi preconditioner and a warm start reach the same solution.
    d = torch.diagonal(a)
    pre = cg(_mv(a), b, x0=exact + 1e-3, preconditioner=lambda r: r / d, rtol=1e-13)
    assert pre.converged
    assert torch.linalg.vector_norm(pre.x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)


def test_cg_float32_default_tolerance():
    a = _spd(60, cond=1e2)
    b = torch.ones(60, dtype=F64)
    exact = torch.linalg.solve(a, b)
    res = cg(_mv(a.float()), b.float())
    assert res.converged and res.x.dtype == torch.float32
    err = torch.linalg.vector_norm(res.x.double() - exact)
    assert err <= 1e-4 * torch.linalg.vector_norm(exact)


def test_cg_not_converged_raises_with_maxiter_2():
    a = _spd(80, cond=1e3)
    b = torch.ones(80, dtype=F64)
    with pytest.raises(NotConvergedError, match=r"after 2 iterations.*maxiter"):
        cg(_mv(a), b, maxiter=2)
    res = cg(_mv(a), b, maxiter=2, raise_on_failure=False)
    assert not res.converged and res.num_iters == 2


def test_cg_indefinite_raises_singular_metric_error():
    a = _sym(torch.linspace(-1.0, 5.0, 50, dtype=F64), seed=3)
    b = torch.ones(50, dtype=F64)
    with pytest.raises(SingularMetricError, match=r"not positive definite.*Damped"):
        cg(_mv(a), b)


def test_cg_zero_rhs_is_zero_solution():
    res = cg(_mv(_spd(10)), torch.zeros(10, dtype=F64), x0=torch.ones(10, dtype=F64))
    assert res.converged and res.num_matvecs == 0 and bool((res.x == 0).all())
