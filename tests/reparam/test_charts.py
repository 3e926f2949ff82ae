"""Every built-in chart's Jacobian products against ``torch.func.jacfwd`` of its forward map,
in float64 at random interior points."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.func import jacfwd

import covariant as cv
from covariant import reparam
from covariant.reparam import Reparametrization, Sinh


def _generic(h: Reparametrization, psi, v, w):
    """Products computed from the dense Jacobian of h.forward, independent of overrides."""
    J = jacfwd(h.forward)(psi)
    Jp = torch.linalg.pinv(J)
    return J @ v, J.T @ w, Jp @ w, Jp.T @ v, J


gen = torch.Generator().manual_seed(0)
CASES = {
    "exp": (cv.reparam.Exp(), torch.randn(5, dtype=torch.float64, generator=gen)),
    "log": (cv.reparam.Log(), torch.rand(5, dtype=torch.float64, generator=gen) + 0.2),
    "softplus": (cv.reparam.Softplus(), torch.randn(5, dtype=torch.float64, generator=gen)),
    "scale": (cv.reparam.Scale(torch.tensor([0.5, 2.0, -3.0, 1.0, 0.1])),
              torch.randn(5, dtype=torch.float64, generator=gen)),
    "sinh": (Sinh(1.3, 0.7, 0.2), torch.randn(5, dtype=torch.float64, generator=gen)),
    "affine": (cv.reparam.Affine(torch.randn(5, 5, dtype=torch.float64, generator=gen) + 3 *
                                 torch.eye(5, dtype=torch.float64), torch.ones(5)),
               torch.randn(5, dtype=torch.float64, generator=gen)),
    "polar": (cv.reparam.Polar(), torch.tensor([1.5, 0.7], dtype=torch.float64)),
    "weightnorm0": (cv.reparam.WeightNorm((2, 3), dim=0),
                    torch.cat([torch.tensor([1.2, -0.7]), torch.randn(6, generator=gen)]).double()),
    "weightnorm1": (cv.reparam.WeightNorm((2, 3), dim=1),
                    torch.cat([torch.tensor([1.2, 0.5, 2.0]), torch.randn(6, generator=gen)])
                    .double()),
    "weightnorm_none": (cv.reparam.WeightNorm((2, 3), dim=None),
                        torch.cat([torch.tensor([0.9]), torch.randn(6, generator=gen)]).double()),
    "compose": (cv.reparam.Compose(cv.reparam.Exp(), Sinh(0.8, 1.1, 0.0)),
                torch.randn(4, dtype=torch.float64, generator=gen)),
    "parameterwise": (
        cv.reparam.ParameterwiseReparametrization(
            cv.layout.ParameterLayout.from_shapes({"a": (2, 3), "b": (3,), "c": (2,)}),
            {"a": cv.reparam.WeightNorm(), "c": cv.reparam.Exp()}),
        torch.cat([torch.tensor([1.3, -0.6]), torch.randn(6, generator=gen).double(),
                   torch.randn(3, generator=gen).double(), torch.tensor([0.2, -0.4])]).double()),
    "compose_submersion": (
        cv.reparam.Compose(cv.reparam.Scale(2.0), cv.reparam.WeightNorm((2, 2))),
        torch.tensor([0.8, 1.5, 0.3, -0.4, 1.1, 0.6], dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_closed_forms_match_generic(name):
    h, psi = CASES[name]
    theta = h(psi)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(psi.shape[0], generator=g, dtype=torch.float64)
    w = torch.randn(theta.shape[0], generator=g, dtype=torch.float64)
    Jv, JTw, Jpw, JpTv, J = _generic(h, psi, v, w)
    assert torch.allclose(h.jvp(psi, v), Jv, atol=1e-12)
    assert torch.allclose(h.vjp(psi, w), JTw, atol=1e-12)
    assert torch.allclose(h.jacobian(psi), J, atol=1e-12)
    # right inverse: J J⁺ = I; equals the Moore–Penrose pseudo-inverse for these charts
    assert torch.allclose(h.jvp(psi, h.inverse_jvp(psi, w)), w, atol=1e-10)
    assert torch.allclose(h.inverse_jvp(psi, w), Jpw, atol=1e-10)
    assert torch.allclose(h.inverse_vjp(psi, v), JpTv, atol=1e-10)
    # a linearization at ψ gives the same products
    lin = h.linearize(psi)
    assert torch.allclose(lin.theta, theta, atol=1e-13)
    assert torch.allclose(lin.jvp(v), Jv, atol=1e-12)
    assert torch.allclose(lin.vjp(w), JTw, atol=1e-12)
    assert torch.allclose(lin.inverse_jvp(w), Jpw, atol=1e-10)
    assert torch.allclose(lin.inverse_vjp(v), JpTv, atol=1e-10)
    # inverse maps back to the same θ (a right inverse for submersions)
    assert torch.allclose(h(h.inverse(theta)), theta, atol=1e-12)
    if h.is_bijection:
        assert torch.allclose(h.inverse(theta), psi, atol=1e-10)
        assert torch.allclose(h.log_abs_det_jacobian(psi), torch.linalg.slogdet(J)[1], atol=1e-12)
    else:
        assert torch.linalg.matrix_rank(J) == theta.shape[0]
        K = h.gauge_directions(psi) if hasattr(h, "gauge_directions") else None
        if K is not None and K.shape[1]:
            assert torch.allclose(J @ K, torch.zeros_like(J @ K), atol=1e-12)


# ----- every built-in chart, enumerated from the package ---------------------------------------
def _r(gen, n, lo=-1.5, hi=1.5):
    return torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=gen)


class _Square(nn.Module):
    def forward(self, x):
        return x * x.abs()

    def right_inverse(self, w):
        return w.sign() * w.abs().sqrt()


def _wn_psi(gen, slices, n):
    return torch.cat([_r(gen, slices, 0.5, 2.0) * torch.where(_r(gen, slices) > 0, 1.0, -1.0),
                      _r(gen, n)])


BUILTINS = {
    "Identity": lambda g: (reparam.Identity(), _r(g, 4)),
    "Exp": lambda g: (reparam.Exp(), _r(g, 4)),
    "Log": lambda g: (reparam.Log(), _r(g, 4, 0.2, 3.0)),
    "Softplus": lambda g: (reparam.Softplus(), _r(g, 4, -3.0, 3.0)),
    "Sinh": lambda g: (reparam.Sinh(_r(g, 4, 0.5, 1.5), _r(g, 4, 0.5, 2.0), _r(g, 4)), _r(g, 4)),
    "Cubic": lambda g: (reparam.Cubic(0.3), _r(g, 4, -2.0, 2.0)),
    "Scale": lambda g: (reparam.Scale(_r(g, 4, 0.5, 2.0)), _r(g, 4)),
    "Affine": lambda g: (reparam.Affine(torch.randn(4, 4, generator=g, dtype=torch.float64)
                                        + 3 * torch.eye(4, dtype=torch.float64), _r(g, 4)),
                         _r(g, 4)),
    "Polar": lambda g: (reparam.Polar(), torch.stack([_r(g, 1, 0.3, 3.0)[0], _r(g, 1, -3, 3)[0]])),
    "WeightNorm": lambda g: (reparam.WeightNorm((2, 3), dim=1), _wn_psi(g, 3, 6)),
    "FromFunctions": lambda g: (reparam.FromFunctions(lambda p: p**3 + p, lambda t: t), _r(g, 3)),
    "Compose": lambda g: (reparam.Compose(reparam.Exp(), reparam.Sinh(0.8, 1.1, 0.0)), _r(g, 4)),
    "ParameterwiseReparametrization": lambda g: (
        reparam.ParameterwiseReparametrization(
            cv.layout.ParameterLayout.from_shapes({"a": (2, 3), "b": (2,)}),
            {"a": reparam.WeightNorm(), "b": reparam.Softplus()}),
        torch.cat([_wn_psi(g, 2, 6), _r(g, 2)])),
    "from_parametrization": lambda g: (reparam.from_parametrization(_Square(), shape=(3,)),
                                       _r(g, 3, 0.3, 2.0)),
    "from_transform": lambda g: (
        reparam.from_transform(torch.distributions.transforms.SigmoidTransform()), _r(g, 3)),
}


def test_every_builtin_chart_has_a_case():
    concrete = {
        name for name in reparam.__all__
        if inspect.isclass(obj := getattr(reparam, name)) and issubclass(obj, Reparametrization)
        and obj not in (Reparametrization, reparam.Elementwise)
    }
    factories = {name for name in reparam.__all__ if name.startswith("from_")}
    assert concrete | factories <= set(BUILTINS)


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_products_match_jacfwd(name, seed):
    gen = torch.Generator().manual_seed(seed)
    h, psi = BUILTINS[name](gen)
    J = jacfwd(h.forward)(psi)
    d, k = J.shape
    v = torch.randn(k, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    assert torch.allclose(h.jvp(psi, v), J @ v, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h.vjp(psi, w), J.T @ w, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h.jacobian(psi), J, rtol=1e-12, atol=1e-12)
    Jp = torch.linalg.pinv(J)
    assert torch.allclose(h.inverse_jvp(psi, w), Jp @ w, rtol=1e-9, atol=1e-10)
    assert torch.allclose(h.inverse_vjp(psi, v), Jp.T @ v, rtol=1e-9, atol=1e-10)
    if d == k:
        assert h.is_bijection
        assert torch.allclose(h.log_abs_det_jacobian(psi), torch.linalg.slogdet(J)[1],
                              rtol=1e-12, atol=1e-12)
