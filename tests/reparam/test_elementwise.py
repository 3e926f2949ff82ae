"""Elementwise, linear and polar charts: closed forms and the numbers of the charts they
replace (``invariance.Sinh``, the density experiment's ``Cubic``, the optimization
experiment's ``PolarChart``)."""

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
def test_sinh_same_numbers_as_invariance_sinh(args):
    from covariant.invariance import Sinh as OldSinh

    new, old = reparam.Sinh(*args), OldSinh(*args)
    theta = old.forward(PSI)
    assert torch.equal(new.forward(PSI), theta)
    assert torch.equal(new.inverse(theta), old.inverse(theta))
    assert torch.equal(new.derivative(PSI), old.derivative(PSI))
    assert torch.equal(new.log_abs_det_jacobian(PSI), old.log_abs_det_jacobian(PSI))


@pytest.mark.parametrize("c", [0.25, 0.1, 1.0])
def test_cubic_same_numbers_as_density_experiment(c):
    from covariant.experiments.density import Cubic as OldCubic

    new, old = reparam.Cubic(c), OldCubic(c)
    theta = old.forward(PSI)
    assert torch.equal(new.forward(PSI), theta)
    assert torch.equal(new.inverse(theta), old.inverse(theta))
    assert torch.allclose(new.inverse(theta), PSI, atol=1e-12)
    assert torch.equal(new.derivative(PSI), old.derivative(PSI))
    assert repr(new) == repr(old)


def test_polar_same_numbers_as_optimization_polar_chart():
    from covariant.experiments.optimization import PolarChart

    new, old = reparam.Polar(), PolarChart()
    psi = torch.tensor([1.7, -0.4], dtype=torch.float64)
    x = torch.tensor([0.3, 2.0], dtype=torch.float64)
    for product in ("jvp", "vjp", "inverse_jvp", "inverse_vjp"):
        assert torch.equal(getattr(new, product)(psi, x), getattr(old, product)(psi, x))


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
