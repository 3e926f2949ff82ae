"""``from_module`` on a model that already uses ``torch.nn.utils.parametrize`` (issue 11, item 4).

The metric is given in the plain weights w and pulled back to the model's own (g, v)
coordinates by default, so every answer equals the plain model's. The ground truth is a second,
unparametrized model holding the effective weights w. Weight norm leaves w unchanged when v is
rescaled, so the invariant answer must not move with ‖v‖; the naive one (the metric in the
model's own coordinates, ``metric_chart="native"``) does. Before the fix, the default was the
naive one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv

SCALES = (0.1, 1.0, 10.0)
LOSS = nn.CrossEntropyLoss()


def _cnn(weight_norm: bool) -> nn.Sequential:
    conv, lin = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)
    if weight_norm:
        conv = torch.nn.utils.parametrizations.weight_norm(conv)
        lin = torch.nn.utils.parametrizations.weight_norm(lin)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), lin).double()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    net = _cnn(True)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    return net, (X, y)


def _with_v_scaled(net: nn.Module, s: float) -> nn.Module:
    """The same function (same w), with every v multiplied by s."""
    twin = _cnn(True)
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        for i in (0, 3):
            twin[i].parametrizations.weight.original1.mul_(s)
            assert torch.allclose(twin[i].weight, net[i].weight, atol=1e-14)
    return twin


def _plain_twin(net: nn.Module) -> nn.Module:
    """The unparametrized model holding ``net``'s effective weights (the ground truth's)."""
    plain = _cnn(False)
    with torch.no_grad():
        for i in (0, 3):
            plain[i].weight.copy_(net[i].weight)
            plain[i].bias.copy_(net[i].bias)
    return plain


def _trace(space: cv.ParameterSpace, p: torch.Tensor) -> float:
    return cv.flatness(space, p, measures=("trace",), method="dense")["trace"].value


@pytest.mark.parametrize("metric", ["euclidean", "ggn"])
def test_default_metric_is_given_in_the_weights_and_pulled_back(problem, metric):
    net, data = problem
    w_space, theta = cv.ParameterSpace.from_module(_plain_twin(net), LOSS, data, metric=metric)
    truth = _trace(w_space, theta)
    for s in SCALES:
        space, psi = cv.ParameterSpace.from_module(_with_v_scaled(net, s), LOSS, data,
                                                   metric=metric)
        assert space.dim == w_space.dim + 5  # one g per output unit: 2 conv + 3 linear
        w = space.parent.unflatten(space.to_root(psi))  # the plain weights, by name
        assert all(torch.allclose(w[k], t, atol=1e-13) for k, t in
                   w_space.unflatten(theta).items())
        assert _trace(space, psi) == pytest.approx(truth, rel=1e-10), s


def test_native_metric_chart_is_the_naive_view_and_moves_with_v(problem):
    net, data = problem
    w_space, theta = cv.ParameterSpace.from_module(_plain_twin(net), LOSS, data)
    truth = _trace(w_space, theta)
    naive = []
    for s in SCALES:
        model = _with_v_scaled(net, s)
        native, psi = cv.ParameterSpace.from_module(model, LOSS, data, metric_chart="native")
        default, psi_d = cv.ParameterSpace.from_module(model, LOSS, data)
        assert torch.equal(psi, psi_d)
        value = _trace(native, psi)
        # the same as dropping the pulled-back metric of the default space
        dropped = _trace(default.with_metric(cv.metrics.Euclidean()), psi)
        assert value == pytest.approx(dropped, rel=1e-10)
        naive.append(value)
    # the naive trace depends on ‖v‖ although the function and its w-Hessian do not
    assert min(abs(a - b) for i, a in enumerate(naive) for b in naive[i + 1:]) > abs(truth)
    assert all(abs(v - truth) > 0.5 * abs(truth) for v in naive)


def test_a_metric_object_is_taken_in_the_weights(problem):
    net, data = problem
    model = _with_v_scaled(net, 10.0)
    G = cv.metrics.Diagonal(lambda q: 1.0 + q**2)  # point-dependent: connection terms matter
    w_space, theta = cv.ParameterSpace.from_module(_plain_twin(net), LOSS, data, metric=G)
    space, psi = cv.ParameterSpace.from_module(model, LOSS, data, metric=G)
    assert space.parent.metric is G
    assert _trace(space, psi) == pytest.approx(_trace(w_space, theta), rel=1e-10)


def test_metric_chart_is_validated_on_every_model(problem):
    net, data = problem
    for model in (net, _plain_twin(net)):
        with pytest.raises(ValueError, match="metric_chart must be 'weights'"):
            cv.ParameterSpace.from_module(model, LOSS, data, metric_chart="plain")
        with pytest.raises(TypeError, match="metric_chart must be a string"):
            cv.ParameterSpace.from_module(model, LOSS, data, metric_chart=None)
    # without parametrizations both choices are the same space
    plain = _plain_twin(net)
    a, theta = cv.ParameterSpace.from_module(plain, LOSS, data, metric_chart="native")
    b, _ = cv.ParameterSpace.from_module(plain, LOSS, data)
    assert _trace(a, theta) == _trace(b, theta)
