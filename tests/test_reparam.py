"""Charts: closed-form Jacobian products against the generic torch.func path, and interop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacfwd

import covariant as cv
from covariant.invariance import Sinh
from covariant.reparam import Reparametrization


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


def test_from_parametrization_weight_norm_module():
    lin = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3).double())
    module = lin.parametrizations.weight[0]
    h = cv.reparam.from_parametrization(module, shape=(3, 4))
    assert not h.is_bijection
    ours = cv.reparam.WeightNorm((3, 4))
    w = torch.randn(12, dtype=torch.float64)
    psi = h.inverse(w)
    assert torch.allclose(h(psi), w, atol=1e-12)
    assert torch.allclose(h.jacobian(psi), ours.jacobian(psi), atol=1e-12)


def test_from_transform_matches_builtin():
    from torch.distributions.transforms import ExpTransform, SigmoidTransform

    h = cv.reparam.from_transform(ExpTransform())
    psi = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(h(psi), cv.reparam.Exp()(psi))
    assert torch.allclose(h.log_abs_det_jacobian(psi), psi.sum())
    s = cv.reparam.from_transform(SigmoidTransform())
    J = jacfwd(s.forward)(psi)
    assert torch.allclose(s.log_abs_det_jacobian(psi), torch.linalg.slogdet(J)[1])
    with pytest.raises(cv.errors.DomainError):
        s.inverse(torch.tensor([1.5], dtype=torch.float64))


def test_parameterwise_by_name_and_glob():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y))
    new = space.reparametrize(
        {"*.weight": cv.reparam.WeightNorm(), "2.bias": cv.reparam.Scale(3.0)}
    )
    assert new.layout.names == ("0.weight.g", "0.weight.v", "0.bias", "2.weight.g", "2.weight.v",
                                "2.bias")
    psi = new.chart.inverse(theta)
    assert torch.allclose(new.chart(psi), theta, atol=1e-13)
    assert torch.allclose(new.unflatten(psi)["2.bias"] * 3.0, space.unflatten(theta)["2.bias"])
    assert torch.allclose(new.loss(psi), space.loss(theta), atol=1e-13)
    with pytest.raises(cv.errors.ShapeMismatchError, match="matches no parameter"):
        space.reparametrize({"3.weight": cv.reparam.Exp()})


def test_batches_average_like_full_batch():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    full, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    split, _ = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])]
    )
    summed, _ = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(reduction="sum"), [(X[:4], y[:4]), (X[4:], y[4:])]
    )
    assert torch.allclose(full.loss(theta), split.loss(theta), atol=1e-14)
    assert torch.allclose(full.grad(theta), split.grad(theta), atol=1e-14)
    assert torch.allclose(summed.loss(theta), 10 * full.loss(theta), atol=1e-12)
