"""Charts from torch objects: parametrize modules, distribution transforms, and models split
into a plain model plus charts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import jacfwd

import covariant as cv
from covariant.reparam.interop import strip_parametrizations


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


def test_model_with_torch_weight_norm_in_both_charts():
    torch.manual_seed(0)
    net = nn.Sequential(
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 2)),
    ).double()
    with torch.no_grad():  # a point with ‖v‖ ≠ ‖w‖, where naive numbers move the most
        net[0].parametrizations.weight.original1.mul_(4.0)
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 3, generator=gen), torch.randint(0, 2, (12,), generator=gen)
    plain, charts, originals = cv.reparam.split_parametrizations(net)
    w_space, theta = cv.ParameterSpace.from_module(plain, nn.CrossEntropyLoss(), (X, y))
    gv = w_space.reparametrize(charts)
    psi = gv.layout.flatten(originals)
    assert torch.allclose(gv.chart(psi), theta, atol=1e-13)
    # the model's own (g, v) coordinates with the metric given in them: the naive chart
    native, p_native = cv.ParameterSpace.from_module(net, nn.CrossEntropyLoss(), (X, y),
                                                     metric_chart="native")
    assert torch.allclose(native.loss(p_native), w_space.loss(theta), atol=1e-13)
    naive_direct = cv.flatness(native, p_native, measures=("trace",))["trace"].value
    naive_ours = cv.flatness(gv.with_metric(cv.metrics.Euclidean()), psi,
                             measures=("trace",))["trace"].value
    assert naive_direct == pytest.approx(naive_ours, rel=1e-9)
    # the invariant view agrees with the w chart; the naive one does not
    inv = cv.flatness(gv, psi, measures=("trace", "max_eig"))
    ref = cv.flatness(w_space, theta, measures=("trace", "max_eig"))
    assert inv["trace"].value == pytest.approx(ref["trace"].value, rel=1e-9)
    assert inv["max_eig"].value == pytest.approx(ref["max_eig"].value, rel=1e-9)
    assert abs(naive_direct - ref["trace"].value) > 0.1 * abs(ref["trace"].value)
    # analysed directly, by default (metric in w, pulled back), the model gives the w answer
    direct, p_direct = cv.ParameterSpace.from_module(net, nn.CrossEntropyLoss(), (X, y))
    assert torch.equal(p_direct, psi)
    by_default = cv.flatness(direct, p_direct, measures=("trace", "max_eig"))
    assert by_default["trace"].value == pytest.approx(ref["trace"].value, rel=1e-9)
    assert by_default["max_eig"].value == pytest.approx(ref["max_eig"].value, rel=1e-9)


def test_strip_parametrizations_keeps_values_and_leaves_the_original_alone():
    torch.manual_seed(0)
    net = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)).double()
    twin = copy.deepcopy(net)
    values = strip_parametrizations(twin)
    assert type(twin) is nn.Linear
    assert set(values) == {"weight"}
    assert torch.equal(twin.weight.detach(), net.weight.detach())
    assert isinstance(twin.weight, nn.Parameter)
    assert torch.nn.utils.parametrize.is_parametrized(net)
    assert not torch.nn.utils.parametrize.is_parametrized(twin)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(twin(x), net(x))
    assert strip_parametrizations(nn.Linear(2, 2)) == {}
