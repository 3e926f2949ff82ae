"""Weight normalization, a submersion chart (docs/math.md §5), on a small MLP at a
non-critical point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv


def _mlp_space(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(16, 3, generator=gen)
    y = torch.randint(0, 2, (16,), generator=gen)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    # a Gaussian prior term keeps every eigenvalue away from 0, so log-determinants are sharp
    regularized = cv.ParameterSpace(lambda p: space._loss(p) + 0.05 * (p**2).sum(),
                                    layout=space.layout)
    return regularized, theta


def _scale_v(chart, psi, s):
    """Rescale every v by s: the network does not change (the gauge direction)."""
    out = psi.clone()
    for name in chart.blocks:
        sl = chart.psi_slices[name]
        n_g = chart.blocks[name].num_slices
        out[sl.start + n_g : sl.stop] *= s
    return out


CHARTS = {"0.weight": cv.reparam.WeightNorm(), "2.weight": cv.reparam.WeightNorm()}


def test_weight_norm_spectrum_invariant_naive_not():
    space, theta = _mlp_space()
    assert space.grad(theta).norm() > 1e-2  # non-critical point
    wn = space.reparametrize(CHARTS)
    assert wn.layout.names[:2] == ("0.weight.g", "0.weight.v")
    assert wn.dim == theta.shape[0] + 4 + 2
    base = torch.tensor(cv.flatness(space, theta, measures=("spectrum",))["spectrum"].value)
    naive_max = {}
    for s in (0.1, 1.0, 10.0):
        psi = _scale_v(wn.chart, wn.chart.inverse(theta), s)
        assert torch.allclose(wn.chart(psi), theta, atol=1e-13)
        report = cv.flatness(wn, psi, measures=("spectrum", "trace", "logdet"))
        spec = torch.tensor(report["spectrum"].value)
        assert spec.shape == base.shape  # the 6 gauge zeros are projected out
        assert torch.allclose(spec, base, rtol=1e-8, atol=1e-10)
        ref = cv.flatness(space, theta, measures=("trace", "logdet"))
        assert report["trace"].value == pytest.approx(ref["trace"].value, rel=1e-9)
        assert report["logdet"].value == pytest.approx(ref["logdet"].value, rel=1e-8)
        # the dense G⁺Hess has exactly the same nonzero eigenvalues plus one 0 per gauge dir
        E = wn.shape_operator(psi)
        ev = torch.linalg.eigvals(E).real.sort().values
        nonzero = ev[ev.abs() > 1e-9]
        assert torch.allclose(nonzero, base.sort().values[base.sort().values.abs() > 1e-9],
                              rtol=1e-7, atol=1e-9)
        naive = wn.with_metric(cv.metrics.Euclidean())
        nr = cv.flatness(naive, psi, measures=("max_eig", "trace"))
        naive_max[s] = (nr["max_eig"].value, nr["trace"].value)
    # naive flatness moves by more than an order of magnitude (and the trace even flips sign)
    # with a change that does nothing to the network
    assert naive_max[0.1][0] / naive_max[10.0][0] > 10
    assert abs(naive_max[0.1][1]) / abs(naive_max[10.0][1]) > 10


def test_chart_riemannian_hessian_equals_pullback():
    """Away from critical points, ∇²(L∘h) − Γ·∇(L∘h) with the pseudo-inverse = Jᵀ Hess_Θ J."""
    space, theta = _mlp_space(1)
    wn = space.reparametrize(CHARTS)
    psi = _scale_v(wn.chart, wn.chart.inverse(theta), 3.0)
    J = wn.chart.jacobian(psi)
    pullback = J.T @ space.hessian(theta) @ J
    chart_hess = wn.hessian(psi, method="general")  # ground-truth path, pinv connection
    assert torch.allclose(chart_hess, pullback, atol=1e-10)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(psi.shape[0], generator=gen)
    assert torch.allclose(wn.hvp(psi, v, method="general"), pullback @ v, atol=1e-10)
    assert torch.allclose(wn.hvp(psi, v, method="pullback"), pullback @ v, atol=1e-10)
    # the naive Euclidean Hessian differs
    assert (wn.hessian(psi, riemannian=False) - pullback).abs().max() > 1e-3


def test_pseudo_inverse_metric_closed_form_vs_generic():
    h = cv.reparam.WeightNorm((3, 4), dim=0)
    gen = torch.Generator().manual_seed(0)
    psi = h.inverse(torch.randn(12, generator=gen))
    psi[3:] *= 2.5
    G = cv.metrics.Pullback(cv.metrics.Euclidean(), h)
    dense = G.dense(psi)
    assert torch.linalg.matrix_rank(dense) == 12
    pinv = torch.linalg.pinv(dense, hermitian=True)
    w = torch.randn(15, generator=gen)
    assert torch.allclose(G.solve(psi, w), pinv @ w, atol=1e-10)
    # the gauge directions span the kernel
    K = h.gauge_directions(psi)
    assert K.shape == (15, 3)
    assert torch.allclose(dense @ K, torch.zeros(15, 3), atol=1e-12)
    # pseudo-log-determinant = sum of logs of nonzero eigenvalues
    ev = torch.linalg.eigvalsh(dense)[3:]
    assert torch.allclose(G.pseudo_logdet(psi), ev.log().sum(), atol=1e-10)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_matches_torch(dim):
    lin = nn.Linear(4, 3).double()
    w = lin.weight.detach().clone()
    wn = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3).double(), dim=dim)
    with torch.no_grad():
        wn.weight = w  # sets g, v through right_inverse
    g = wn.parametrizations.weight.original0.detach()
    v = wn.parametrizations.weight.original1.detach() * 1.7  # any ‖v‖: w is unchanged
    h = cv.reparam.WeightNorm((3, 4), dim=dim)
    psi = torch.cat([g.reshape(-1), v.reshape(-1)])
    assert torch.allclose(h(psi), w.reshape(-1), atol=1e-12)
    with torch.no_grad():
        wn.parametrizations.weight.original1.copy_(v)
    assert torch.allclose(wn.weight.detach().reshape(-1), h(psi), atol=1e-12)
