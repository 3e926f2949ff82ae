"""covariant.zoo.problems: docs/math.md §8 reference values at the non-critical point
θ = (0.7, −0.4),
to the printed digits, for the closed-form chart and the same chart through FromFunctions."""

from __future__ import annotations

import pytest
import torch

import covariant as cv
from covariant.zoo.problems import REFERENCE_POINT as THETA
from covariant.zoo.problems import ReferenceChart as PhiChart

from ..conftest import phi_chart_from_functions


def _round(x, digits=3):
    return [round(float(v), digits) for v in x]


@pytest.mark.parametrize("chart_factory", [PhiChart, phi_chart_from_functions])
def test_reference_values(reference_space, chart_factory):
    h = chart_factory()
    theta = THETA.clone()
    # gradient is clearly nonzero: the connection term matters here
    assert reference_space.grad(theta).norm() > 0.5

    eig_theta = torch.linalg.eigvalsh(reference_space.hessian(theta, riemannian=False))
    assert _round(eig_theta) == [-1.666, 7.243]

    new = reference_space.reparametrize(h)
    psi = h.inverse(theta)
    assert torch.allclose(h(psi), theta, atol=1e-14)

    naive = torch.linalg.eigvalsh(new.hessian(psi, riemannian=False))
    assert _round(naive) == [-0.697, 8.206]

    E = new.shape_operator(psi, method="general")
    eig_psi = torch.linalg.eigvals(E)
    assert eig_psi.imag.abs().max() < 1e-12
    assert _round(eig_psi.real.sort().values) == [-1.666, 7.243]

    for space, point in ((reference_space, theta), (new, psi)):
        report = cv.flatness(space, point, measures=("trace", "det"))
        assert round(report["trace"].value, 5) == 5.57746
        assert round(report["det"].value, 4) == -12.0655


def test_reference_invariant_to_1e10(reference_space):
    h = PhiChart()
    psi = h.inverse(THETA)
    new = reference_space.reparametrize(h)
    a = torch.tensor(cv.flatness(reference_space, THETA, measures=("spectrum",))["spectrum"].value)
    b = torch.tensor(cv.flatness(new, psi, measures=("spectrum",))["spectrum"].value)
    assert torch.allclose(a, b, rtol=1e-10, atol=0)


def test_closed_form_chart_products_match_autodiff():
    h = PhiChart()
    psi = h.inverse(THETA)
    J = torch.func.jacfwd(cv.zoo.problems.reference_h)(psi)
    v = torch.tensor([0.3, -1.2], dtype=torch.float64)
    assert torch.allclose(h.jvp(psi, v), J @ v, atol=1e-14)
    assert torch.allclose(h.vjp(psi, v), J.T @ v, atol=1e-14)
    Jinv = torch.linalg.inv(J)
    assert torch.allclose(h.inverse_jvp(psi, v), Jinv @ v, atol=1e-13)
    assert torch.allclose(h.inverse_vjp(psi, v), Jinv.T @ v, atol=1e-13)
    assert torch.allclose(h.log_abs_det_jacobian(psi), torch.linalg.slogdet(J).logabsdet)
    with pytest.raises(cv.errors.ShapeMismatchError):
        h(torch.zeros(3, dtype=torch.float64))
