"""Property-based invariance over random affine and elementwise charts (hypothesis).

Invariant measures agree to about 1e-8 relative in float64; the naive ones (metric dropped)
differ visibly. The dense flatness path pulls the Hessian back with the chart's own Jacobian,
the same J the metric uses, so it stays invariant for *any* invertible J, a wrong one
included. So each chart is also checked against ``torch.func.jacfwd`` of its forward map, and
the invariance is also checked through the connection-term path
(``space.hessian(p, method="general")``: the Hessian of L∘h by autodiff of h itself, minus
Christoffel terms of the metric built from the chart's products).
``test_wrong_derivative_is_caught`` shows that both checks catch a chart whose derivative is
1% off, which the pullback path cannot.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacfwd

import covariant as cv
from covariant.reparam import Sinh

DIM = 3


def loss(p: torch.Tensor) -> torch.Tensor:
    # a non-quadratic, non-separable loss with curvature that varies in space
    return ((p**2).sum() - 1) ** 2 + 0.5 * torch.sin(p[0] * p[1]) + 0.3 * p[2] ** 3 + p[0] * p[2]


floats = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)
points = st.lists(floats, min_size=DIM, max_size=DIM).map(
    lambda x: torch.tensor(x, dtype=torch.float64)
)


@st.composite
def affine_charts(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    scales = torch.exp(torch.empty(DIM, dtype=torch.float64).uniform_(-2, 2, generator=gen))
    return cv.reparam.Affine(q * scales, torch.randn(DIM, generator=gen, dtype=torch.float64))


@st.composite
def elementwise_charts(draw):
    a = torch.tensor(draw(st.lists(st.floats(0.3, 2.0), min_size=DIM, max_size=DIM)))
    s = torch.tensor(draw(st.lists(st.floats(0.2, 5.0), min_size=DIM, max_size=DIM)))
    kind = draw(st.sampled_from(["sinh", "scale", "sinh_then_scale"]))
    if kind == "sinh":
        return Sinh(a, s, 0.1)
    if kind == "scale":
        return cv.reparam.Scale(s)
    return cv.reparam.Compose(cv.reparam.Scale(s), Sinh(a, 1.0, 0.0))


MEASURES = ("trace", "logdet", "max_eig", "spectrum")


def _measures(space, p):
    r = cv.flatness(space, p, measures=MEASURES)
    return torch.tensor([r["trace"].value, r["logdet"].value, r["max_eig"].value,
                         *r["spectrum"].value])


def _spectrum(H, G):
    """Eigenvalues of G⁻¹H (G SPD), ascending: dense float64 truth."""
    L = torch.linalg.cholesky(G)
    A = torch.linalg.solve_triangular(L, H, upper=False)
    A = torch.linalg.solve_triangular(L, A.T, upper=False)
    return torch.linalg.eigvalsh(0.5 * (A + A.T))


def _general_measures(space, p):
    """trace, log|det|, max eigenvalue and spectrum of E = G⁻¹ Hess through the connection."""
    ev = _spectrum(space.hessian(p, method="general"), space.metric.dense(p))
    return torch.cat([torch.stack([ev.sum(), ev.abs().log().sum(), ev[-1]]), ev.flip(0)])


def _jacobian_error(chart, psi):
    """Largest error of the chart's products against jacfwd of its forward map."""
    J = jacfwd(chart.forward)(psi)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(psi.shape[0], generator=gen, dtype=torch.float64)
    errs = [chart.jvp(psi, v) - J @ v, chart.vjp(psi, v) - J.T @ v,
            chart.jacobian(psi) - J, chart.inverse_jvp(psi, v) - torch.linalg.solve(J, v),
            chart.inverse_vjp(psi, v) - torch.linalg.solve(J.T, v)]
    return max(float(e.abs().max()) for e in errs) / float(J.abs().max())


def _gaps(chart, theta):
    """Relative gaps to the θ chart: (pullback path, general path, naive), and jacfwd error."""
    space = cv.ParameterSpace(loss)
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    ref = _measures(space, theta)
    scale = ref.abs().max()

    def gap(x):
        return float((x - ref).abs().max() / scale)

    naive = _measures(new.with_metric(cv.metrics.Euclidean()), psi)
    return (gap(_measures(new, psi)), gap(_general_measures(new, psi)), gap(naive),
            _jacobian_error(chart, psi))


def _check(chart, theta):
    pullback, general, naive, jac = _gaps(chart, theta)
    assert jac < 1e-10
    assert pullback < 1e-8
    assert general < 1e-8
    return naive


@settings(max_examples=25, deadline=None, derandomize=True)
@given(chart=affine_charts(), theta=points)
def test_affine_charts(chart, theta):
    gap = _check(chart, theta)
    # a random affine chart with scales in [e^-2, e^2] visibly changes the naive numbers
    assert gap > 1e-3


@settings(max_examples=25, deadline=None, derandomize=True)
@given(chart=elementwise_charts(), theta=points)
def test_elementwise_charts(chart, theta):
    gap = _check(chart, theta)
    if not (isinstance(chart, cv.reparam.Scale) and torch.allclose(chart.alpha.abs(),
                                                                    torch.ones(DIM))):
        assert gap > 1e-6


class _WrongSinh(Sinh):
    """A chart whose derivative is 1% off: jvp, vjp, jacobian, J⁻¹ and log|det J| all wrong."""

    def derivative(self, psi):
        return 1.01 * super().derivative(psi)


def test_wrong_derivative_is_caught():
    theta = torch.tensor([0.3, -0.7, 0.5], dtype=torch.float64)
    a, s = torch.tensor([0.7, 1.2, 1.6]), torch.tensor([0.5, 1.5, 3.0])
    pullback, general, _, jac = _gaps(_WrongSinh(a, s, 0.1), theta)
    assert jac > 1e-3  # the jacfwd comparison detects it
    assert general > 1e-3  # so does invariance through the connection-term path
    # the pullback path cannot: it uses the same wrong J in the Hessian and the metric
    assert pullback < 1e-8
    # and the right chart passes all three
    right = _gaps(Sinh(a, s, 0.1), theta)
    assert max(right[0], right[1]) < 1e-8 and right[3] < 1e-10
