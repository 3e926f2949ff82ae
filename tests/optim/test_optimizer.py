"""covariant.optim.optimizer: RiemannianGD against SGD, dense natural-gradient steps, and its
invariance under torch.nn.utils.parametrize charts."""

from __future__ import annotations

import copy
import doctest
import importlib
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.utils import parametrize

from covariant.errors import NonFiniteError, SingularMetricError
from covariant.metrics import Constant, Dense, Metric
from covariant.optim import RiemannianGD

from ._helpers import ElementScale


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


def _scaled(model, scales):
    new = copy.deepcopy(model)
    for m, s in zip([new[0], new[2]], scales, strict=True):
        parametrize.register_parametrization(m, "weight", ElementScale(s))
    return new


def _w(model):
    return torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach(),
                      model[2].weight.detach().reshape(-1), model[2].bias.detach()])


def test_ntk_and_standard_parametrization_agree_to_float64():
    """GD on Ω (W = s Ω, s = σ/√n) is GD on W with per-layer lr α s² (docs/math.md §6)."""
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


# ------------------------------------------------------------------ function-space invariance
def _outputs(model, X, opt, y, steps):
    """f(X) before and after each of ``steps`` optimizer steps."""
    loss_fn = nn.CrossEntropyLoss()
    outs = [model(X).detach()]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        outs.append(model(X).detach())
    return torch.stack(outs)


def test_natural_gradient_function_space_trajectory_is_chart_free():
    """The same network through a parametrize chart: natural-gradient RiemannianGD gives the
    same outputs f(X) at every step (to 1e-8 in float64), torch.optim.SGD does not."""
    X, y = _data()
    base = _mlp()
    g = torch.Generator().manual_seed(3)
    charted = copy.deepcopy(base)
    for m in (charted[0], charted[2]):
        s = torch.exp(2 * torch.rand(m.weight.shape, generator=g) - 1)  # in [e⁻¹, e]
        parametrize.register_parametrization(m, "weight", ElementScale(s))
    plain = copy.deepcopy(base)
    assert torch.allclose(charted(X), plain(X), atol=1e-14)
    kw = dict(loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-2, cg_tol=1e-12,
              cg_maxiter=500)
    ngd_plain = _outputs(plain, X, RiemannianGD(plain.parameters(), 0.5, "ggn", model=plain,
                                                **kw), y, 4)
    ngd_chart = _outputs(charted, X, RiemannianGD(charted.parameters(), 0.5, "ggn",
                                                  model=charted, **kw), y, 4)
    assert (ngd_plain - ngd_chart).abs().max() < 1e-8
    assert (ngd_plain[-1] - ngd_plain[0]).abs().max() > 0.1  # and the outputs did move

    sgd_a, sgd_b = copy.deepcopy(base), copy.deepcopy(charted)
    out_a = _outputs(sgd_a, X, torch.optim.SGD(sgd_a.parameters(), 0.5), y, 4)
    out_b = _outputs(sgd_b, X, torch.optim.SGD(sgd_b.parameters(), 0.5), y, 4)
    assert (out_a - out_b).abs().max() > 1e-2


def test_subset_of_parameters_in_any_order_matches_the_dense_restriction():
    """Parameters in another order, some frozen out: the metric is G restricted to them."""
    X, y = _data()
    model = _mlp()
    G, theta = _dense_ggn(model, X, y)
    names = [n for n, _ in model.named_parameters()]
    order = ["2.weight", "0.bias"]
    slices, start = {}, 0
    for n, p in model.named_parameters():
        slices[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    idx = torch.cat([slices[n] for n in order])
    named = dict(model.named_parameters())
    loss = nn.CrossEntropyLoss()(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, [named[n] for n in order])])
    step = torch.linalg.solve(G[idx][:, idx] + 1e-2 * torch.eye(len(idx)), g)
    expected = theta.clone()
    expected[idx] -= 0.5 * step
    opt = RiemannianGD([named[n] for n in order], 0.5, "ggn", model=model,
                       loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-2, cg_tol=1e-12,
                       cg_maxiter=500)
    _train(model, opt, X, y, 1)
    assert torch.allclose(_flat(model), expected, atol=1e-9)
    assert set(names) == set(named)


# ------------------------------------------------------------------ diagnostics and side effects
def test_info_reports_the_solve_and_last_solve_is_its_alias():
    X, y = _data()
    model = _mlp()
    opt = RiemannianGD(model.parameters(), 0.1, "ggn", model=model,
                       loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-2)
    _train(model, opt, X, y, 1)
    assert opt.info["method"] == "cg" and opt.info["converged"]
    assert opt.info["iterations"] > 0 and opt.info["residual"] >= 0
    assert opt.last_solve is opt.info
    sgd = RiemannianGD(model.parameters(), 0.1, "weights", model=model)
    _train(model, sgd, X, y, 1)
    assert sgd.info == {"method": "identity"}


def test_truncated_solve_warns_once_at_the_callers_line():
    X, y = _data()
    model = _mlp()
    opt = RiemannianGD(model.parameters(), 0.1, "ggn", model=model,
                       loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-3, cg_maxiter=2)
    with pytest.warns(RuntimeWarning, match="truncated") as record:
        _train(model, opt, X, y, 2)
    assert len(record) == 1
    assert record[0].filename == __file__
    assert not opt.info["converged"]


def test_steps_leave_the_global_random_state_alone():
    """Building the charts of a parametrized model draws probes; the user's stream is kept."""
    from torch.nn.utils.parametrizations import weight_norm

    X, y = _data()
    model = _mlp()
    weight_norm(model[0])
    opt = RiemannianGD(model.parameters(), 0.1, "ggn", model=model,
                       loss_fn=nn.CrossEntropyLoss(), data=(X, y), damping=1e-2)
    torch.manual_seed(123)
    _train(model, opt, X, y, 2)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize("name", ["covariant.optim.optimizer", "covariant.optim._model_view",
                                  "covariant.optim._data"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # examples are written for torch's default dtype
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0 and result.failed == 0
