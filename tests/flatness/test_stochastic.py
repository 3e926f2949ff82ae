"""covariant.flatness.stochastic: estimates vs dense truth, error bars, invariance at MLP scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import covariant as cv
from covariant.errors import NotConvergedError
from covariant.reparam import Sinh

from ..test_rules import theta_metric


def _mlp_space(seed=0, hidden=6, n=64, wd=1e-2, train_steps=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    X = torch.randn(n, 5, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=wd)
        for _ in range(train_steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    data, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    space = cv.ParameterSpace(lambda p: data._loss(p) + 0.5 * wd * (p**2).sum(),
                              layout=data.layout)
    return space, theta


def _within(est, truth, n_se=3.0):
    return abs(est.value - truth) <= n_se * est.stderr + 1e-12


@pytest.mark.parametrize("chart", ["none", "weightnorm", "exp_metric"])
def test_stochastic_vs_dense(chart):
    space, theta = _mlp_space()
    p = theta
    if chart == "weightnorm":
        space = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
        p = space.chart.inverse(theta)
        p = p + 0.0  # same point
    elif chart == "exp_metric":
        # a point-dependent metric, so the connection term is live in both paths
        G = cv.metrics.Diagonal(lambda q: torch.exp(0.3 * q))
        space = space.with_metric(G)
    dense = cv.flatness(space, p, measures=("trace", "logdet", "max_eig", "top_eigs"), k=3)
    # in_chart=True: every product through this chart's Hessian and metric (the generic path;
    # the default computes a pulled-back space's measures in its parent chart)
    st = cv.flatness(space, p, measures=("trace", "logdet", "max_eig", "top_eigs"), k=3,
                     method="stochastic", num_probes=120, seed=1, slq_probes=12, slq_steps=25,
                     in_chart=True)
    assert _within(st["trace"], dense["trace"].value)
    assert st["trace"].stderr < 0.1 * abs(dense["trace"].value)  # the error bar is informative
    assert _within(st["logdet"], dense["logdet"].value)
    assert st["max_eig"].converged
    # eigenvalues carry a Lanczos residual, not a standard error
    assert st["max_eig"].stderr is None and 0 <= st["max_eig"].residual < 1e-6
    assert st["max_eig"].residual == st["max_eig"].info["residuals"][0]
    assert st["max_eig"].value == pytest.approx(dense["max_eig"].value, rel=1e-6)
    assert st["top_eigs"].value == pytest.approx(dense["top_eigs"].value, rel=1e-6)
    assert st["trace"].num_matvecs == 120


def test_error_shrinks_with_probes():
    space, theta = _mlp_space(1)
    truth = cv.flatness(space, theta, measures=("trace",))["trace"].value
    errs = {}
    for n in (8, 128):
        errs[n] = sum(
            abs(cv.flatness(space, theta, measures=("trace",), method="stochastic",
                            num_probes=n, seed=s)["trace"].value - truth)
            for s in range(6)
        ) / 6
    assert errs[128] < errs[8] / 2


def test_curved_metric_lanczos_matches_generalized_eigh():
    from ..conftest import reference_loss

    space = cv.ParameterSpace(reference_loss, theta_metric())
    p = torch.tensor([0.7, -0.4])
    st = cv.flatness(space, p, measures=("max_eig", "min_eig"), method="stochastic")
    evals = torch.linalg.eigvals(space.shape_operator(p)).real.sort().values
    assert st["max_eig"].value == pytest.approx(float(evals[-1]), rel=1e-6)
    assert st["min_eig"].value == pytest.approx(float(evals[0]), rel=1e-6)


def _mnist1d_mlp_space(wd=1e-2):
    """A small MLP trained on generated MNIST-1D (the issue's setting), with weight decay."""
    from covariant.zoo.data import load_mnist1d

    ds = load_mnist1d(num_samples=400, seed=0, dtype=torch.float64)
    X, y = ds.X_train[:96], ds.y_train[:96]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=wd)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ds.X_train), ds.y_train).backward()
        opt.step()
    data, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    space = cv.ParameterSpace(lambda p: data._loss(p) + 0.5 * wd * (p**2).sum(),
                              layout=data.layout)
    return space, theta


def test_weight_norm_invariant_naive_not_at_three_scales():
    space, theta = _mnist1d_mlp_space()
    wn = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    base = wn.chart.inverse(theta)
    ref = cv.flatness(space, theta, measures=("trace", "logdet", "max_eig"),
                      method="stochastic", num_probes=100, seed=0, slq_probes=10, slq_steps=20)
    naive = {}
    for s in (0.1, 1.0, 10.0):
        psi = base.clone()
        for name, block in wn.chart.blocks.items():
            sl = wn.chart.psi_slices[name]
            psi[sl.start + block.num_slices : sl.stop] *= s
        inv = cv.flatness(wn, psi, measures=("trace", "logdet", "max_eig"), in_chart=True,
                          method="stochastic", num_probes=100, seed=0, slq_probes=10, slq_steps=20)
        for m in ("trace", "logdet"):
            se = math.hypot(inv[m].stderr, ref[m].stderr)
            assert abs(inv[m].value - ref[m].value) <= 3 * se, (s, m)
        assert inv["max_eig"].value == pytest.approx(ref["max_eig"].value, rel=1e-5)
        nv = cv.flatness(wn.with_metric(cv.metrics.Euclidean()), psi,
                         measures=("trace", "logdet", "max_eig"), method="stochastic",
                         num_probes=100, seed=0, slq_probes=10, slq_steps=20)
        naive[s] = nv
    for m in ("trace", "max_eig"):
        vals = [abs(naive[s][m].value) for s in naive]
        assert max(vals) / min(vals) >= 10, m
    logdets = [naive[s]["logdet"].value for s in naive]
    assert max(logdets) - min(logdets) >= math.log(10)


def test_not_converged_is_reported_and_can_raise():
    space, theta = _mlp_space(3)
    r = cv.flatness(space, theta, measures=("top_eigs",), k=5, method="stochastic",
                    lanczos_steps=12, max_restarts=0)
    assert r["top_eigs"].converged is False
    with pytest.raises(NotConvergedError, match="lanczos_steps"):
        cv.flatness(space, theta, measures=("top_eigs",), k=5, method="stochastic",
                    lanczos_steps=12, max_restarts=0, require_convergence=True)


def test_unknown_measure_and_singular_metric():
    space, theta = _mlp_space()
    with pytest.raises(ValueError, match="spectrum"):
        cv.flatness(space, theta, measures=("spectrum",), method="stochastic")
    singular = space.with_metric(cv.metrics.Dense(lambda q: torch.outer(q, q)))
    with pytest.raises(cv.errors.SingularMetricError, match="Damped"):
        cv.flatness(singular, theta, measures=("trace",), method="stochastic")


@pytest.mark.parametrize("chart", ["weightnorm", "exp_then_scale"])
def test_pulled_back_space_in_parent_chart_equals_the_chart_computation(chart):
    # The default computes a pulled-back space's measures in the parent chart (tensor rule);
    # it must agree with the generic in-chart computation, probe for probe, and its lifted
    # eigenvectors must solve the generalized eigenproblem Hess_Ψ x = λ G_Ψ x in this chart.
    space, theta = _mlp_space()
    if chart == "weightnorm":
        wn = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    else:  # a chain of two charts: the measures come from the root
        wn = space.reparametrize({"*.bias": Sinh(a=0.7, s=1.3, c=0.1)}).reparametrize(
            cv.reparam.Scale(0.5))
    psi = wn.root_chart().inverse(theta) if chart != "weightnorm" else wn.chart.inverse(theta)
    kw = {"measures": ("trace", "logdet", "max_eig", "top_eigs"), "k": 3,
          "method": "stochastic", "num_probes": 60, "seed": 2, "slq_probes": 6,
          "slq_steps": 20}
    fast, slow = cv.flatness(wn, psi, **kw), cv.flatness(wn, psi, in_chart=True, **kw)
    assert "computed_in" in fast["trace"].info and "computed_in" not in slow["trace"].info
    for m in ("trace", "logdet"):
        if chart == "weightnorm":  # horizontal coordinates u = J v: the very same probes
            assert fast[m].value == pytest.approx(slow[m].value, rel=1e-9), m
        else:  # a bijection: probes in ψ are other probes, same expectation
            se = math.hypot(fast[m].stderr, slow[m].stderr)
            assert abs(fast[m].value - slow[m].value) <= 3 * se, m
            assert fast[m].value != slow[m].value
    assert fast["top_eigs"].value == pytest.approx(slow["top_eigs"].value, rel=1e-8)
    for key in ("dim", "rank", "num_gauge_directions"):
        assert fast["trace"].info[key] == slow["trace"].info[key], key
    H = wn.hessian(psi, method="general")
    G = wn.metric.dense(psi)
    for lam, x in zip(fast["top_eigs"].value, fast["top_eigs"].vectors.T, strict=True):
        resid = H @ x - lam * (G @ x)
        assert float(resid.norm()) <= 1e-7 * float((H @ x).norm()), lam


def test_default_stochastic_call_below_five_dimensions_caps_k():
    """top_eigs defaults to k=5; on d = 3 it returns the 3 eigenvalues and records the cap."""
    space = cv.ParameterSpace(lambda p: (torch.arange(1.0, 4.0, dtype=p.dtype) * p**2).sum())
    p = torch.ones(3, dtype=torch.float64)
    r = cv.flatness(space, p, method="stochastic", num_probes=20, seed=0)
    m = r["top_eigs"]
    assert m.value == pytest.approx([6.0, 4.0, 2.0], abs=1e-8)
    assert (m.info["k_requested"], m.info["k"]) == (5, 3)
    assert m.vectors.shape == (3, 3)
    assert r["max_eig"].value == pytest.approx(6.0, abs=1e-8)


def test_slq_with_a_data_dependent_metric_runs_its_probes_as_one_block(monkeypatch):
    """The SLQ probes of E = G⁻¹Hess (damped GGN) run in lockstep: vmapped Riemannian HVPs and
    one block solve per step. Same probes, same recurrences: the log-determinant equals the
    per-probe run to rounding, with the same product count; and the block path was taken."""
    from torch import nn

    from covariant.flatness import stochastic as st

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    data = (torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,)))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    damped = space.with_metric(cv.metrics.Damped(space.metric, 1e-2))
    opts = {"measures": ("logdet",), "method": "stochastic", "seed": 3, "slq_probes": 4,
            "slq_steps": 12}
    widths: list[int] = []
    real = st._ShapeOperator.matmat

    def spy(self, V):
        widths.append(V.shape[1])
        return real(self, V)

    monkeypatch.setattr(st._ShapeOperator, "matmat", spy)
    block = cv.flatness(damped, theta, **opts)["logdet"]
    assert widths and set(widths) == {4}                  # four probes per product
    monkeypatch.setattr(st._Counter, "block", lambda self: None)
    single = cv.flatness(damped, theta, **opts)["logdet"]
    assert block.num_matvecs == single.num_matvecs == 4 * 12
    assert abs(block.value - single.value) < 1e-12 * abs(single.value)
    assert abs(block.stderr - single.stderr) < 1e-10 * single.stderr
