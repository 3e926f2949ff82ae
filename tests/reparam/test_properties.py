"""Property-based invariance over random affine and elementwise charts (hypothesis).

Invariant measures agree to about 1e-8 relative in float64; the naive ones (metric dropped)
differ visibly.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import covariant as cv
from covariant.invariance import Sinh

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


def _check(chart, theta):
    space = cv.ParameterSpace(loss)
    new = space.reparametrize(chart)
    psi = chart.inverse(theta)
    ref = _measures(space, theta)
    got = _measures(new, psi)
    scale = ref.abs().max()
    assert ((got - ref).abs().max() / scale) < 1e-8
    naive = _measures(new.with_metric(cv.metrics.Euclidean()), psi)
    return float((naive - ref).abs().max() / scale)


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
