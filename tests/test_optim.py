"""covariant.optim: invariance orders of the updates, gradient flow, and RiemannianGD."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.utils import parametrize

import covariant as cv
from covariant.errors import NonFiniteError, SingularMetricError
from covariant.metrics import Constant, Dense, Euclidean, Metric
from covariant.optim import (
    RiemannianGD,
    fit_loglog_slope,
    gradient_flow,
    map_trajectory,
    riemannian_gd,
    step_size_sweep,
    trajectory_discrepancy,
)
from covariant.zoo.problems import ReferenceChart, reference_loss

THETA0 = torch.tensor([0.7, -0.4], dtype=torch.float64)


@pytest.fixture(scope="module")
def spaces():
    theta = cv.ParameterSpace(reference_loss)
    h = ReferenceChart()
    psi = theta.reparametrize(h)
    return theta, psi, h


# ------------------------------------------------------------------ the order of invariance
def test_slopes_of_the_step_size_sweep(spaces):
    _, psi, h = spaces
    p0 = h.inverse(THETA0)
    lrs, T = [0.04, 0.02, 0.01], 0.2
    plain = step_size_sweep(psi.with_metric(Euclidean()), p0, lrs, T)
    linear = step_size_sweep(psi, p0, lrs, T, update="linear")
    second = step_size_sweep(psi, p0, lrs, T, update="second_order")
    assert abs(plain.slope) < 0.3
    assert min(plain.discrepancies) > 1e-3  # plain GD in ψ does not converge to GD in θ
    assert 0.8 <= linear.slope <= 1.2
    assert second.slope >= 1.8
    # and the orders are really different at the smallest step
    assert second.discrepancies[-1] < 0.01 * linear.discrepancies[-1]
    assert linear.discrepancies[-1] < 0.01 * plain.discrepancies[-1]


def test_geodesic_steps_are_exactly_invariant(spaces):
    _, psi, h = spaces
    p0 = h.inverse(THETA0)
    geo = step_size_sweep(psi, p0, [0.1], 0.2, update="geodesic")
    lin = step_size_sweep(psi, p0, [0.1], 0.2, update="linear")
    assert geo.discrepancies[0] < 1e-6
    assert lin.discrepancies[0] > 1e-4


def test_second_order_step_is_the_geodesic_to_second_order(spaces):
    _, psi, h = spaces
    p0 = h.inverse(THETA0)
    r = psi.riemannian_grad(p0)
    gaps = []
    for lr in (0.02, 0.01):
        exact = psi.exp(p0, -r, t=lr)
        second = riemannian_gd(psi, p0, lr, 1, "second_order")[-1]
        gaps.append(float((second - exact).norm()))
    assert 6.0 < gaps[0] / gaps[1] < 10.0  # O(α³) per step


# ------------------------------------------------------------------ functional updates
def test_riemannian_gd_shape_and_linear_step():
    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    space = cv.ParameterSpace(lambda p: (p**2).sum() + p[0], Constant(G))
    p0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    traj = riemannian_gd(space, p0, 0.1, 3)
    assert traj.shape == (4, 2)
    g = 2 * p0 + torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(traj[1], p0 - 0.1 * torch.linalg.solve(G, g), atol=1e-14)
    # a constant metric has straight geodesics: all three updates coincide
    for update in ("second_order", "geodesic"):
        assert torch.allclose(riemannian_gd(space, p0, 0.1, 3, update), traj, atol=1e-12)


def test_riemannian_gd_reports_the_failing_step():
    space = cv.ParameterSpace(lambda p: (p**2).sum()).reparametrize(cv.reparam.Polar())
    with pytest.raises(cv.errors.DomainError, match="step 1 of 3"):
        riemannian_gd(space.with_metric(Euclidean()), torch.tensor([0.1, 0.0]), 5.0, 3)
    with pytest.raises(ValueError, match="update"):
        riemannian_gd(space, torch.tensor([1.0, 0.0]), 0.1, 1, update="cubic")
    with pytest.raises(ValueError, match="lr"):
        riemannian_gd(space, torch.tensor([1.0, 0.0]), -0.1, 1)


def test_gradient_flow_matches_the_closed_form():
    # L = ½ pᵀ A p, G = M constant: p(t) = expm(−t M⁻¹ A) p0
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    M = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    space = cv.ParameterSpace(lambda p: 0.5 * p @ A @ p, Constant(M))
    p0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    out = gradient_flow(space, p0, t)
    K = torch.linalg.solve(M, A)
    exact = torch.stack([torch.linalg.matrix_exp(-s * K) @ p0 for s in t])
    assert out.shape == (4, 2)
    assert torch.allclose(out, exact, atol=1e-9)
    assert torch.allclose(gradient_flow(space, p0, 0.0), p0[None])


def test_gradient_flow_is_invariant_across_charts(spaces):
    theta, psi, h = spaces
    t = [0.0, 0.2, 0.5]
    flow = gradient_flow(theta, THETA0, t)
    p0 = h.inverse(THETA0)
    mapped = map_trajectory(gradient_flow(psi, p0, t), h)
    assert trajectory_discrepancy(mapped, flow, at="max") < 1e-8
    naive = map_trajectory(gradient_flow(psi.with_metric(Euclidean()), p0, t), h)
    assert trajectory_discrepancy(naive, flow, at="max") > 1e-3
    # also through a second, different chart (polar coordinates)
    polar = theta.reparametrize(cv.reparam.Polar())
    mapped2 = map_trajectory(gradient_flow(polar, polar.chart.inverse(THETA0), t), polar)
    assert trajectory_discrepancy(mapped2, flow, at="max") < 1e-8


def test_trajectory_tools():
    assert fit_loglog_slope([1, 2, 4], [5, 10, 20])[0] == pytest.approx(1.0)
    assert math.isnan(fit_loglog_slope([1, 2], [0.0, 0.0])[0])
    a = torch.zeros(3, 2)
    b = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    assert trajectory_discrepancy(a, b) == 1.0
    assert trajectory_discrepancy(a, b, at="max") == 5.0
    with pytest.raises(cv.errors.ShapeMismatchError):
        trajectory_discrepancy(a, b[:2])
    assert torch.allclose(map_trajectory(b, lambda r: 2 * r), 2 * b)
    with pytest.raises(ValueError, match="integer"):
        step_size_sweep(cv.ParameterSpace(lambda p: (p**2).sum()), torch.ones(2), [0.3], 1.0)


# ------------------------------------------------------------------ RiemannianGD
def _data(n=48, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _mlp(seed=0, d=4, h=6, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))


def _train(model, opt, X, y, steps, closure=False):
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(steps):
        if closure:
            def closure_fn():
                opt.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                return loss

            losses.append(opt.step(closure_fn).item())
        else:
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
        {"momentum": 0.5, "dampening": 0.3, "maximize": True},
    ],
)
def test_euclidean_is_sgd(kw):
    X, y = _data()
    a, b = _mlp(), _mlp()
    groups_a = [{"params": a[0].parameters()}, {"params": a[2].parameters(), "lr": 0.05}]
    groups_b = [{"params": b[0].parameters()}, {"params": b[2].parameters(), "lr": 0.05}]
    _train(a, torch.optim.SGD(groups_a, lr=0.1, **kw), X, y, 4)
    _train(b, RiemannianGD(groups_b, lr=0.1, **kw), X, y, 4, closure=True)
    assert torch.equal(_flat(a), _flat(b))


def _dense_ggn(model, X, y):
    """J_fᵀ H J_f for the mean cross-entropy, dense, from torch.func (ground truth)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = _flat(model)

    def f(p):
        parts, start = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = p[start : start + s.numel()].reshape(s)
            start += s.numel()
        return functional_call(model, parts, (X,))

    J = jacrev(f)(theta)  # (N, C, d)
    s = torch.softmax(f(theta), -1)
    H = (torch.diag_embed(s) - s[:, :, None] * s[:, None, :]) / X.shape[0]
    return torch.einsum("ncd,nce,nef->df", J, H, J), theta


def test_natural_gradient_step_matches_dense_ggn():
    X, y = _data()
    model = _mlp()
    lam, lr = 1e-2, 0.5
    G, theta = _dense_ggn(model, X, y)
    loss = nn.CrossEntropyLoss()(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    expected = theta - lr * torch.linalg.solve(G + lam * torch.eye(len(theta)), g)
    opt = RiemannianGD(model.parameters(), lr, "ggn", model=model, loss_fn=nn.CrossEntropyLoss(),
                       data=(X, y), damping=lam, cg_tol=1e-12, cg_maxiter=500)
    _train(model, opt, X, y, 1)
    assert torch.allclose(_flat(model), expected, atol=1e-9)
    # a user-supplied Metric (the same dense GGN) gives the same step
    model2 = _mlp()
    opt2 = RiemannianGD(model2.parameters(), lr, Constant(G + lam * torch.eye(len(theta))))
    _train(model2, opt2, X, y, 1)
    assert torch.allclose(_flat(model2), expected, atol=1e-12)


def test_natural_gradient_with_batch_norm():
    """Batch norm: curvature without touching running statistics (eval: dense ground truth)."""
    X, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.train()
    model(X)  # some running statistics
    model.eval()
    G, theta = _dense_ggn(model, X, y)
    loss = nn.CrossEntropyLoss()(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    expected = theta - 0.5 * torch.linalg.solve(G + 1e-2 * torch.eye(len(theta)), g)
    opt = RiemannianGD(model.parameters(), 0.5, "ggn", model=model, loss_fn=nn.CrossEntropyLoss(),
                       data=(X, y), damping=1e-2, cg_tol=1e-12, cg_maxiter=500)
    _train(model, opt, X, y, 1)
    assert torch.allclose(_flat(model), expected, atol=1e-9)
    model.train()  # training mode: batch statistics, and the running ones still update
    before = model[1].running_mean.clone()
    losses = _train(model, opt, X, y, 3)
    assert losses[-1] < losses[0]
    assert not torch.equal(model[1].running_mean, before)


def test_ggn_trains_a_small_mlp():
    X, y = _data(n=64)
    model = _mlp()
    opt = RiemannianGD(model.parameters(), 0.3, "ggn", model=model,
                       loss_fn=nn.CrossEntropyLoss(), data=[(X[:32], y[:32]), (X[32:], y[32:])],
                       damping=1e-2)
    losses = _train(model, opt, X, y, 12)
    final = nn.CrossEntropyLoss()(model(X), y).item()
    assert final < 0.8 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert opt.last_solve["method"] == "cg"


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, omega):
        return self.s * omega

    def right_inverse(self, w):
        return w / self.s


def _scaled(model, scales):
    new = copy.deepcopy(model)
    for m, s in zip([new[0], new[2]], scales, strict=True):
        parametrize.register_parametrization(m, "weight", _Scale(s))
    return new


def _w(model):
    return torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach(),
                      model[2].weight.detach().reshape(-1), model[2].bias.detach()])


def test_ntk_and_standard_parametrization_agree_to_float64():
    """GD on Ω (W = s Ω, s = σ/√n) is GD on W with per-layer lr α s² (MATH.md §6)."""
    X, y = _data()
    base = _mlp()
    scales = [1 / math.sqrt(4), 1 / math.sqrt(6)]
    ntk = _scaled(base, scales)
    std = copy.deepcopy(base)
    lr = 0.3
    groups = [{"params": [std[0].weight], "lr": lr * scales[0] ** 2},
              {"params": [std[2].weight], "lr": lr * scales[1] ** 2},
              {"params": [std[0].bias, std[2].bias]}]
    same = copy.deepcopy(base)
    for _ in range(5):
        _train(ntk, torch.optim.SGD(ntk.parameters(), lr), X, y, 1)
        _train(std, torch.optim.SGD(groups, lr), X, y, 1)
        _train(same, torch.optim.SGD(same.parameters(), lr), X, y, 1)
        assert (_w(ntk) - _w(std)).abs().max() < 1e-10
    assert (_w(ntk) - _w(same)).abs().max() > 1e-3  # the same lr is a different optimizer


def test_natural_gradient_is_exactly_invariant_under_a_linear_chart():
    X, y = _data()
    base = _mlp()
    scaled = _scaled(base, [10.0, 0.1])
    plain = copy.deepcopy(base)
    kw = dict(loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-2, cg_tol=1e-10,
              cg_maxiter=500)
    _train(plain, RiemannianGD(plain.parameters(), 0.3, "ggn", model=plain, **kw), X, y, 3)
    _train(scaled, RiemannianGD(scaled.parameters(), 0.3, "ggn", model=scaled, **kw), X, y, 3)
    assert (_w(plain) - _w(scaled)).abs().max() < 1e-8
    adam_a, adam_b = copy.deepcopy(base), _scaled(base, [10.0, 0.1])
    _train(adam_a, torch.optim.Adam(adam_a.parameters(), 1e-3), X, y, 3)
    _train(adam_b, torch.optim.Adam(adam_b.parameters(), 1e-3), X, y, 3)
    assert (_w(adam_a) - _w(adam_b)).abs().max() > 1e-3


def test_weight_norm_chart_first_order_and_natural_gradient():
    """torch's weight_norm (no forward-mode AD) through the pulled-back metrics."""
    from torch.nn.utils.parametrizations import weight_norm

    X, y = _data()
    base = _mlp()

    def wn():
        m = copy.deepcopy(base)
        weight_norm(m[0])
        weight_norm(m[2])
        return m

    gaps = []
    for lr in (0.2, 0.1):
        steps = round(1.0 / lr)
        a, b, c = copy.deepcopy(base), wn(), wn()
        _train(a, torch.optim.SGD(a.parameters(), lr), X, y, steps)
        _train(b, RiemannianGD(b.parameters(), lr, "weights", model=b, cg_tol=1e-12), X, y,
               steps)
        _train(c, torch.optim.SGD(c.parameters(), lr), X, y, steps)
        gaps.append((float((_w(a) - _w(b)).norm()), float((_w(a) - _w(c)).norm())))
    assert 1.7 < gaps[0][0] / gaps[1][0] < 2.3  # Riemannian GD in (g, v): first order
    assert gaps[1][1] > 3 * gaps[1][0]  # plain GD in (g, v) is further off and stays off

    kw = dict(loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-2, cg_tol=1e-10,
              cg_maxiter=500)
    a, b = copy.deepcopy(base), wn()
    _train(a, RiemannianGD(a.parameters(), 0.05, "ggn", model=a, **kw), X, y, 2)
    _train(b, RiemannianGD(b.parameters(), 0.05, "ggn", model=b, **kw), X, y, 2)
    moved = float((_w(a) - _w(base)).norm())
    assert float((_w(a) - _w(b)).norm()) < 0.05 * moved
    assert "parametrizations" in dict(b.named_modules())["0"]._modules  # model untouched


def test_state_dict_round_trip_resumes_identically():
    X, y = _data(n=60)
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]

    def make(model):
        return RiemannianGD(model.parameters(), 0.3, "ggn", model=model,
                            loss_fn=nn.CrossEntropyLoss(), data=batches, damping=1e-2,
                            momentum=0.5)

    model = _mlp()
    opt = make(model)
    _train(model, opt, X, y, 4)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert saved_opt["covariant"]["batches_drawn"] == 4
    _train(model, opt, X, y, 3)

    resumed = _mlp(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, X, y, 3)
    assert torch.equal(_flat(model), _flat(resumed))

    fresh = _mlp(seed=1)  # without the optimizer state the trajectory differs
    fresh.load_state_dict(saved_model)
    _train(fresh, make(fresh), X, y, 3)
    assert not torch.equal(_flat(model), _flat(fresh))


# ------------------------------------------------------------------ bad input
def test_metric_name_without_model_loss_or_data():
    model = _mlp()
    with pytest.raises(ValueError, match="missing: loss_fn, data"):
        RiemannianGD(model.parameters(), 0.1, "ggn", model=model)
    with pytest.raises(ValueError, match="missing: model, loss_fn, data"):
        RiemannianGD(model.parameters(), 0.1, "fisher")
    with pytest.raises(ValueError, match="missing: model"):
        RiemannianGD(model.parameters(), 0.1, "weights")
    with pytest.raises(ValueError, match="unknown metric"):
        RiemannianGD(model.parameters(), 0.1, "natural")
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        RiemannianGD(_mlp().parameters(), 0.1, "weights", model=model)
    with pytest.raises(ValueError, match="learning rate"):
        RiemannianGD(model.parameters(), -1.0)
    with pytest.raises(ValueError, match="damping"):
        RiemannianGD(model.parameters(), 0.1, damping=-1.0)


class _Projection(Metric):
    """A singular metric: the projection onto the first coordinate."""

    def matvec(self, p, v):
        out = torch.zeros_like(v)
        out[0] = v[0]
        return out


def test_singular_metric_without_damping_raises():
    X, y = _data()
    for metric in (Dense(lambda p: torch.zeros(len(p), len(p), dtype=p.dtype)), _Projection()):
        model = _mlp()
        opt = RiemannianGD(model.parameters(), 0.1, metric)
        with pytest.raises(SingularMetricError, match="damp"):
            _train(model, opt, X, y, 1)
        model = _mlp()  # damping fixes it
        _train(model, RiemannianGD(model.parameters(), 0.1, metric, damping=1.0), X, y, 1)
        assert torch.isfinite(_flat(model)).all()


def test_non_finite_gradient_raises():
    model = _mlp()
    opt = RiemannianGD(model.parameters(), 0.1, "weights", model=model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2\.bias"):
        opt.step()
    opt2 = RiemannianGD(model.parameters(), 0.1)
    with pytest.raises(NonFiniteError, match="NaN"):
        opt2.step()


def test_exhausted_data_iterator():
    X, y = _data()
    model = _mlp()
    opt = RiemannianGD(model.parameters(), 0.1, "ggn", model=model,
                       loss_fn=nn.CrossEntropyLoss(), data=iter([(X, y)]), damping=1e-2)
    _train(model, opt, X, y, 1)
    with pytest.raises(ValueError, match="exhausted"):
        _train(model, opt, X, y, 1)
