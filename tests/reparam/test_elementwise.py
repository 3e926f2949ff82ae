"""Elementwise, linear and polar charts: closed forms against autodiff."""

from __future__ import annotations

import pytest
import torch

from covariant import reparam
from covariant.errors import DomainError

gen = torch.Generator().manual_seed(3)
PSI = torch.randn(6, dtype=torch.float64, generator=gen)


SINH_ARGS = [(1.3, 0.7, 0.2), (0.8, 1.1),
             (torch.linspace(0.5, 1.2, 6, dtype=torch.float64), 1.1, 0.05)]


@pytest.mark.parametrize("args", SINH_ARGS)
def test_sinh_round_trip_and_derivative(args):
    h = reparam.Sinh(*args)
    theta = h.forward(PSI)
    torch.testing.assert_close(h.inverse(theta), PSI, rtol=1e-12, atol=1e-12)
    J = torch.func.jacfwd(h.forward)(PSI)
    torch.testing.assert_close(torch.diagonal(J), h.derivative(PSI), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [0.25, 0.1, 1.0])
def test_cubic_round_trip_and_derivative(c):
    h = reparam.Cubic(c)
    theta = h.forward(PSI)
    torch.testing.assert_close(h.inverse(theta), PSI, rtol=0, atol=1e-12)
    J = torch.func.jacfwd(h.forward)(PSI)
    torch.testing.assert_close(torch.diagonal(J), h.derivative(PSI), rtol=1e-12, atol=1e-12)


def test_polar_inverse_products_are_the_inverse_matrix():
    h = reparam.Polar()
    psi = torch.tensor([2.5, 2.0], dtype=torch.float64)
    r, c, s = 2.5, torch.cos(psi[1]), torch.sin(psi[1])
    Jinv = torch.stack([torch.stack([c, s]), torch.stack([-s / r, c / r])])
    eye = torch.eye(2, dtype=torch.float64)
    cols = torch.stack([h.inverse_jvp(psi, e) for e in eye], 1)
    assert torch.allclose(cols, Jinv, atol=1e-15)


@pytest.mark.parametrize("bad", [lambda: reparam.Cubic(-0.1), lambda: reparam.Sinh(0.0),
                                 lambda: reparam.Sinh(1.0, 0.0)])
def test_non_bijective_parameters_raise(bad):
    with pytest.raises(DomainError):
        bad()
