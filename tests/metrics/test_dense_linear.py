"""The structured dense curvature metric of all-``nn.Linear`` models (metrics/dense_linear.py).

``CurvatureMetric.dense`` builds G from per-layer Kronecker sums when every trainable
parameter lives in an ``nn.Linear``; it must equal the d Gauss-Newton products (rel 1e-12,
float64) and a Jacobian ground truth, and every other model must take the products.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import covariant as cv
from covariant.metrics import linear_structure
from covariant.metrics.dense_linear import linear_layers

DT = torch.float64


class Centered(nn.Module):
    """Subtracts the batch mean: samples interact, with no parameters of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


@pytest.fixture
def calls(monkeypatch):
    """The results of every structured build (None: the model did not qualify)."""
    seen: list[torch.Tensor | None] = []
    real = linear_structure.linear_dense

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(linear_structure, "linear_dense", spy)
    return seen


def _data(n_batches: int, n: int, d_in: int, kind: str, classes: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for b in range(n_batches):
        X = torch.randn(n + 3 * b, d_in, generator=g, dtype=DT)
        if kind == "ce":
            y = torch.randint(0, classes, (X.shape[0],), generator=g)
        elif kind == "bce":
            y = torch.rand(X.shape[0], classes, generator=g, dtype=DT).round()
        else:
            y = torch.randn(X.shape[0], classes, generator=g, dtype=DT)
        out.append((X, y))
    return out


def _generic(metric, theta):
    """The same metric without its module: d vmapped products."""
    metric.module = None
    return metric.dense(theta)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _truth(space, theta):
    """Σ_b w_b J_bᵀ H_b J_b from jacrev of the model and the Hessian of the loss."""
    b = space.binding
    total = 0.0
    for w, (X, y) in zip(b.weights, b.batches, strict=True):
        out = b.forward(theta, X)
        J = jacrev(lambda q, X=X: b.forward(q, X))(theta).reshape(out.numel(), -1)
        H = hessian(lambda o, y=y, s=out.shape: b.loss_fn(o.reshape(s), y))(out.reshape(-1))
        total = total + w * J.T @ H @ J
    return total


def _mlp(bias: bool = True, depth: int = 2, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 6, bias=bias), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(6, 6, bias=bias), act()]
    return nn.Sequential(*layers, nn.Linear(6, 4, bias=bias)).to(DT)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_mlp_equals_products_and_jacobian_truth(calls, bias, reduction):
    model = _mlp(bias, depth=3)
    space, theta = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(reduction=reduction), _data(3, 7, 5, "ce"), "ggn")
    assert len(space.binding.batches) == 3
    fast = space.metric.dense(theta)
    assert len(calls) == 1 and calls[0] is not None  # the structured path was taken
    assert _rel(fast, _generic(space.metric, theta)) < 1e-12
    assert _rel(fast, _truth(space, theta)) < 1e-12


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.MSELoss(reduction="sum"),
                                  nn.BCEWithLogitsLoss()])
def test_regression_and_bce_mlps(calls, loss):
    model = _mlp(True, depth=2, act=nn.ReLU)
    kind = "bce" if isinstance(loss, nn.BCEWithLogitsLoss) else "mse"
    space, theta = cv.ParameterSpace.from_module(model, loss, _data(2, 9, 5, kind), "ggn")
    fast = space.metric.dense(theta)
    assert calls[0] is not None
    assert _rel(fast, _generic(space.metric, theta)) < 1e-12
    assert _rel(fast, _truth(space, theta)) < 1e-12


@pytest.mark.parametrize("name", ["fisher", "fisher_mc", "empirical_fisher"])
def test_fisher_and_empirical_fisher_take_the_same_path(calls, name):
    model = _mlp(True)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data(2, 8, 5, "ce"), "ggn")
    if name == "fisher":
        metric = cv.metrics.Fisher.from_space(space)
    elif name == "fisher_mc":
        metric = cv.metrics.Fisher.from_space(space, mc_samples=3, seed=2)
    else:
        metric = cv.metrics.EmpiricalFisher.from_space(space)
    fast = metric.dense(theta)
    assert calls[0] is not None
    assert _rel(fast, _generic(metric, theta)) < 1e-12


def test_frozen_layer_and_bias_only_layer(calls):
    model = _mlp(True, depth=3)
    model[0].weight.requires_grad_(False)  # layer 0 contributes its bias only
    model[2].requires_grad_(False)         # layer 1 is frozen altogether
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data(2, 8, 5, "ce"), "ggn")
    assert theta.shape[0] == 6 + 6 * 4 + 4
    fast = space.metric.dense(theta)
    assert calls[0] is not None
    assert _rel(fast, _generic(space.metric, theta)) < 1e-12


@pytest.mark.parametrize("extra", ["conv", "layernorm"])
def test_other_modules_with_parameters_take_the_products(calls, extra):
    torch.manual_seed(0)
    if extra == "conv":
        model = nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                              nn.Tanh(), nn.Linear(6, 4)).to(DT)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 4)).to(DT)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data(2, 8, 5, "ce"), "ggn")
    assert linear_layers(model, theta.shape[0]) is None
    G = space.metric.dense(theta)
    assert calls == []  # never tried
    assert _rel(G, _truth(space, theta)) < 1e-12


def test_interacting_samples_fail_the_check_and_take_the_products(calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Centered(), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data(1, 10, 5, "ce"), "ggn")
    G = space.metric.dense(theta)
    assert calls[0] is not None  # built, then rejected by the product check
    assert _rel(calls[0], G) > 1e-3  # the per-sample formula is wrong here ...
    assert _rel(G, _truth(space, theta)) < 1e-12  # ... and the products are used instead


def test_a_chart_space_and_a_point_inside_a_transform_take_the_products(calls):
    model = _mlp(True)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data(1, 8, 5, "ce"), "ggn")
    new = space.reparametrize(cv.reparam.Scale(2.0))
    G = cv.metrics.GGN.from_space(new)
    psi = new.chart.inverse(theta)
    assert G.module is None
    dense = G.dense(psi)
    assert _rel(dense, 4.0 * space.metric.dense(theta)) < 1e-12
    calls.clear()
    jac = torch.func.jacfwd(lambda q: space.metric.dense(q)[0])(theta)  # forward mode
    assert calls == [] and jac.shape == (theta.shape[0], theta.shape[0])


def test_a_linear_layer_on_sequences_takes_the_products(calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 4)).to(DT)
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(9, 2, 5, generator=g, dtype=DT), torch.randint(0, 4, (9,), generator=g))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    G = space.metric.dense(theta)
    assert calls == [None]  # qualifies by its modules, rejected by its (N, T, in) input
    assert _rel(G, _truth(space, theta)) < 1e-12


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_batched_connection_remainders_equal_one_at_a_time(loss):
    """ConnectionForm.remainders (vmapped over directions, flatness/trace.py) = remainder(u)
    (an output Hessian that depends on the outputs: MSE's remainder is zero)."""
    model = _mlp(True, depth=3)
    fn = nn.CrossEntropyLoss() if loss == "ce" else nn.BCEWithLogitsLoss()
    space, theta = cv.ParameterSpace.from_module(model, fn, _data(2, 8, 5, loss), "ggn")
    g = torch.Generator().manual_seed(5)
    r = torch.randn(theta.shape[0], generator=g, dtype=DT)
    U = torch.randn(theta.shape[0], 40, generator=g, dtype=DT)  # more than one chunk
    form = space.metric.connection_form(theta, r)
    assert form.batched is not None
    one = torch.stack([form.remainder(u) for u in U.T])
    assert float(one.abs().min()) > 0
    assert float((form.remainders(U) - one).norm() / one.norm()) < 1e-12
    scaled = form.plus(space.metric.connection_form(theta, 2 * r), 0.5)  # = 2 × form
    assert float((scaled.remainders(U) - 2 * one).norm() / one.norm()) < 1e-12


@pytest.mark.parametrize("name", ["ggn", "fisher", "fisher_mc", "empirical_fisher"])
def test_connection_form_equals_the_generic_derivatives_of_the_metric(name):
    """rᵀGΓ(u, u) from the metric's form (one output jvp for a loss Hessian) = the base
    class's D_u(rᵀGu) − ½ D_r(uᵀGu) by jvps of ``inner``."""
    from torch.func import jvp

    from covariant.metrics.base import Metric

    model = _mlp(True, depth=3)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data(2, 8, 5, "ce"), "ggn")
    metric = {"ggn": lambda: cv.metrics.GGN.from_space(space),
              "fisher": lambda: cv.metrics.Fisher.from_space(space),
              "fisher_mc": lambda: cv.metrics.Fisher.from_space(space, mc_samples=3, seed=1),
              "empirical_fisher": lambda: cv.metrics.EmpiricalFisher.from_space(space)}[name]()
    assert metric.loss_hessian == (name in ("ggn", "fisher"))
    g = torch.Generator().manual_seed(7)
    r, u = (torch.randn(theta.shape[0], generator=g, dtype=DT) for _ in range(2))
    form = metric.connection_form(theta, r)
    pot = jvp(lambda q: jvp(form.potential, (q,), (u,))[1], (theta,), (u,))[1]
    fast = form.remainder(u) + pot
    slow = Metric.connection_form(metric, theta, r).remainder(u)
    assert abs(float(fast - slow)) < 1e-12 * abs(float(slow))


def test_cheap_dense_factor_reaches_4096_coordinates():
    """Between DENSE_SOLVE_DIM (2048) and MAX_DENSE_DIM (4096) a damped GGN of an all-Linear
    MLP solves from one Cholesky factor of its cheap dense matrix (before: conjugate
    gradients for every right-hand side), and the solve is the dense float64 one; a conv net
    and a damping reference that depends on p keep the generic limit."""
    from covariant.metrics.base import DENSE_SOLVE_DIM, MAX_DENSE_DIM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 10)).double()
    X, y = torch.randn(64, 40, dtype=DT), torch.randint(0, 10, (64,))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y), "ggn")
    d = theta.shape[0]
    assert DENSE_SOLVE_DIM < d <= MAX_DENSE_DIM  # d = 2560
    G = cv.metrics.Damped(space.metric, 1e-3)
    assert G.dense_solve_dim(theta) == MAX_DENSE_DIM
    assert G.cholesky_factor(theta) is not None
    w = torch.randn(d, dtype=DT)
    dense = space.metric.dense(theta) + 1e-3 * torch.eye(d, dtype=DT)
    want = torch.linalg.solve(dense, w)
    assert torch.allclose(G.solve(theta, w), want, rtol=1e-10, atol=0)
    weights = cv.metrics.Diagonal(lambda p: 1.0 + p ** 2)  # a reference that depends on p
    assert cv.metrics.Damped(space.metric, 1e-3, weights).dense_solve_dim(theta) == \
        DENSE_SOLVE_DIM
    conv = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 60, 3), nn.Flatten(),
                         nn.Linear(60 * 38, 1)).double()
    cspace, ctheta = cv.ParameterSpace.from_module(conv, nn.MSELoss(),
                                                   (X, torch.randn(64, 1, dtype=DT)), "ggn")
    assert cspace.metric.dense_solve_dim(ctheta) == DENSE_SOLVE_DIM
