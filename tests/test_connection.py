"""Christoffel symbols, the matrix-free connection and geodesics (docs/math.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

import covariant as cv
from covariant.connection import christoffel, christoffel_dense

from .test_rules import theta_metric


def test_polar_christoffel_closed_form():
    G = cv.metrics.Pullback(cv.metrics.Euclidean(), cv.reparam.Polar())
    for r, phi in [(2.0, 0.3), (0.5, -1.2), (3.7, 2.5)]:
        p = torch.tensor([r, phi])
        gamma = christoffel_dense(G, p)  # Γ[m, i, j]
        expected = torch.zeros(2, 2, 2)
        expected[0, 1, 1] = -r          # Γ^r_φφ = −r
        expected[1, 0, 1] = 1 / r       # Γ^φ_rφ = 1/r
        expected[1, 1, 0] = 1 / r
        assert torch.allclose(gamma, expected, atol=1e-12)
        # matrix-free contractions agree with the closed form
        e_r, e_phi = torch.eye(2)
        assert torch.allclose(christoffel(G, p, e_phi, e_phi), torch.tensor([-r, 0.0]), atol=1e-12)
        assert torch.allclose(christoffel(G, p, e_r, e_phi), torch.tensor([0.0, 1 / r]), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_free_christoffel_vs_dense(seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(2, generator=gen)
    u, w = torch.randn(2, generator=gen), torch.randn(2, generator=gen)
    G = theta_metric()
    gamma = christoffel_dense(G, p)
    assert torch.allclose(christoffel(G, p, u, w), torch.einsum("mij,i,j->m", gamma, u, w),
                          atol=1e-11)
    # symmetric in its arguments (torsion-free)
    assert torch.allclose(christoffel(G, p, u, w), christoffel(G, p, w, u), atol=1e-12)


def test_riemannian_hessian_dense_equals_formula():
    """space.hessian = ∇²L − Γ^m_ij ∂_m L with Γ from christoffel_dense (two independent paths)."""
    from .conftest import reference_loss

    G = theta_metric()
    space = cv.ParameterSpace(reference_loss, G)
    p = torch.tensor([0.7, -0.4])
    H = torch.func.hessian(reference_loss)(p)
    g = torch.func.grad(reference_loss)(p)
    expected = H - torch.einsum("mij,m->ij", christoffel_dense(G, p), g)
    assert torch.allclose(space.hessian(p), expected, atol=1e-11)
    assert (space.hessian(p) - H).abs().max() > 1e-2  # the connection term is not negligible


def test_geodesics_of_the_plane_in_polar_coordinates_are_lines():
    space = cv.ParameterSpace(lambda p: (p**2).sum())
    polar = space.reparametrize(cv.reparam.Polar())
    psi = torch.tensor([1.0, 0.2])
    v = torch.tensor([0.3, 0.9])
    end = polar.exp(psi, v, t=1.0)
    # the same geodesic in Cartesian coordinates is the straight line θ + t J v
    theta = polar.chart(psi)
    line = theta + polar.chart.jvp(psi, v)
    assert torch.allclose(polar.chart(end), line, atol=1e-8)
    # a constant metric takes the closed-form straight line
    assert torch.allclose(space.exp(theta, v, t=2.0), theta + 2 * v)


def test_exp_map_is_invariant_for_curved_metric():
    G = theta_metric()
    space = cv.ParameterSpace(lambda p: (p**2).sum(), G)
    h = cv.reparam.Polar()
    new = space.reparametrize(h)
    theta = torch.tensor([0.8, -0.5])
    v_theta = torch.tensor([0.2, 0.35])
    psi = h.inverse(theta)
    v_psi = h.inverse_jvp(psi, v_theta)
    end_theta = space.exp(theta, v_theta)
    end_psi = new.exp(psi, v_psi)
    assert torch.allclose(h(end_psi), end_theta, atol=1e-7)
    # and a geodesic is not a straight line here
    assert (end_theta - (theta + v_theta)).norm() > 1e-3


def test_geodesic_keeps_speed():
    """|ẋ|_G is conserved along a geodesic: an independent check of the ODE."""
    G = theta_metric()
    p = torch.tensor([0.3, 0.4])
    v = torch.tensor([0.5, -0.2])
    x, xdot = cv.connection.geodesic(G, p, v, t=torch.linspace(0, 1.5, 4), return_velocity=True)
    speeds = torch.stack([G.inner(xi, vi, vi) for xi, vi in zip(x, xdot, strict=True)])
    assert torch.allclose(speeds, speeds[0].expand(4), rtol=1e-8)
    assert math.isclose(float(speeds[0]), float(G.inner(p, v, v)), rel_tol=1e-10)
