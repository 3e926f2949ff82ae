"""covariant.invariance: check_invariance, and the Taylor-slope diagnostics (check_gradient,
check_hessian, check_chart, check_metric) on every built-in chart and metric, and on wrong
derivatives that they must catch."""

from __future__ import annotations

import doctest
import json

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import metrics, reparam
from covariant.invariance import (
    CheckResult,
    check_chart,
    check_gradient,
    check_hessian,
    check_invariance,
    check_metric,
    random_charts,
)
from covariant.metrics import GGN, AdamMetric, EmpiricalFisher, Fisher

F64 = torch.float64


def _t(*x):
    return torch.tensor(x, dtype=F64)


# ------------------------------------------------------------------ check_invariance
def test_check_invariance_tells_invariant_from_naive_measures():
    space = cv.ParameterSpace(lambda p: (p**4).sum() + p[0] * p[1] + p[2].exp())
    p = _t(0.3, -0.5, 0.2)

    def trace(s, q):
        return cv.flatness(s, q, measures=("trace",))["trace"].value

    def naive(s, q):
        return cv.flatness(s.with_metric(metrics.Euclidean()), q,
                           measures=("trace",))["trace"].value

    good = check_invariance(trace, space, p)
    assert good.passed and good.max_rel_deviation < 1e-8 and len(good.values) == 4
    bad = check_invariance(naive, space, p)
    assert not bad.passed and bad.max_rel_deviation > 1e-2
    json.dumps(good.to_dict())


def test_check_invariance_with_given_charts_and_shape_mismatch():
    space = cv.ParameterSpace(lambda p: (p**2).sum())
    p = _t(0.5, 1.5)
    report = check_invariance(lambda s, q: s.grad(q), space, p, [reparam.Exp()])
    assert not report.passed  # a covector's components change with the chart
    assert check_invariance(lambda s, q: q.shape[0] * [1.0], space, p, [reparam.Exp()]).passed
    wn = check_invariance(lambda s, q: q, space, _t(0.5, 1.5),
                          [reparam.WeightNorm((1, 2))])
    assert wn.max_rel_deviation == float("inf") and not wn.passed


def test_random_charts_cycle_through_affine_sinh_and_compose():
    charts = random_charts(3, 4, seed=1)
    assert [type(h).__name__ for h in charts] == ["Affine", "Sinh", "Compose", "Affine"]
    for h in charts:  # and each is a chart whose derivatives check out
        assert check_chart(h, _t(0.1, -0.4, 0.7)).passed


# ------------------------------------------------------------------ every built-in chart
class _Square(nn.Module):
    def forward(self, x):
        return x * x.abs()

    def right_inverse(self, w):
        return w.sign() * w.abs().sqrt()


def _module_space():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(10, 3, dtype=F64)
    y = torch.randint(0, 2, (10,))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    return space, theta, model


def _charts():
    from torch.distributions.transforms import ExpTransform

    gen = torch.Generator().manual_seed(2)
    A = torch.randn(3, 3, generator=gen, dtype=F64) + 3 * torch.eye(3, dtype=F64)
    theta = _t(0.7, 1.3, 0.4)
    space, theta_model, _ = _module_space()
    blocks = space.reparametrize({"0.weight": reparam.WeightNorm(), "*.bias": reparam.Exp(),
                                  "2.weight": reparam.Scale(2.0)}).chart
    return {
        "Identity": (reparam.Identity(), theta),
        "Exp": (reparam.Exp(), theta),
        "Log": (reparam.Log(), theta),
        "Softplus": (reparam.Softplus(), theta),
        "Scale": (reparam.Scale(_t(2.0, -0.5, 3.0)), theta),
        "Affine": (reparam.Affine(A, _t(0.1, 0.2, 0.3)), theta),
        "Polar": (reparam.Polar(), _t(1.2, 0.4)),
        "Sinh": (reparam.Sinh(0.8), theta),
        "Cubic": (reparam.Cubic(0.5), theta),
        "WeightNorm": (reparam.WeightNorm((2, 3)), torch.linspace(0.3, 1.7, 8, dtype=F64)),
        "WeightNorm-dim1": (reparam.WeightNorm((2, 3), dim=1),
                            torch.linspace(0.3, 1.7, 9, dtype=F64)),
        "Compose": (reparam.Compose(reparam.Affine(A), reparam.Softplus()), theta),
        "FromFunctions": (reparam.FromFunctions(torch.sinh, torch.asinh), theta),
        "from_parametrization": (reparam.from_parametrization(_Square(), shape=(3,)), theta),
        "from_transform": (reparam.from_transform(ExpTransform()), theta),
        "blocks-by-name": (blocks, blocks.inverse(theta_model.abs() + 0.1)),  # Exp: θ > 0
    }


def test_every_chart_class_of_covariant_reparam_is_covered():
    covered = {type(h).__name__ for h, _ in _charts().values()}
    public = {name for name in reparam.__all__ if isinstance(getattr(reparam, name), type)}
    abstract = {"Elementwise", "Linearization", "Reparametrization"}
    assert public - abstract <= covered


@pytest.mark.parametrize("name", list(_charts()))
def test_check_chart_passes_on_every_built_in_chart(name):
    h, psi = _charts()[name]
    r = check_chart(h, psi)
    assert r.passed, r.to_dict()
    if h.is_affine:  # the first-order model is exact: every error is round-off
        assert r.slope is None and r.info["exact"]
    else:
        assert r.slope == pytest.approx(2.0, abs=0.1)
    assert {"adjoint", "right_inverse", "section"} <= set(r.info)


def test_check_chart_fails_on_a_wrong_jvp():
    class WrongJvp(reparam.Polar):
        def jvp(self, psi, v):  # forgets the r in ∂θ/∂φ
            r, phi = psi
            return torch.stack([torch.cos(phi) * v[0] - torch.sin(phi) * v[1],
                                torch.sin(phi) * v[0] + torch.cos(phi) * v[1]])

    r = check_chart(WrongJvp(), _t(2.0, 0.4))
    assert not r.passed and r.slope == pytest.approx(1.0, abs=0.1)

    class WrongVjp(reparam.Softplus):
        def vjp(self, psi, w):
            return 1.5 * super().vjp(psi, w)

    r = check_chart(WrongVjp(), _t(0.2, 0.4))
    assert r.slope == pytest.approx(2.0, abs=0.1)  # the jvp is right ...
    assert not r.passed and r.info["adjoint"]["residual"] > 0.1  # ... its transpose is not


# ------------------------------------------------------------------ gradient and Hessian
def test_check_gradient_and_hessian_pass_on_spaces_and_losses():
    space, theta, _ = _module_space()
    for target in (space, space.reparametrize({"*.weight": reparam.WeightNorm()})):
        p = theta if target is space else target.chart.inverse(theta)
        g = check_gradient(target, p)
        assert g.passed and g.slope == pytest.approx(2.0, abs=0.1), g.to_dict()
        h = check_hessian(target, p)
        assert h.passed and h.slope == pytest.approx(3.0, abs=0.1), h.to_dict()
        assert h.info["symmetry"]["residual"] < 1e-10


def test_exact_models_pass_without_a_slope():
    linear = check_gradient(lambda p: 3 * p.sum(), _t(0.1, 0.2))
    assert linear.passed and linear.slope is None and linear.info["exact"]
    quadratic = check_hessian(lambda p: (p**2).sum() + p[0] * p[1], _t(0.1, 0.2))
    assert quadratic.passed and quadratic.slope is None and quadratic.info["exact"]


def test_check_gradient_fails_on_a_wrong_gradient():
    space = cv.ParameterSpace(lambda p: (p.sin() * p.roll(1)).sum() + (p**4).sum())
    p = _t(0.3, -0.7, 1.1)
    r = check_gradient(space, p, grad=lambda q: space.grad(q) * 1.001)
    assert not r.passed and r.slope == pytest.approx(1.0, abs=0.1)


def test_check_hessian_fails_on_a_wrong_product():
    space = cv.ParameterSpace(lambda p: (p.sin() * p.roll(1)).sum() + (p**4).sum())
    p = _t(0.3, -0.7, 1.1)
    r = check_hessian(space, p, hvp=lambda q, v: 1.01 * space.hvp(q, v, riemannian=False))
    assert not r.passed and r.slope == pytest.approx(2.0, abs=0.1)
    H = torch.func.hessian(space.loss_function)(p)
    skew = _t(0.0, 1.0, 0.0).outer(_t(1.0, 0.0, 0.0))
    r = check_hessian(space, p, hvp=lambda q, v: (H + 1e-3 * (skew - skew.T)) @ v)
    assert not r.passed and r.info["symmetry"]["residual"] > 1e-6


def test_result_to_dict_and_plot(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    import matplotlib

    matplotlib.use("Agg")
    r = check_gradient(lambda p: p.exp().sum(), _t(0.2, 0.1))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["name"] == "gradient" and d["passed"] and len(d["steps"]) == len(d["errors"]) == 33
    assert isinstance(r, CheckResult)
    ax = r.plot()
    ax.figure.savefig(tmp_path / "slope.png")
    plt.close(ax.figure)
    assert (tmp_path / "slope.png").stat().st_size > 0


# ------------------------------------------------------------------ every built-in metric
def _metrics():
    gen = torch.Generator().manual_seed(4)
    M = torch.randn(3, 3, generator=gen, dtype=F64)
    spd = M @ M.T + 0.5 * torch.eye(3, dtype=F64)
    dense = metrics.Dense(lambda q: spd + torch.outer(q, q))
    p = _t(0.4, -0.3, 0.8)
    return {
        "Euclidean": (metrics.Euclidean(), p),
        "Constant": (metrics.Constant(spd), p),
        "Diagonal": (metrics.Diagonal(lambda q: q**2 + 0.5), p),
        "Dense": (dense, p),
        "Damped": (metrics.Damped(dense, 0.1, reference=metrics.Euclidean()), p),
        "Pullback": (metrics.Pullback(dense, reparam.Softplus()), p),
        "Pullback-submersion": (metrics.Pullback(metrics.Constant(spd),
                                                 reparam.WeightNorm((1, 3))),
                                _t(1.5, 0.3, -0.4, 0.8)),
    }


@pytest.mark.parametrize("name", list(_metrics()))
def test_check_metric_passes_on_every_built_in_metric(name):
    G, p = _metrics()[name]
    r = check_metric(G, p)
    assert r.passed and r.slope is None, r.to_dict()


def _model_metrics():
    space, theta, model = _module_space()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        space.loss(torch.cat([q.flatten() for q in model.parameters()])).backward()
        opt.step()
    return space, theta, {
        "GGN": GGN.from_space(space), "Fisher": Fisher.from_space(space),
        "EmpiricalFisher": EmpiricalFisher.from_space(space), "AdamMetric": AdamMetric(opt),
    }


def test_check_metric_passes_on_the_model_metrics():
    space, theta, found = _model_metrics()
    for name, G in found.items():
        r = check_metric(G, theta, rtol=1e-6)
        assert r.passed, (name, r.to_dict())
        damped = metrics.Damped(G, 1e-3, reference=metrics.Euclidean())
        assert check_metric(damped, theta, rtol=1e-6).passed, name
    # in a weight-norm chart: the pulled-back GGN is singular along the gauge directions
    wn = space.with_metric(found["GGN"]).reparametrize({"*.weight": reparam.WeightNorm()})
    psi = wn.chart.inverse(theta)
    assert check_metric(wn.metric, psi, rtol=1e-6).passed


def test_check_metric_fails_on_an_indefinite_or_inconsistent_metric():
    p = _t(0.4, -0.3)
    indefinite = metrics.Dense(lambda q: torch.diag(_t(1.0, -1.0)))
    r = check_metric(indefinite, p, num_vectors=5)
    assert not r.passed and r.info["positivity"]["residual"] > 0.1
    assert r.info["solve"]["residual"] == float("inf") and "solve_error" in r.info

    class BadSolve(metrics.Diagonal):
        def solve(self, q, w):
            return w

    r = check_metric(BadSolve(lambda q: q**2 + 1), p)
    assert not r.passed and r.info["solve"]["residual"] > 0.1


# ------------------------------------------------------------------ docs
def test_docstring_examples_of_the_diagnostics():
    import covariant.diagnostics

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        result = doctest.testmod(covariant.diagnostics, optionflags=doctest.ELLIPSIS)
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0 and result.failed == 0
