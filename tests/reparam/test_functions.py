"""FromFunctions: the user's inverse is refined by Newton and checked; inverse products follow
the implicit-function rule J⁻¹ (not autodiff through the user's inverse)."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacfwd

import covariant as cv
from covariant.errors import NotABijectionError
from covariant.layout import ParameterLayout
from covariant.reparam import FromFunctions, ParameterwiseReparametrization


def _cube_fwd(p):
    return p**3 + p + 0.3 * p.roll(1)


def _wrong_cube():
    # the inverse is only a rough guess: identity
    return FromFunctions(_cube_fwd, lambda t: t)


THETA = torch.tensor([2.0, -1.0, 0.7], dtype=torch.float64)


def test_wrong_inverse_is_refined_by_newton():
    h = _wrong_cube()
    psi = h.inverse(THETA)
    assert torch.allclose(h(psi), THETA, rtol=0, atol=1e-13)


def test_exact_inverse_is_kept_unchanged():
    h = FromFunctions(torch.sinh, torch.asinh)
    assert torch.equal(h.inverse(THETA), torch.asinh(THETA))


def test_inverse_products_use_the_jacobian_of_forward():
    h = _wrong_cube()
    psi = h.inverse(THETA)
    J = jacfwd(h.forward)(psi)
    u = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(h.inverse_jvp(psi, u), torch.linalg.solve(J, u), atol=1e-13)
    assert torch.allclose(h.inverse_vjp(psi, u), torch.linalg.solve(J.T, u), atol=1e-13)
    lin = h.linearize(psi)
    assert torch.allclose(lin.inverse_jvp(u), torch.linalg.solve(J, u), atol=1e-13)
    assert torch.allclose(lin.inverse_vjp(u), torch.linalg.solve(J.T, u), atol=1e-13)


def test_autograd_through_inverse_gives_the_implicit_function_rule():
    h = _wrong_cube()
    psi = h.inverse(THETA)
    D = torch.autograd.functional.jacobian(h.inverse, THETA)
    assert torch.allclose(D, torch.linalg.inv(jacfwd(h.forward)(psi)), atol=1e-12)


def _loss(p):
    return ((p**2).sum() - 1) ** 2 + 0.5 * torch.sin(p[0] * p[1]) + p[0] * p[2]


def test_invariant_measures_with_a_guessed_inverse():
    space = cv.ParameterSpace(_loss)
    good = FromFunctions(_cube_fwd, lambda t: t, rtol=1e-15)  # reference: Newton to roundoff
    ref = cv.flatness(space, THETA, measures=("trace", "logdet"))
    for h in (_wrong_cube(), good):
        new = space.reparametrize(h)
        psi = new.chart.inverse(THETA)
        got = cv.flatness(new, psi, measures=("trace", "logdet"))
        assert got["trace"].value == pytest.approx(ref["trace"].value, rel=1e-9)
        assert got["logdet"].value == pytest.approx(ref["logdet"].value, rel=1e-9)


def test_not_invertible_raises_a_typed_error_naming_the_fix():
    h = FromFunctions(lambda p: p**2 + 1, lambda t: t)
    with pytest.raises(NotABijectionError, match="does not invert"):
        h.inverse(torch.tensor([0.5], dtype=torch.float64))


def test_error_inside_blocks_names_the_parameter():
    layout = ParameterLayout.from_shapes({"a": (2,), "b": (1,)})
    chart = ParameterwiseReparametrization(
        layout, {"b": FromFunctions(lambda p: p**2 + 1, lambda t: t)})
    with pytest.raises(NotABijectionError, match="parameter 'b'"):
        chart.inverse(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))


def test_submersion_takes_least_norm_steps():
    def fwd(p):
        return torch.stack([p[0] + p[2], p[1] * torch.exp(p[2])])

    h = FromFunctions(fwd, lambda t: torch.cat([t, t.new_zeros(1)]) + 0.2, is_bijection=False)
    theta = torch.tensor([0.5, 1.5], dtype=torch.float64)
    psi = h.inverse(theta)
    assert torch.allclose(h(psi), theta, rtol=0, atol=1e-13)
    J = jacfwd(fwd)(psi)
    u = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.allclose(h.inverse_jvp(psi, u), torch.linalg.pinv(J) @ u, atol=1e-10)
