"""Density rules: pushforward, the Riemannian density (a scalar) and the lift through a
submersion, in float64 (docs/math.md §2, §7)."""

from __future__ import annotations

import math

import pytest
import torch

import covariant as cv
from covariant import density as cvd
from covariant.errors import NotABijectionError
from covariant.metrics import Euclidean, Pullback
from covariant.reparam import Log, WeightNorm

from ._helpers import _lognormal_space, _t


def test_riemannian_log_prob_is_a_scalar():
    x_space = _lognormal_space()
    log_p = lambda x: -x_space.loss_function(x)
    log_q_y = cvd.riemannian_log_prob(cvd.pushforward_log_prob(log_p, Log()),
                                      Pullback(Euclidean(), Log()))
    ys = _t([0.3, 1.0, 2.5])
    for y in ys:
        assert torch.allclose(log_q_y(y[None]), log_p(y.log()[None]), atol=1e-13)
    # the pushed-forward density itself is not a scalar
    log_p_y = cvd.pushforward_log_prob(log_p, Log())
    assert abs(float(log_p_y(_t([2.5])) - log_p(_t([2.5]).log()))) > 0.5


def test_lift_through_weight_norm_matches_the_product_prior():
    """lift_log_prob(N(0, λ⁻¹I), WN, ½ρ(‖v‖)) = log p(g) + log p(v) for the χ_n / shell prior."""
    from covariant.experiments.density import LOGV_SCALE, _wn_prior_log_prob

    n, lam = 5, 2.0
    h = WeightNorm((1, n))

    def log_normal(w):
        return -0.5 * lam * (w**2).sum() + 0.5 * n * math.log(lam / (2 * math.pi))

    def fiber(psi):
        r = psi[1:].norm()
        lr = torch.log(r)
        log_rho = -0.5 * (lr / LOGV_SCALE) ** 2 - math.log(LOGV_SCALE * math.sqrt(2 * math.pi)) - lr
        return math.log(0.5) + log_rho

    lifted = cvd.lift_log_prob(log_normal, h, fiber)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        psi = torch.randn(n + 1, generator=g, dtype=torch.float64)
        direct = _wn_prior_log_prob(psi[:1], psi[1:][None], lam)
        assert abs(float(lifted(psi) - direct)) < 1e-10


def test_density_through_a_submersion_is_an_error():
    space = cv.ParameterSpace.from_log_prob(lambda w: -(w**2).sum())
    with pytest.raises(NotABijectionError, match="submersion"):
        space.reparametrize(WeightNorm((2, 3)))
    with pytest.raises(NotABijectionError):
        cvd.pushforward_log_prob(lambda w: -(w**2).sum(), WeightNorm((2, 3)))
