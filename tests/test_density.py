"""Densities, log det G (closed / dense / SLQ) and (Riemannian) MAP, in float64 (MATH.md §7)."""

from __future__ import annotations

import math

import pytest
import torch

import covariant as cv
from covariant import density as cvd
from covariant.errors import NotABijectionError
from covariant.experiments.density import _shear_chart
from covariant.metrics import Dense, Euclidean, Pullback
from covariant.reparam import Affine, Compose, Log, Polar, Sinh, WeightNorm


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def _lognormal_space():
    normal = torch.distributions.Normal(_t(0.5), _t(0.8))
    return cv.ParameterSpace.from_log_prob(lambda x: normal.log_prob(x).sum())


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


def test_riemannian_log_prob_is_a_scalar():
    x_space = _lognormal_space()
    log_p = lambda x: -x_space._loss(x)
    log_q_y = cvd.riemannian_log_prob(cvd.pushforward_log_prob(log_p, Log()),
                                      Pullback(Euclidean(), Log()))
    ys = _t([0.3, 1.0, 2.5])
    for y in ys:
        assert torch.allclose(log_q_y(y[None]), log_p(y.log()[None]), atol=1e-13)
    # the pushed-forward density itself is not a scalar
    log_p_y = cvd.pushforward_log_prob(log_p, Log())
    assert abs(float(log_p_y(_t([2.5])) - log_p(_t([2.5]).log()))) > 0.5


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


# ------------------------------------------------------------------------------ log det G


def _dense_field(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    B = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)

    def G(p):
        M = A + torch.diag(torch.tanh(p)) @ B
        return M @ M.T + torch.eye(d, dtype=p.dtype) + torch.diag(p**2)

    return Dense(G), 0.5 * torch.randn(d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chart", [Sinh(0.7, 1.3, 0.2), Log(),
                                   Compose(Affine(_t([[1.0, 0.5], [0.0, 2.0]])), Sinh(0.5))])
def test_closed_form_logdet_equals_dense(chart):
    G = Pullback(Euclidean(), chart)
    psi = _t([0.6, 1.3])
    closed = cvd.logdet(G, psi, "closed")
    dense = cvd.logdet(G, psi, "dense")
    assert torch.allclose(closed, dense, atol=1e-12)
    gc = torch.func.grad(lambda q: cvd.logdet(G, q, "closed"))(psi)
    gd = torch.func.grad(lambda q: cvd.logdet(G, q, "dense"))(psi)
    assert torch.allclose(gc, gd, atol=1e-10)


def test_pseudo_logdet_of_a_weight_norm_pullback():
    h = WeightNorm((3, 4))
    g = torch.Generator().manual_seed(1)
    psi = h.inverse(torch.randn(12, generator=g, dtype=torch.float64))
    psi[3:] = psi[3:] * 1.7  # ‖v‖ ≠ g
    G = Pullback(Euclidean(), h)
    evals = torch.linalg.eigvalsh(G.dense(psi))
    assert int((evals < 1e-10).sum()) == 3          # one gauge direction per row
    truth = evals[3:].log().sum()
    assert torch.allclose(cvd.logdet(G, psi, "closed"), truth, atol=1e-10)
    assert torch.allclose(cvd.logdet(G, psi, "dense"), truth, atol=1e-10)


def test_slq_logdet_and_gradient_within_error_bars():
    G, p = _dense_field(30)
    truth = float(cvd.logdet(G, p, "dense"))
    g_true = torch.func.grad(lambda q: cvd.logdet(G, q, "dense"))(p)
    est = cvd.logdet_estimate(G, p, num_probes=30, num_steps=25, with_grad=True,
                              grad_probes=600, seed=3)
    assert abs(est.value - truth) < 4 * est.stderr + 1e-6
    assert est.stderr < 0.05 * abs(truth)
    z = (est.grad - g_true) / est.grad_stderr
    assert float(z.abs().max()) < 4.5
    # honest error bars, neither tiny nor huge: mean z² ≈ 1 (a 10% bias gives about 5)
    assert 0.4 < float((z**2).mean()) < 2.5
    # a wrong gradient would be caught
    assert float(((est.grad + g_true) / est.grad_stderr).abs().max()) > 10
    # more probes, smaller error bars
    est_small = cvd.logdet_estimate(G, p, num_probes=4, with_grad=True, grad_probes=20, seed=3)
    assert float(est_small.grad_stderr.mean()) > 2 * float(est.grad_stderr.mean())


def test_slq_logdet_as_a_loss_term_has_the_estimated_gradient():
    G, p = _dense_field(20, seed=2)
    q = p.clone().requires_grad_(True)
    val = cvd.logdet(G, q, "slq", num_probes=10, grad_probes=50, seed=5)
    val.backward()
    est = cvd.logdet_estimate(G, p, num_probes=10, with_grad=True, grad_probes=50, seed=5)
    assert abs(float(val.detach()) - est.value) < 1e-10
    assert torch.allclose(q.grad, est.grad, atol=1e-10)
    g_true = torch.func.grad(lambda x: cvd.logdet(G, x, "dense"))(p)
    assert float(((q.grad - g_true) / est.grad_stderr).abs().max()) < 4.5


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


# ------------------------------------------------------------------------------ submersions


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


def test_bad_inputs():
    loss_space = cv.ParameterSpace(lambda p: (p**2).sum())
    with pytest.raises(ValueError, match="density space"):
        cvd.map_estimate(loss_space, _t([1.0]))
    space = _lognormal_space()
    with pytest.raises(ValueError, match="method"):
        cvd.map_estimate(space, _t([1.0]), method="sgd")
    with pytest.raises(ValueError, match="adam"):
        cvd.map_estimate(space, _t([1.0]), logdet_method="slq")
    G, p = _dense_field(4)
    with pytest.raises(ValueError, match="no closed form"):
        cvd.logdet(G, p, "closed")
    with pytest.raises(ValueError, match="method"):
        cvd.logdet(G, p, "cholesky")
    with pytest.raises(ValueError, match="torch.autograd"):  # not silently a zero gradient
        torch.func.grad(lambda q: cvd.logdet(G, q, "slq"))(p)
