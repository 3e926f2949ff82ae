"""covariant.optim.functional: invariance orders of the updates, gradient flow, and the tools
that compare trajectories across charts."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import covariant as cv
import covariant.optim.functional
from covariant.metrics import Constant, Euclidean
from covariant.optim import (
    fit_loglog_slope,
    gradient_flow,
    map_trajectory,
    riemannian_gd,
    step_size_sweep,
    trajectory_discrepancy,
)
from covariant.zoo.problems import ReferenceChart, reference_loss

THETA0 = torch.tensor([0.7, -0.4], dtype=torch.float64)


@pytest.fixture(scope="module")
def spaces():
    theta = cv.ParameterSpace(reference_loss)
    h = ReferenceChart()
    psi = theta.reparametrize(h)
    return theta, psi, h


# ------------------------------------------------------------------ the order of invariance
def test_slopes_of_the_step_size_sweep(spaces):
    _, psi, h = spaces
    p0 = h.inverse(THETA0)
    lrs, T = [0.04, 0.02, 0.01], 0.2
    plain = step_size_sweep(psi.with_metric(Euclidean()), p0, lrs, T)
    linear = step_size_sweep(psi, p0, lrs, T, update="linear")
    second = step_size_sweep(psi, p0, lrs, T, update="second_order")
    assert abs(plain.slope) < 0.3
    assert min(plain.discrepancies) > 1e-3  # plain GD in ψ does not converge to GD in θ
    assert 0.8 <= linear.slope <= 1.2
    assert second.slope >= 1.8
    # and the orders are really different at the smallest step
    assert second.discrepancies[-1] < 0.01 * linear.discrepancies[-1]
    assert linear.discrepancies[-1] < 0.01 * plain.discrepancies[-1]


def test_geodesic_steps_are_exactly_invariant(spaces):
    _, psi, h = spaces
    p0 = h.inverse(THETA0)
    geo = step_size_sweep(psi, p0, [0.1], 0.2, update="geodesic")
    lin = step_size_sweep(psi, p0, [0.1], 0.2, update="linear")
    assert geo.discrepancies[0] < 1e-6
    assert lin.discrepancies[0] > 1e-4


def test_second_order_step_is_the_geodesic_to_second_order(spaces):
    _, psi, h = spaces
    p0 = h.inverse(THETA0)
    r = psi.riemannian_grad(p0)
    gaps = []
    for lr in (0.02, 0.01):
        exact = psi.exp(p0, -r, t=lr)
        second = riemannian_gd(psi, p0, lr, 1, "second_order")[-1]
        gaps.append(float((second - exact).norm()))
    assert 6.0 < gaps[0] / gaps[1] < 10.0  # O(α³) per step


# ------------------------------------------------------------------ functional updates
def test_riemannian_gd_shape_and_linear_step():
    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    space = cv.ParameterSpace(lambda p: (p**2).sum() + p[0], Constant(G))
    p0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    traj = riemannian_gd(space, p0, 0.1, 3)
    assert traj.shape == (4, 2)
    g = 2 * p0 + torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(traj[1], p0 - 0.1 * torch.linalg.solve(G, g), atol=1e-14)
    # a constant metric has straight geodesics: all three updates coincide
    for update in ("second_order", "geodesic"):
        assert torch.allclose(riemannian_gd(space, p0, 0.1, 3, update), traj, atol=1e-12)


def test_riemannian_gd_reports_the_failing_step():
    space = cv.ParameterSpace(lambda p: (p**2).sum()).reparametrize(cv.reparam.Polar())
    with pytest.raises(cv.errors.DomainError, match="step 1 of 3"):
        riemannian_gd(space.with_metric(Euclidean()), torch.tensor([0.1, 0.0]), 5.0, 3)
    with pytest.raises(ValueError, match="update"):
        riemannian_gd(space, torch.tensor([1.0, 0.0]), 0.1, 1, update="cubic")
    with pytest.raises(ValueError, match="lr"):
        riemannian_gd(space, torch.tensor([1.0, 0.0]), -0.1, 1)


def test_gradient_flow_matches_the_closed_form():
    # L = ½ pᵀ A p, G = M constant: p(t) = expm(−t M⁻¹ A) p0
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    M = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    space = cv.ParameterSpace(lambda p: 0.5 * p @ A @ p, Constant(M))
    p0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    out = gradient_flow(space, p0, t)
    K = torch.linalg.solve(M, A)
    exact = torch.stack([torch.linalg.matrix_exp(-s * K) @ p0 for s in t])
    assert out.shape == (4, 2)
    assert torch.allclose(out, exact, atol=1e-9)
    assert torch.allclose(gradient_flow(space, p0, 0.0), p0[None])


def test_gradient_flow_is_invariant_across_charts(spaces):
    theta, psi, h = spaces
    t = [0.0, 0.2, 0.5]
    flow = gradient_flow(theta, THETA0, t)
    p0 = h.inverse(THETA0)
    mapped = map_trajectory(gradient_flow(psi, p0, t), h)
    assert trajectory_discrepancy(mapped, flow, at="max") < 1e-8
    naive = map_trajectory(gradient_flow(psi.with_metric(Euclidean()), p0, t), h)
    assert trajectory_discrepancy(naive, flow, at="max") > 1e-3
    # also through a second, different chart (polar coordinates)
    polar = theta.reparametrize(cv.reparam.Polar())
    mapped2 = map_trajectory(gradient_flow(polar, polar.chart.inverse(THETA0), t), polar)
    assert trajectory_discrepancy(mapped2, flow, at="max") < 1e-8


def test_trajectory_tools():
    assert fit_loglog_slope([1, 2, 4], [5, 10, 20])[0] == pytest.approx(1.0)
    assert math.isnan(fit_loglog_slope([1, 2], [0.0, 0.0])[0])
    a = torch.zeros(3, 2)
    b = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    assert trajectory_discrepancy(a, b) == 1.0
    assert trajectory_discrepancy(a, b, at="max") == 5.0
    with pytest.raises(cv.errors.ShapeMismatchError):
        trajectory_discrepancy(a, b[:2])
    assert torch.allclose(map_trajectory(b, lambda r: 2 * r), 2 * b)
    with pytest.raises(ValueError, match="integer"):
        step_size_sweep(cv.ParameterSpace(lambda p: (p**2).sum()), torch.ones(2), [0.3], 1.0)


def test_docstring_examples():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # examples are written for torch's default dtype
    try:
        result = doctest.testmod(covariant.optim.functional, optionflags=doctest.ELLIPSIS)
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0 and result.failed == 0
