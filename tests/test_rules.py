"""Every transformation rule of docs/math.md §2, checked in float64 against dense ground truth.

Charts: affine, a nonlinear elementwise chart, polar, and a user FromFunctions chart (φ⁻¹ of
docs/math.md §8). Points are random and non-critical, so the connection term matters. The metric in
Θ is a point-dependent (non-constant) SPD field, so pullback and Christoffel terms are real.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian, jacfwd

import covariant as cv
from covariant.reparam import Sinh

from .conftest import phi_chart_from_functions, reference_loss

ATOL = 1e-9


def theta_metric() -> cv.metrics.Dense:
    """A point-dependent SPD metric on ℝ²: G(θ) = A(θ)A(θ)ᵀ + I."""

    def G(t):
        A = torch.stack([torch.stack([1 + t[0] ** 2, 0.3 * t[1]]),
                         torch.stack([torch.sin(t[0]), 1 + 0.5 * t[1] ** 2])])
        return A @ A.T + torch.eye(2, dtype=t.dtype)

    return cv.metrics.Dense(G)


CHARTS = {
    "affine": lambda: cv.reparam.Affine(torch.tensor([[1.3, 0.4], [-0.2, 0.8]]),
                                        torch.tensor([0.1, -0.3])),
    "elementwise": lambda: Sinh(torch.tensor([0.9, 1.4]), torch.tensor([1.2, 0.7]),
                                torch.tensor([0.05, -0.1])),
    "polar": cv.reparam.Polar,
    "from_functions": phi_chart_from_functions,
}

POINTS = [torch.tensor(x, dtype=torch.float64) for x in ([0.7, -0.4], [-0.5, 0.9], [1.1, 0.35])]


@pytest.fixture(params=list(CHARTS))
def chart(request):
    return CHARTS[request.param]()


@pytest.fixture(params=range(len(POINTS)))
def theta(request):
    return POINTS[request.param].clone()


def test_point_and_scalar(chart, theta):
    space = cv.ParameterSpace(reference_loss, theta_metric())
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    assert torch.allclose(chart(psi), theta, atol=1e-12)
    assert torch.allclose(new.loss(psi), space.loss(theta), atol=1e-13)


def test_vector_covector_metric(chart, theta):
    G = theta_metric()
    space = cv.ParameterSpace(reference_loss, G)
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    J = jacfwd(chart.forward)(psi)

    # covector: ∇_ψ L_Ψ = Jᵀ ∇_θ L
    assert torch.allclose(new.grad(psi), J.T @ space.grad(theta), atol=ATOL)
    # metric: G_Ψ = Jᵀ G_Θ J (the pullback), dense and matrix-free
    G_psi = J.T @ G.dense(theta) @ J
    assert torch.allclose(new.metric.dense(psi), G_psi, atol=ATOL)
    v = torch.tensor([0.3, -1.1])
    assert torch.allclose(new.metric.matvec(psi, v), G_psi @ v, atol=ATOL)
    assert torch.allclose(new.metric.solve(psi, v), torch.linalg.solve(G_psi, v), atol=ATOL)
    # Riemannian gradient is a vector: G_Ψ⁻¹∇_ψ L_Ψ = J⁻¹ G_Θ⁻¹ ∇_θ L
    rg_theta = space.riemannian_grad(theta)
    assert torch.allclose(J @ new.riemannian_grad(psi), rg_theta, atol=ATOL)
    # tangent vectors: v_Θ = J v_Ψ; inverse products
    assert torch.allclose(chart.jvp(psi, v), J @ v, atol=ATOL)
    assert torch.allclose(chart.vjp(psi, v), J.T @ v, atol=ATOL)
    assert torch.allclose(chart.inverse_jvp(psi, v), torch.linalg.solve(J, v), atol=ATOL)
    assert torch.allclose(chart.inverse_vjp(psi, v), torch.linalg.solve(J.T, v), atol=ATOL)


def test_hessians(chart, theta):
    space = cv.ParameterSpace(reference_loss, theta_metric())
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    J = jacfwd(chart.forward)(psi)
    g = grad(reference_loss)(theta)
    assert g.norm() > 0.1  # non-critical: the extra terms are real

    # Euclidean Hessian is NOT a tensor: ∇²_ψ L_Ψ = Jᵀ ∇²L J + Σ_m ∂_m L ∇²_ψ h^m
    H_theta = hessian(reference_loss)(theta)
    d2h = hessian(chart.forward)(psi)  # (m, i, j)
    expected = J.T @ H_theta @ J + torch.einsum("m,mij->ij", g, d2h)
    naive = new.hessian(psi, riemannian=False)
    assert torch.allclose(naive, expected, atol=ATOL)
    if not chart.is_affine:  # for affine charts ∇²h = 0 and the naive rule happens to hold
        assert not torch.allclose(naive, J.T @ H_theta @ J, atol=1e-3)

    # Riemannian Hessian IS a tensor at every point: Hess_Ψ = Jᵀ Hess_Θ J
    R_theta = space.hessian(theta, riemannian=True)
    R_psi = new.hessian(psi, riemannian=True, method="general")
    assert torch.allclose(R_psi, J.T @ R_theta @ J, atol=ATOL)

    # shape operator: E_Ψ = J⁻¹ E_Θ J, a similarity transform
    E_theta = space.shape_operator(theta)
    E_psi = new.shape_operator(psi, method="general")
    assert torch.allclose(E_psi, torch.linalg.solve(J, E_theta @ J), atol=1e-8)


def test_matrix_free_hvp_agrees_with_dense(chart, theta):
    space = cv.ParameterSpace(reference_loss, theta_metric())
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    R = new.hessian(psi, riemannian=True, method="general")
    assert torch.allclose(R, new.hessian(psi, method="pullback"), atol=ATOL)
    for v in (torch.tensor([1.0, 0.0]), torch.tensor([0.4, -0.9])):
        general = new.hvp(psi, v, method="general")
        fast = new.hvp(psi, v, method="pullback")
        assert torch.allclose(general, R @ v, atol=ATOL)
        assert torch.allclose(fast, R @ v, atol=ATOL)
    # the shared-graph operator gives the same products, in Ψ and (naive) Euclidean
    op, op_naive = new.hvp_operator(psi), new.hvp_operator(psi, riemannian=False)
    H_naive = new.hessian(psi, riemannian=False)
    for v in (torch.tensor([1.0, 0.0]), torch.tensor([0.4, -0.9])):
        assert torch.allclose(op(v), R @ v, atol=ATOL)
        assert torch.allclose(op_naive(v), H_naive @ v, atol=ATOL)
    # and in Θ with its own point-dependent metric
    Rt = space.hessian(theta)
    v = torch.tensor([0.2, 0.7])
    assert torch.allclose(space.hvp(theta, v), Rt @ v, atol=ATOL)
    assert torch.allclose(space.hvp_operator(theta)(v), Rt @ v, atol=ATOL)


def test_densities(chart, theta):
    normal = torch.distributions.MultivariateNormal(
        torch.tensor([0.2, -0.1]), torch.tensor([[0.8, 0.2], [0.2, 0.5]])
    )
    log_p = normal.log_prob
    psi = chart.inverse(theta)
    J = jacfwd(chart.forward)(psi)
    logdetJ = torch.linalg.slogdet(J)[1]
    # p_Ψ(ψ) = p_Θ(h(ψ)) |det J|
    log_p_psi = cv.density.pushforward_log_prob(log_p, chart)
    assert torch.allclose(log_p_psi(psi), log_p(theta) + logdetJ, atol=1e-12)
    assert torch.allclose(chart.log_abs_det_jacobian(psi), logdetJ, atol=1e-12)
    # the same through a density space
    space = cv.ParameterSpace.from_log_prob(log_p, theta_metric())
    new = space.reparametrize(chart)
    assert torch.allclose(-new.loss(psi), log_p(theta) + logdetJ, atol=1e-12)
    # log det G_Ψ = log det G_Θ + 2 log|det J|
    assert torch.allclose(new.metric.logdet(psi), space.metric.logdet(theta) + 2 * logdetJ,
                          atol=1e-10)
    # q = p / sqrt(det G) is a scalar
    q_theta = cv.density.riemannian_log_prob(log_p, space.metric)
    q_psi = cv.density.riemannian_log_prob(log_p_psi, new.metric)
    assert torch.allclose(q_psi(psi), q_theta(theta), atol=1e-10)
    # while p itself is not
    assert not torch.allclose(log_p_psi(psi), log_p(theta), atol=1e-3)


def test_invariant_spectrum_naive_not(chart, theta):
    space = cv.ParameterSpace(reference_loss)
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    spec = lambda s, p: cv.flatness(s, p, measures=("spectrum",))["spectrum"].value
    a, b = torch.tensor(spec(space, theta)), torch.tensor(spec(new, psi))
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
    naive = torch.tensor(spec(new.with_metric(cv.metrics.Euclidean()), psi))
    assert (naive - a).abs().max() > 1e-2
