"""MAP and Riemannian MAP by Newton, L-BFGS and Adam (exact and SLQ log-det), in float64
(docs/math.md §7)."""

from __future__ import annotations

import math

import pytest
import torch

import covariant as cv
from covariant import density as cvd
from covariant.experiments.density import _shear_chart
from covariant.reparam import Affine, Compose, Log, Polar, Sinh

from ._helpers import _lognormal_space, _t

# ------------------------------------------------------------------------------ log-normal


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_lognormal_modes(method):
    y_space = _lognormal_space().reparametrize(Log())  # x = log y
    y0 = _t([1.0])
    classic = cvd.map_estimate(y_space, y0, riemannian=False, method=method)
    riem = cvd.map_estimate(y_space, y0, riemannian=True, method=method)
    assert classic.converged and riem.converged
    assert abs(float(classic.point) - math.exp(0.5 - 0.64)) < 1e-7   # 0.869358
    assert abs(float(riem.point) - math.exp(0.5)) < 1e-7             # 1.648721
    assert round(float(classic.point), 6) == 0.869358
    assert round(float(riem.point), 6) == 1.648721


# ------------------------------------------------------------------------------ 2-D MAP


def _log_p_2d(theta):
    m = _t([0.8, -0.3])
    P = _t([[2.0, 0.6], [0.6, 1.5]])
    d = theta - m
    return -0.5 * d @ P @ d - 0.1 * (theta**4).sum() + 0.3 * torch.sin(theta[0])


CHARTS_2D = {
    "cubic shear": _shear_chart,
    "sinh": lambda: Sinh(_t([0.9, 1.3]), _t([1.2, 0.8]), _t([0.1, -0.2])),
    "affine∘sinh": lambda: Compose(Affine(_t([[1.0, 0.4], [-0.3, 1.2]]), _t([0.2, 0.1])),
                                   Sinh(0.8, 1.1)),
    "polar": Polar,
}


@pytest.mark.parametrize("name", list(CHARTS_2D))
def test_riemannian_map_is_the_same_point_in_every_chart(name):
    space = cv.ParameterSpace.from_log_prob(_log_p_2d)
    theta_map = cvd.map_estimate(space, _t([0.5, 0.0]), riemannian=False).point
    # with G = I in θ, the Riemannian MAP there is the ordinary MAP
    theta_r = cvd.map_estimate(space, _t([0.5, 0.0]), riemannian=True).point
    assert torch.allclose(theta_r, theta_map, atol=1e-12)
    h = CHARTS_2D[name]()
    new = space.reparametrize(h)
    psi0 = h.inverse(theta_map) + 0.05
    riem = cvd.map_estimate(new, psi0, riemannian=True)
    classic = cvd.map_estimate(new, psi0, riemannian=False)
    assert riem.converged and classic.converged
    assert float((h(riem.point) - theta_map).norm()) < 1e-8
    assert float((h(classic.point) - theta_map).norm()) > 1e-2  # the classic MAP moves


def test_newton_line_search_stays_in_the_domain():
    # y = e^x: the full Newton step from y0 = 5 on the classic objective overshoots y < 0
    y_space = _lognormal_space().reparametrize(Log())
    res = cvd.map_estimate(y_space, _t([5.0]), riemannian=False)
    assert res.converged and abs(float(res.point) - math.exp(0.5 - 0.64)) < 1e-7


# ------------------------------------------------------------------------------ stochastic


def test_riemannian_map_with_the_stochastic_logdet():
    """A Riemannian MAP trained with Adam on the SLQ/Hutchinson gradient lands on h⁻¹(θ*)."""
    m = _t([0.3, -0.5, 1.0, -1.2])
    space = cv.ParameterSpace.from_log_prob(lambda t: -2.0 * ((t - m) ** 2).sum())
    h = Sinh(0.9, 1.1, 0.05)
    new = space.reparametrize(h)
    p0 = torch.zeros(4, dtype=torch.float64)
    exact = cvd.map_estimate(new, p0, riemannian=True)
    assert torch.allclose(h(exact.point), m, atol=1e-8)
    res = cvd.map_estimate(new, p0, riemannian=True, method="adam", steps=300, lr=3e-2,
                           logdet_method="slq", logdet_kwargs={"grad_probes": 4}, tol=0.0)
    assert float((res.point - exact.point).norm()) < 0.05
    classic = cvd.map_estimate(new, p0, riemannian=False)
    assert float((classic.point - exact.point).norm()) > 0.1


def test_map_objective_is_minus_log_q():
    y_space = _lognormal_space().reparametrize(Log())
    f = cvd.map_objective(y_space, riemannian=True)
    y = _t([1.3])
    # −log q_Y(y) = −log p_X(log y): a scalar
    assert abs(float(f(y)) - float(_lognormal_space().loss_function(y.log()))) < 1e-13
    assert cvd.map_objective(y_space, riemannian=False) is y_space.loss_function


# ------------------------------------------------------------------------------ bad inputs


def test_map_bad_inputs():
    loss_space = cv.ParameterSpace(lambda p: (p**2).sum())
    with pytest.raises(ValueError, match="density space"):
        cvd.map_estimate(loss_space, _t([1.0]))
    space = _lognormal_space()
    with pytest.raises(ValueError, match="method"):
        cvd.map_estimate(space, _t([1.0]), method="sgd")
    with pytest.raises(ValueError, match="adam"):
        cvd.map_estimate(space, _t([1.0]), logdet_method="slq")
