"""covariant.flatness.nulls: numerically null eigenvalues and singular metrics, one definition
for the dense and the stochastic method, checked against dense float64 ground truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import covariant as cv
from covariant.errors import SingularMetricError
from covariant.flatness.nulls import pseudo_log_determinant
from covariant.reparam import Sinh

HIDDEN = 4  # the softmax shift symmetry: HIDDEN + 1 null directions of the last layer


@pytest.fixture(scope="module")
def softmax_classifier():
    """A trained 3-4-3 tanh classifier (31 parameters), cross-entropy, no weight decay."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 3)).double()
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))


def _charts(space, theta):
    wn = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    sh = space.reparametrize(Sinh())
    return [(space, theta), (wn, wn.chart.inverse(theta)), (sh, sh.chart.inverse(theta))]


def _metric(space, which):
    if which == "euclidean":
        return space
    return space.with_metric(cv.metrics.Damped(cv.metrics.GGN.from_space(space), 1e-3))


@pytest.mark.parametrize("which", ["euclidean", "damped_ggn"])
def test_softmax_logdet_is_invariant_and_counts_the_null_directions(softmax_classifier, which):
    space, theta = softmax_classifier
    values, naive = [], []
    for sp, p in _charts(_metric(space, which), theta):
        r = cv.flatness(sp, p, measures=("logdet", "spectrum"))
        assert r["logdet"].info["num_null"] == HIDDEN + 1
        assert r["logdet"].info["pseudo"] and r["logdet"].info["of"] == "log|pdet E|"
        values.append(r["logdet"].value)
        # the old definition: log|λ| over every eigenvalue, round-off included
        naive.append(sum(math.log(abs(x)) for x in r["spectrum"].value))
    assert max(values) - min(values) < 1e-8 * abs(values[0])
    assert max(naive) - min(naive) > 0.1  # what the round-off did to the plain log|det|
    # ground truth: log|λ| of the eigenvalues of the dense E in θ, above 1e-10·max|λ|
    sp = _metric(space, which)
    E = torch.linalg.solve(sp.metric.dense(theta), sp.hessian(theta))
    lam = torch.linalg.eigvals(E).real
    kept = lam[lam.abs() > 1e-10 * lam.abs().max()]
    assert kept.numel() == theta.numel() - HIDDEN - 1
    assert values[0] == pytest.approx(float(kept.abs().log().sum()), rel=1e-9)


def _assert_slq_matches_dense(sp, p, spread=0.1, **kwargs):
    dense = cv.flatness(sp, p, measures=("logdet", "spectrum"))
    st = cv.flatness(sp, p, measures=("logdet",), method="stochastic", seed=0,
                     slq_probes=16, slq_steps=40, **kwargs)["logdet"]
    assert st.converged and st.info["unresolved_weight"] < 0.5
    assert abs(st.value - dense["logdet"].value) <= 3 * st.stderr
    # an informative error bar: small against the size of the terms it sums
    kept = torch.tensor(dense["spectrum"].value)
    kept = kept[kept.abs() > dense["logdet"].info["null_threshold"]]
    assert st.stderr < spread * float(kept.abs().log().abs().sum())
    assert st.info["num_null"] == pytest.approx(HIDDEN + 1, abs=1.5)
    assert st.info["pseudo"]


def test_softmax_slq_agrees_with_dense_in_three_charts(softmax_classifier):
    """Euclidean metric, every product in each chart's own coordinates (in_chart=True)."""
    space, theta = softmax_classifier
    for sp, p in _charts(space, theta):
        _assert_slq_matches_dense(sp, p, in_chart=True)


def test_softmax_slq_agrees_with_dense_for_the_damped_ggn(softmax_classifier):
    space, theta = softmax_classifier
    # G⁻¹Hess is far from normal here: 16 probes give a wider (still covering) error bar
    _assert_slq_matches_dense(_metric(space, "damped_ggn"), theta, spread=0.25)


def test_softmax_slq_says_not_converged_when_lanczos_misses_the_small_end(softmax_classifier):
    """10 steps cannot separate the null eigenvalues from the smallest others: the estimate
    is off by many error bars, and the measure says so."""
    space, theta = softmax_classifier
    dense = cv.flatness(space, theta, measures=("logdet",))["logdet"]
    st = cv.flatness(space, theta, measures=("logdet",), method="stochastic", seed=0,
                     slq_probes=16, slq_steps=10)["logdet"]
    assert abs(st.value - dense.value) > 5 * st.stderr  # the error bar does not cover this
    assert not st.converged and st.info["unresolved_weight"] > 1.0
    assert "NOT converged" in st.format()


def test_undamped_ggn_restricted_to_its_range_in_both_methods_and_charts(softmax_classifier):
    """The undamped GGN is singular on the symmetry directions, where Hess vanishes too: E is
    the restricted problem, the same number in both methods and in two charts."""
    space, theta = softmax_classifier
    ggn = space.with_metric(cv.metrics.GGN.from_space(space))
    G, H = ggn.metric.dense(theta), ggn.hessian(theta)
    lam_g, U = torch.linalg.eigh(G)
    Q = U[:, HIDDEN + 1:]  # range(G): the GGN's kernel is exactly the symmetry
    assert float(lam_g[HIDDEN]) < 1e-12 * float(lam_g[-1]) < float(lam_g[HIDDEN + 1])
    Gr, Hr = Q.T @ G @ Q, Q.T @ H @ Q
    truth = torch.linalg.eigvals(torch.linalg.solve(Gr, Hr)).real
    sh = ggn.reparametrize(Sinh())
    for sp, p in ((ggn, theta), (sh, sh.chart.inverse(theta))):
        r = cv.flatness(sp, p, measures=("trace", "logdet"))
        assert r["trace"].info["rank"] == theta.numel() - HIDDEN - 1
        assert r["trace"].value == pytest.approx(float(truth.sum()), rel=1e-8)
        assert r["logdet"].value == pytest.approx(float(truth.abs().log().sum()), rel=1e-8)
    st = cv.flatness(ggn, theta, measures=("trace", "logdet"), method="stochastic",
                     num_probes=20, trace_method="hutchpp", slq_probes=16, slq_steps=26)
    assert st["trace"].info["num_gauge_directions"] == HIDDEN + 1
    assert abs(st["trace"].value - float(truth.sum())) <= 3 * st["trace"].stderr
    assert st["trace"].stderr < 0.2 * float(truth.sum())
    assert abs(st["logdet"].value - r["logdet"].value) <= 3 * st["logdet"].stderr


def test_undamped_empirical_fisher_has_an_identically_zero_shape_operator():
    """EF = JᵀJ/N pulls back the flat metric of R^N through θ ↦ (ℓ_n), under which the mean
    loss is linear: E = 0 exactly. Every eigenvalue is null, in both methods."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    ef = space.with_metric("empirical_fisher")
    assert ef.metric.rank(theta) == 6
    dense = cv.flatness(ef, theta, measures=("trace", "logdet", "max_eig"))
    assert abs(dense["trace"].value) < 1e-12 and abs(dense["max_eig"].value) < 1e-12
    assert dense["logdet"].info["num_null"] == 6 and dense["logdet"].value == 0.0
    st = cv.flatness(ef, theta, measures=("logdet",), method="stochastic", slq_probes=8)
    assert st["logdet"].info["num_null"] == pytest.approx(6, abs=1.5)
    assert st["logdet"].value == 0.0 and st["logdet"].converged


class _SingularConstant(cv.metrics.Dense):
    """diag(1, 1, 0): a constant metric of rank 2 that knows it."""

    is_constant = True

    def __init__(self):
        super().__init__(lambda p: torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=p.dtype)))

    def rank(self, p):
        return 2


@pytest.mark.parametrize("method", ["dense", "stochastic"])
def test_hess_not_vanishing_on_the_metric_kernel_raises_in_both_methods(method):
    space = cv.ParameterSpace(lambda p: (p**2).sum() + p[0] * p[2], metric=_SingularConstant())
    with pytest.raises(SingularMetricError, match="does not vanish on its kernel"):
        cv.flatness(space, torch.ones(3, dtype=torch.float64), measures=("trace",),
                    method=method)
    # with a loss that does not depend on p[2], Hess vanishes on ker G: E on range(G)
    ok = cv.ParameterSpace(lambda p: (p[:2] ** 2).sum() + p[0] * p[1], metric=_SingularConstant())
    extra = {} if method == "dense" else {"trace_method": "hutchpp", "num_probes": 6}
    r = cv.flatness(ok, torch.ones(3, dtype=torch.float64), measures=("trace", "logdet"),
                    method=method, **extra)  # Hutch++ with 6 products is exact in 2-D
    assert r["trace"].info["rank"] == 2
    assert r["trace"].value == pytest.approx(4.0, abs=1e-10)
    assert r["logdet"].value == pytest.approx(math.log(3.0), abs=1e-8)  # eigenvalues 1, 3


@pytest.mark.parametrize("bad", [-1e-3, 1.0, float("nan"), "1e-10", True])
def test_null_rtol_is_checked(bad):
    space = cv.ParameterSpace(lambda p: (p**2).sum())
    with pytest.raises(ValueError, match="null_rtol"):
        cv.flatness(space, torch.ones(2, dtype=torch.float64), null_rtol=bad)


def test_null_rtol_moves_the_threshold():
    evals = torch.tensor([1e-9, 0.5, 2.0], dtype=torch.float64)
    assert pseudo_log_determinant(evals).num_null == 0  # 1e-9 > 1e-10 · 2
    tight = pseudo_log_determinant(evals, null_rtol=1e-6)
    assert tight.num_null == 1 and tight.log_abs == pytest.approx(0.0, abs=1e-15)
