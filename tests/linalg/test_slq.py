"""Tests of covariant.linalg.slq (SLQ and spectral densities) against dense float64."""

from __future__ import annotations

import pytest
import torch

from covariant.errors import SingularMetricError
from covariant.linalg import dense_spectral_density, hutchinson, slq, spectral_density

from ._matrices import F64, _mm, _mv, _separated, _spd, _sym


def test_slq_logdet_within_three_stderr():
    n = 150
    a = _spd(n, cond=1e2, seed=13)
    res = slq(_mv(a), n, num_probes=20, num_steps=30)
    logdet = float(torch.linalg.slogdet(a)[1])
    assert abs(res.value - logdet) <= 3 * res.stderr
    assert res.nodes.shape == res.weights.shape == (20, 30)
    assert res.num_matvecs == 20 * 30
    assert torch.allclose(res.weights.sum(1), torch.ones(20, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("generalized", [False, True])
def test_slq_is_exact_for_polynomials(generalized):
    """Quadrature error only: with the same probes SLQ of x, x² equals Hutchinson of A, A²."""
    n = 100
    if generalized:
        h = _sym(torch.logspace(-1, 1, n, dtype=F64), seed=14)
        b = _sym(torch.logspace(0, 1, n, dtype=F64), seed=15)
        a, inner = torch.linalg.solve(b, h), _mv(b)
    else:
        a, inner = _sym(_separated(n, indefinite=True), seed=14), None
    for power in (1, 2, 3):
        ap = torch.linalg.matrix_power(a, power)
        ref = hutchinson(_mv(ap), n, 6, seed=4)
        res = slq(
            _mv(a),
            n,
            num_probes=6,
            num_steps=5,
            fn=lambda x, p=power: x**p,
            seed=4,
            inner_matvec=inner,
        )
        assert torch.allclose(res.samples, ref.samples, rtol=1e-9, atol=1e-9)


def test_slq_generalized_logdet_within_three_stderr():
    n = 120
    h = _sym(torch.logspace(-1, 1, n, dtype=F64), seed=16)
    b = _sym(torch.logspace(0, 2, n, dtype=F64), seed=17)
    e = torch.linalg.solve(b, h)
    res = slq(None, n, num_probes=20, num_steps=60, matmat=_mm(e), inner_matmat=_mm(b))
    exact = float(torch.linalg.slogdet(h)[1] - torch.linalg.slogdet(b)[1])  # log det B⁻¹H
    assert abs(res.value - exact) <= 3 * res.stderr
    assert res.num_inner_matvecs > 0


def test_slq_generalized_samples_are_quadratic_forms_of_log():
    """Each sample is zᵀ log(B⁻¹H) z for the Hutchinson probe z, up to quadrature error."""
    n = 100
    h = _sym(torch.logspace(-1, 1, n, dtype=F64), seed=16)
    b = _sym(torch.logspace(0, 1, n, dtype=F64), seed=17)
    e = torch.linalg.solve(b, h)
    w, v = torch.linalg.eig(e)
    log_e = (v @ torch.diag(w.log()) @ torch.linalg.inv(v)).real
    ref = hutchinson(_mv(log_e), n, 5)
    res = slq(_mv(e), n, num_probes=5, num_steps=60, inner_matvec=_mv(b))
    assert torch.allclose(res.samples, ref.samples, rtol=1e-6, atol=0)
    # Without the B-inner product, Lanczos on the non-symmetric B⁻¹H computes something else
    # (e.g. zᵀEᵀEz instead of zᵀE²z).
    square = hutchinson(_mv(e @ e), n, 5)
    right = slq(_mv(e), n, num_probes=5, num_steps=5, fn=torch.square, inner_matvec=_mv(b))
    wrong = slq(_mv(e), n, num_probes=5, num_steps=5, fn=torch.square)
    assert torch.allclose(right.samples, square.samples, rtol=1e-9, atol=0)
    assert not torch.allclose(wrong.samples, square.samples, rtol=1e-2, atol=0)


def test_slq_log_of_indefinite_operator_raises():
    a = _sym(torch.linspace(-1.0, 5.0, 50, dtype=F64), seed=18)
    with pytest.raises(SingularMetricError, match="not positive definite"):
        slq(_mv(a), 50, num_probes=2, num_steps=10)


def test_slq_handles_early_invariant_subspace():
    n = 60
    d = torch.tensor([1.0, 2.0, 3.0], dtype=F64).repeat(n // 3)
    res = slq(lambda v: d * v, n, num_probes=3, num_steps=20)
    assert res.value == pytest.approx(float(d.log().sum()), rel=1e-12)
    assert bool((res.weights[:, 3:] == 0).all())


def test_spectral_density_integrates_to_one_and_matches_dense():
    n = 200
    eigs = torch.cat([torch.linspace(0.0, 1.0, 150, dtype=F64), torch.linspace(4.0, 5.0, 50)])
    a = _sym(eigs.to(F64), seed=19)
    res = slq(None, n, num_probes=30, num_steps=40, fn=lambda x: x, matmat=_mm(a))
    grid = torch.linspace(-2.0, 7.0, 3001, dtype=F64)
    sigma = 0.15
    rho = spectral_density(res.nodes, res.weights, grid, sigma)
    dense = dense_spectral_density(eigs, grid, sigma)
    assert float(torch.trapezoid(rho, grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(dense, grid)) == pytest.approx(1.0, abs=1e-6)
    # The SLQ density is close to the dense one; equal weights per node would not be.
    l1 = float(torch.trapezoid((rho - dense).abs(), grid))
    flat = spectral_density(res.nodes, torch.ones_like(res.weights), grid, sigma)
    assert l1 < 0.1
    assert float(torch.trapezoid((flat - dense).abs(), grid)) > 2 * l1


@pytest.mark.parametrize("generalized", [False, True])
def test_residual_bounds_enclose_an_eigenvalue(generalized):
    """Each Ritz value θ has an eigenvalue of B⁻¹A within its residual bound r; with as many
    steps as the dimension the Krylov space is exhausted and r is round-off."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    A = M @ M.T / 40 + torch.diag(torch.linspace(0.1, 3.0, 40, dtype=torch.float64))
    B = torch.diag(torch.linspace(0.5, 2.0, 40, dtype=torch.float64)) if generalized \
        else torch.eye(40, dtype=torch.float64)
    evals = torch.linalg.eigvals(torch.linalg.solve(B, A)).real
    kwargs = {"inner_matvec": lambda v: B @ v} if generalized else {}
    res = slq(lambda v: torch.linalg.solve(B, A @ v), 40, num_probes=3, num_steps=12,
              **kwargs)
    dist = (res.nodes.reshape(-1, 1) - evals.reshape(1, -1)).abs().min(1).values
    r = res.residuals.reshape(-1)
    assert bool((dist <= r * (1 + 1e-8) + 1e-12).all())
    assert float(r.max()) > 1e-3  # 12 steps do not converge every node: the bound is not 0
    full = slq(lambda v: torch.linalg.solve(B, A @ v), 40, num_probes=2, num_steps=40,
               **kwargs)
    assert float(full.residuals.max()) < 1e-8
