"""Function-preserving attacks and the adversary of the generalization study."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import covariant as cv
from covariant.experiments.generalization.attacks import (
    adversary,
    adversary_search,
    attack,
    layerwise_alpha,
    per_neuron,
)
from covariant.zoo.architectures import MLP


def _net(seed: int, hidden=(5, 4)) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(3, 2, hidden=hidden, activation="relu").double()


def _x() -> torch.Tensor:
    return torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["layerwise_alpha", "per_neuron"])
@pytest.mark.parametrize("c", [1e-2, 0.3, 7.0, 100.0])
def test_symmetries_preserve_the_function_and_move_the_point(kind, c):
    net, x = _net(0), _x()
    other, chart = attack(kind, net, c, seed=3)
    assert chart is None
    with torch.no_grad():
        out, out2 = net(x), other(x)
    assert float((out - out2).abs().max()) <= 1e-10 * float(out.abs().max())
    moved = float((_params(net) - _params(other)).norm() / _params(net).norm())
    assert moved > 0.1  # a different point
    assert float((_params(net) - _params(_net(0))).abs().max()) == 0.0  # input untouched


def test_layerwise_alpha_scales_weights_and_biases_by_the_products():
    net = _net(0)
    other = layerwise_alpha(net, [2.0, 3.0, 1 / 6])
    lin, lin2 = [m for m in net if isinstance(m, nn.Linear)], [
        m for m in other if isinstance(m, nn.Linear)]
    for a, cum, m, m2 in zip([2.0, 3.0, 1 / 6], [2.0, 6.0, 1.0], lin, lin2, strict=True):
        assert torch.allclose(m2.weight, a * m.weight, rtol=1e-15, atol=0)
        assert torch.allclose(m2.bias, cum * m.bias, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="product 1"):
        layerwise_alpha(net, [2.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="homogeneous"):
        layerwise_alpha(MLP(3, 2, hidden=(4,), activation="tanh").double(), [2.0, 0.5])


def test_per_neuron_scales_rows_and_columns():
    net = _net(0, hidden=(3,))
    s = torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64)
    other = per_neuron(net, [s])
    assert torch.allclose(other[0].weight, s[:, None] * net[0].weight, rtol=1e-15, atol=0)
    assert torch.allclose(other[0].bias, s * net[0].bias, rtol=1e-15, atol=0)
    assert torch.allclose(other[2].weight, net[2].weight / s, rtol=1e-15, atol=0)
    with torch.no_grad():
        assert float((net(_x()) - other(_x())).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="positive"):
        per_neuron(net, [-s])


@pytest.mark.parametrize("kind, c", [("reparametrization", 5.0), ("weight_norm", 40.0),
                                     ("weight_norm", 0.02), ("elementwise", 3.0)])
def test_charts_represent_the_same_point(kind, c):
    net, x = _net(0), _x()
    space, theta = cv.ParameterSpace.from_module(net, nn.MSELoss(), (x, torch.zeros(50, 2)))
    same, chart = attack(kind, net, c)
    assert same is net and chart is not None
    new, psi = chart.apply(space, theta)
    back = new.to_root(psi)
    assert float((back - theta).abs().max()) <= 1e-10 * float(theta.abs().max())
    assert float(new.loss(psi)) == pytest.approx(float(space.loss(theta)), rel=1e-10)
    assert float((psi[: theta.numel()] - theta).abs().max()) > 1e-3  # other coordinates
    if kind == "weight_norm":  # ‖v‖ = c ‖w‖ row by row
        v = new.layout.unflatten(psi)["0.weight.v"]
        assert torch.allclose(v.norm(dim=1), c * net[0].weight.norm(dim=1), rtol=1e-12)


def test_adversary_search_hand_example():
    # gap (1,2,3); candidates per model: model 0 ∈ {1, 10}, 1 ∈ {2, 0}, 2 ∈ {3, −5}.
    # Unattacked (1,2,3): τ = 1. Toward −1, sweep 1: model 0 → 10 gives (10,2,3): τ = −1/3;
    # model 1 → 0 gives (10,0,3): still −1/3 (no strict gain, kept); model 2 → −5 gives
    # (10,2,−5): every pair discordant, τ = −1. Toward +1 nothing beats τ = 1.
    values = np.array([[1.0, 10.0], [2.0, 0.0], [3.0, -5.0]])
    t_down, t_up, down, up = adversary_search(values, [1.0, 2.0, 3.0])
    assert (t_down, t_up) == (-1.0, 1.0)
    assert down.tolist() == [1, 0, 1] and up.tolist() == [0, 0, 0]


def test_adversary_never_picks_an_undefined_value():
    # the hand example above, but model 2's attacked value is undefined (NaN: e.g. a chart
    # that is degenerate at that point): the search toward −1 can only reach (10, 2, 3),
    # τ = −1/3; the NaN is counted and left out of the largest relative change (|10−1|/1 = 9)
    table = {(0, 2.0): 10.0, (1, 2.0): 0.0, (2, 2.0): math.nan}
    res = adversary(lambda i, c: table[(i, c)], [1.0, 2.0, 3.0], [2.0], [1.0, 2.0, 3.0])
    assert res.tau_after == pytest.approx(-1 / 3, abs=1e-15)
    assert res.choice[2] is None and res.choice[0] == 2.0
    assert res.num_undefined == 1 and res.max_rel_change == 9.0


def _population(n: int = 10):
    """Random ReLU nets; the 'gap' is a function-space quantity plus a little noise."""
    x = _x()
    nets = [_net(seed) for seed in range(n)]
    with torch.no_grad():
        fn_size = np.array([float(net(x).pow(2).mean()) for net in nets])
    gap = fn_size + 0.05 * fn_size.std() * np.random.default_rng(0).normal(size=n)
    return nets, x, gap


@pytest.mark.parametrize("kind", ["layerwise_alpha", "per_neuron"])
def test_adversary_moves_a_naive_measure_not_an_invariant_one(kind):
    nets, x, gap = _population()
    strengths = [1 / 16, 1 / 4, 4.0, 16.0]

    def l2(net):
        return float(_params(net).norm() ** 2)

    def fn_size(net):
        with torch.no_grad():
            return float(net(x).pow(2).mean())

    for measure, invariant in ((l2, False), (fn_size, True)):
        res = adversary(lambda i, c, m=measure: m(attack(kind, nets[i], c, seed=i)[0]),
                        gap, strengths, [measure(n) for n in nets])
        assert res.num_evaluations == len(nets) * len(strengths)
        if invariant:
            assert res.max_rel_change < 1e-12
            assert res.tau_after == res.tau_before
            assert res.tau_before > 0.7
        else:
            assert res.max_rel_change > 10.0
            assert abs(res.tau_after - res.tau_before) > 0.6  # the ranking is the adversary's
            assert min(abs(res.tau_down + 1), abs(res.tau_up - 1)) < 0.25
    assert not math.isnan(res.tau_down)
