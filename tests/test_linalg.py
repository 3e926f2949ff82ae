"""Tests of covariant.linalg against dense float64 ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from covariant.errors import (
    NonFiniteError,
    NotConvergedError,
    ShapeMismatchError,
    SingularMetricError,
)
from covariant.linalg import (
    cg,
    dense_spectral_density,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
    spectral_density,
    xtrace,
)

F64 = torch.float64


def _rotation(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _sym(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q."""
    q = _rotation(eigs.numel(), seed)
    a = q @ torch.diag(eigs.to(F64)) @ q.T
    return (a + a.T) / 2


def _spd(n: int = 120, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    return _sym(torch.logspace(0, np.log10(cond), n, dtype=F64), seed)


def _separated(n: int, indefinite: bool) -> torch.Tensor:
    """A spread spectrum whose three extremes on each side are well separated."""
    if indefinite:
        low, bulk, high = [-10.0, -7.0, -5.0], (-2.0, 3.0), [8.0, 12.0, 20.0]
    else:
        low, bulk, high = [0.1, 0.2, 0.3], (1.0, 5.0), [20.0, 30.0, 50.0]
    mid = torch.linspace(*bulk, n - 6, dtype=F64)
    return torch.cat([torch.tensor(low, dtype=F64), mid, torch.tensor(high, dtype=F64)])


def _mv(a: torch.Tensor):
    return lambda v: a @ v


def _mm(a: torch.Tensor):
    """A block operator: the statistical tests batch their probes to stay fast."""
    return lambda x: a @ x


# --------------------------------------------------------------------------------------------
# CG
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Trace estimators
# --------------------------------------------------------------------------------------------


def _nonsymmetric(n: int = 100) -> torch.Tensor:
    """E = B⁻¹H with H, B SPD: a non-symmetric operator with a real positive spectrum."""
    h = _sym(torch.logspace(-1, 1, n, dtype=F64), seed=21)
    b = _sym(torch.logspace(0, 1, n, dtype=F64), seed=22)
    return torch.linalg.solve(b, h)


ESTIMATORS = [hutchinson, hutchpp, xtrace]


# Share of seeds whose estimate lies within 3 stderr of the truth. Hutchinson's and Hutch++'s
# standard errors are calibrated (≈99.7 % expected); XTrace's error estimate std(t_i)/√n is a
# heuristic of the paper that runs about 1.6× small (≈93 % observed over 300 seeds), so it gets
# a lower bar. A biased estimator, or a stderr off by 2×, fails these.
MIN_COVERAGE = {"hutchinson": 0.9, "hutchpp": 0.9, "xtrace": 0.8}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_trace_within_three_stderr(estimator, distribution, symmetric):
    a = _spd(100, cond=1e2, seed=8) if symmetric else _nonsymmetric(100)
    true = float(torch.trace(a))
    z = []
    for seed in range(20):
        est = estimator(None, 100, 60, seed=seed, distribution=distribution, matmat=_mm(a))
        assert est.stderr > 0 and est.num_matvecs == 60
        assert est.value == pytest.approx(float(est.samples.mean()), rel=1e-12)
        z.append((est.value - true) / est.stderr)
    z = np.array(z)
    assert np.mean(np.abs(z) <= 3) >= MIN_COVERAGE[estimator.__name__]
    assert abs(z.mean()) <= 3 * z.std() / np.sqrt(len(z))  # no detectable bias
    assert 0.4 <= z.std() <= 2.5  # stderr neither far too large nor far too small


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_stderr_is_calibrated(estimator):
    """(estimate − truth)/stderr has unit spread over seeds (±0.27 is 3σ for 60 seeds)."""
    a = _spd(100, cond=1e2, seed=8)
    true = float(torch.trace(a))
    z = []
    for seed in range(60):
        est = estimator(None, 100, 60, seed=seed, matmat=_mm(a))
        z.append((est.value - true) / est.stderr)
    assert 0.73 <= np.std(z) <= 1.27


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_trace_error_shrinks_with_more_matvecs(estimator):
    n = 200
    a = _sym(torch.logspace(-2, 2, n, dtype=F64), seed=9)
    true = float(torch.trace(a))

    def mean_abs_error(m: int) -> float:
        return float(
            np.mean(
                [abs(estimator(None, n, m, seed=s, matmat=_mm(a)).value - true) for s in range(8)]
            )
        )

    assert mean_abs_error(100) < 0.5 * mean_abs_error(10)


def test_hutchpp_and_xtrace_need_far_fewer_matvecs_on_decaying_spectrum():
    n = 200
    eigs = 0.7 ** torch.arange(n, dtype=F64)
    a = _sym(eigs, seed=10)
    true = float(eigs.sum())

    def err(estimator, m: int) -> float:
        return float(
            np.mean(
                [abs(estimator(None, n, m, seed=s, matmat=_mm(a)).value - true) for s in range(8)]
            )
        )

    hutch_300 = err(hutchinson, 300)
    for estimator in (hutchpp, xtrace):
        e30 = err(estimator, 30)
        assert e30 < 0.2 * err(hutchinson, 30)
        assert e30 < hutch_300  # 30 products beat Hutchinson's 300


@pytest.mark.parametrize("estimator", [hutchpp, xtrace])
def test_trace_exact_when_budget_covers_dim(estimator):
    a = _nonsymmetric(30)
    est = estimator(_mv(a), 30, 40)
    assert est.value == pytest.approx(float(torch.trace(a)), rel=1e-12)
    assert est.stderr == 0.0 and est.num_matvecs == 30


def test_matmat_batches_give_the_same_estimates():
    a = _spd(80, seed=12)
    ref = hutchinson(_mv(a), 80, 13)
    batched = hutchinson(None, 80, 13, matmat=lambda x: a @ x, batch_size=5)
    assert torch.allclose(ref.samples, batched.samples, rtol=1e-12)
    for estimator in (hutchpp, xtrace):
        assert estimator(None, 80, 30, matmat=lambda x: a @ x).value == pytest.approx(
            estimator(_mv(a), 80, 30).value, rel=1e-12
        )


def test_trace_estimators_float32():
    a = _spd(60, cond=1e2)
    true = float(torch.trace(a))
    for estimator in ESTIMATORS:
        est = estimator(_mv(a.float()), 60, 40, dtype=torch.float32)
        assert est.samples.dtype == torch.float32
        assert abs(est.value - true) <= 3 * est.stderr


# --------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature and spectral densities
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Errors, validation, progress bars
# --------------------------------------------------------------------------------------------


def test_non_finite_operator_raises():
    def bad(v):
        return v * float("nan")

    b = torch.ones(10, dtype=F64)
    with pytest.raises(NonFiniteError):
        cg(bad, b)
    with pytest.raises(NonFiniteError):
        lanczos(bad, 10, 1)
    with pytest.raises(NonFiniteError):
        hutchinson(bad, 10, 3)
    with pytest.raises(NonFiniteError):
        slq(bad, 10, num_probes=2, num_steps=3, fn=torch.square)


def test_validation_errors():
    a = _spd(10)
    with pytest.raises(ShapeMismatchError, match="flat"):
        hutchinson(lambda v: (a @ v)[None], 10, 3)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(_mv(a), 10, 11)
    with pytest.raises(ValueError, match="which"):
        lanczos(_mv(a), 10, 1, which="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution"):
        hutchinson(_mv(a), 10, 3, distribution="uniform")  # type: ignore[arg-type]


def test_progress_bars_do_not_change_results():
    a = _spd(40)
    assert torch.equal(
        lanczos(_mv(a), 40, 2, progress=True).eigenvalues, lanczos(_mv(a), 40, 2).eigenvalues
    )
    assert hutchinson(_mv(a), 40, 5, progress=True).value == hutchinson(_mv(a), 40, 5).value
    assert slq(_mv(a), 40, num_probes=3, progress=True).value == slq(_mv(a), 40, num_probes=3).value
    assert xtrace(_mv(a), 40, 10, progress=True).value == xtrace(_mv(a), 40, 10).value
