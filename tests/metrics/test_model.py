"""Curvature metrics of a model space (issue 3): GGN, Fisher, empirical Fisher, AdamMetric.

Ground truth is dense float64: model Jacobians from ``torch.func.jacrev`` and output
Hessians from ``jacrev(jacrev(loss))`` of the actual loss function, never the closed forms
under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import covariant as cv
from covariant.errors import SingularMetricError
from covariant.metrics import (
    GGN,
    AdamMetric,
    Damped,
    EmpiricalFisher,
    Euclidean,
    Fisher,
    Pullback,
    metric_from_name,
)


def _mlp(din: int = 3, hidden: int = 4, dout: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, hidden), nn.Tanh(), nn.Linear(hidden, dout)).double()


def _data(n: int, din: int, dout: int, kind: str, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, din, generator=g, dtype=torch.float64)
    if kind == "ce":
        y = torch.randint(0, dout, (n,), generator=g)
    elif kind == "bce":
        y = torch.randint(0, 2, (n, dout), generator=g).double()
    else:
        y = torch.randn(n, dout, generator=g, dtype=torch.float64)
    return X, y


LOSSES = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}


def _space(kind: str = "ce", n: int = 40, loss_fn=None, batches=None, metric="ggn", **kw):
    model = _mlp()
    loss_fn = LOSSES[kind]() if loss_fn is None else loss_fn
    data = _data(n, 3, 3, kind) if batches is None else batches
    return cv.ParameterSpace.from_module(model, loss_fn, data, metric=metric, **kw)


def _ggn_truth(space, theta) -> torch.Tensor:
    """Σ_b w_b J_bᵀ H_b J_b from jacrev of the model and of the loss's gradient itself."""
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for w, (X, y) in zip(space.binding.weights, space.binding.batches, strict=True):
        out = space.binding.forward(theta, X)
        J = jacrev(lambda q, X=X: space.binding.forward(q, X).reshape(-1))(theta)
        # reverse-over-reverse: jacfwd over torch.func.hessian trips a PyTorch ZeroTensor bug
        H = jacrev(jacrev(lambda o, y=y, s=out.shape: space.binding.loss_fn(o.reshape(s), y)))(
            out.reshape(-1)
        )
        G = G + w * J.T @ H @ J
    return G


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------
# GGN against dense ground truth
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, loss_fn",
    [
        ("ce", nn.CrossEntropyLoss()),
        ("ce", nn.CrossEntropyLoss(reduction="sum")),
        ("ce", nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.2)),
        ("mse", nn.MSELoss()),
        ("mse", nn.MSELoss(reduction="sum")),
        ("bce", nn.BCEWithLogitsLoss()),
        ("mse", nn.SmoothL1Loss(beta=0.5)),  # the generic autodiff path
        ("mse", lambda out, y: ((out - y) ** 2).mean() + 0.1 * (out**4).mean()),  # generic
    ],
)
def test_ggn_matvec_and_dense_match_dense_truth(kind, loss_fn):
    space, theta = _space(kind, loss_fn=loss_fn)
    G = space.metric
    assert isinstance(G, GGN)
    truth = _ggn_truth(space, theta)
    assert truth.abs().max() > 1e-3
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(G.matvec(theta, v), truth @ v, rtol=1e-10, atol=1e-12)
    assert torch.allclose(G.dense(theta), truth, rtol=1e-10, atol=1e-12)


def test_generic_path_agrees_with_closed_form():
    space, theta = _space("mse")
    closed = space.metric
    generic = GGN(space.binding.forward, lambda o, y: F.mse_loss(o, y), space.binding.batches)
    assert generic.info.kind == "generic" and closed.info.kind == "mse"
    assert torch.allclose(generic.dense(theta), closed.dense(theta), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cls", [GGN, EmpiricalFisher])
def test_batched_data_equals_full_batch(kind, reduction, cls):
    X, y = _data(40, 3, 3, kind)
    loss = LOSSES[kind](reduction=reduction)
    splits = [(X[:7], y[:7]), (X[7:19], y[7:19]), (X[19:], y[19:])]
    full, theta = _space(kind, loss_fn=loss, batches=(X, y), metric="euclidean")
    parts, _ = _space(kind, loss_fn=loss, batches=splits, metric="euclidean")
    assert torch.allclose(parts.loss(theta), full.loss(theta), rtol=1e-12)
    A, B = cls.from_space(parts).dense(theta), cls.from_space(full).dense(theta)
    assert torch.allclose(A, B, rtol=1e-10, atol=1e-13)


def test_matvec_is_differentiable_in_p():
    """jvp and grad of p ↦ G(p)x against finite differences (the connection code needs it)."""
    space, theta = _space("ce")
    G = space.metric
    g = torch.Generator().manual_seed(5)
    x, u = (torch.randn(theta.numel(), generator=g, dtype=torch.float64) for _ in range(2))
    dGx = torch.func.jvp(lambda q: G.matvec(q, x), (theta,), (u,))[1]
    h = 1e-5
    fd = (G.matvec(theta + h * u, x) - G.matvec(theta - h * u, x)) / (2 * h)
    assert _rel(dGx, fd) < 1e-7
    grad_inner = torch.func.grad(lambda q: torch.dot(u, G.matvec(q, x)))(theta)
    assert torch.allclose(torch.dot(grad_inner, u), torch.dot(u, dGx), rtol=1e-10)


def test_float32_close_to_float64():
    space, theta = _space("ce")
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = space.metric.matvec(theta, v)
    out32 = space.metric.matvec(theta.float(), v.float())
    assert out32.dtype == torch.float32
    assert _rel(out32.double(), ref) < 1e-5


# ------------------------------------------------------------------------------------------
# Fisher and empirical Fisher
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_exact_fisher_equals_ggn(kind):
    space, theta = _space(kind, metric="fisher")
    assert isinstance(space.metric, Fisher) and space.metric.mc_samples is None
    assert torch.allclose(space.metric.dense(theta), _ggn_truth(space, theta), rtol=1e-10,
                          atol=1e-13)


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_mc_fisher_converges_to_exact_and_is_seeded(kind):
    space, theta = _space(kind, n=20)
    exact = Fisher.from_space(space).dense(theta)
    errors = [
        _rel(Fisher.from_space(space, mc_samples=S, seed=7).dense(theta), exact)
        for S in (4, 64, 1024)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.3 * errors[0] and errors[2] < 0.08
    a = Fisher.from_space(space, mc_samples=4, seed=1).dense(theta)
    b = Fisher.from_space(space, mc_samples=4, seed=1).dense(theta)
    c = Fisher.from_space(space, mc_samples=4, seed=2).dense(theta)
    assert torch.equal(a, b)
    assert _rel(a, c) > 1e-3


def _per_sample_grads(space, theta, per_sample_loss):
    X, y = space.binding.batches[0]
    rows = []
    for n in range(X.shape[0]):
        f = lambda q, n=n: per_sample_loss(space.binding.forward(q, X[n : n + 1]), y[n : n + 1])
        rows.append(jacrev(f)(theta))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "kind, loss_fn, per_sample, scale",
    [
        # ℓ_n = CE of sample n, c = 1/N
        ("ce", nn.CrossEntropyLoss(), lambda o, y: F.cross_entropy(o, y, reduction="sum"),
         lambda N, C: 1 / N),
        ("ce", nn.CrossEntropyLoss(reduction="sum"),
         lambda o, y: F.cross_entropy(o, y, reduction="sum"), lambda N, C: 1.0),
        # ignored samples drop out; c = 1/(non-ignored count); smoothing enters the gradients
        ("ce", nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
         lambda o, y: F.cross_entropy(o, y, reduction="sum", ignore_index=2,
                                      label_smoothing=0.1), None),
        # ℓ_n = ‖f_n − y_n‖², c = 1/(N·C)
        ("mse", nn.MSELoss(), lambda o, y: ((o - y) ** 2).sum(), lambda N, C: 1 / (N * C)),
        # a plain function: ℓ_n = the loss of a batch of one, c = 1/N
        ("mse", lambda o, y: F.smooth_l1_loss(o, y), lambda o, y: F.smooth_l1_loss(o, y),
         lambda N, C: 1 / N),
    ],
)
def test_empirical_fisher_matches_per_sample_gradient_outer_products(
    kind, loss_fn, per_sample, scale
):
    space, theta = _space(kind, n=12, loss_fn=loss_fn, metric="empirical_fisher")
    EF = space.metric
    assert isinstance(EF, EmpiricalFisher)
    g = _per_sample_grads(space, theta, per_sample)
    if scale is None:
        c = 1 / int((space.binding.batches[0][1] != 2).sum())
    else:
        c = scale(*space.binding.batches[0][1].shape[:1], 3)
    truth = c * g.T @ g
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(EF.matvec(theta, v), truth @ v, rtol=1e-10, atol=1e-13)
    assert torch.allclose(EF.dense(theta), truth, rtol=1e-10, atol=1e-13)
    assert EF.rank(theta) <= 12


# ------------------------------------------------------------------------------------------
# In a chart: the pulled-back GGN equals the GGN computed in the chart
# ------------------------------------------------------------------------------------------


def _sinh():
    return cv.reparam.FromFunctions(torch.sinh, torch.asinh)


CHARTS = {
    "weightnorm": lambda: {"0.weight": cv.reparam.WeightNorm()},
    "scale_all": lambda: cv.reparam.Scale(0.3),
    "scale_named": lambda: {"2.weight": cv.reparam.Scale(2.5)},
    "sinh_biases": lambda: {"*.bias": _sinh()},
    "sinh_all": _sinh,
}


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize("chart", list(CHARTS))
@pytest.mark.parametrize("name", ["ggn", "fisher", "empirical_fisher"])
def test_pullback_equals_metric_computed_in_chart(kind, chart, name):
    space, theta = _space(kind, n=15, metric=name)
    new = space.reparametrize(CHARTS[chart]())
    psi = new.chart.inverse(theta)
    psi = psi + 0.05 * torch.randn(psi.shape, generator=torch.Generator().manual_seed(4),
                                   dtype=torch.float64)
    assert isinstance(new.metric, Pullback)
    in_chart = metric_from_name(name, new)
    v = torch.randn(psi.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.allclose(in_chart.matvec(psi, v), new.metric.matvec(psi, v), rtol=1e-10,
                          atol=1e-10)
    D = in_chart.dense(psi)
    assert torch.allclose(D, new.metric.dense(psi), rtol=1e-10, atol=1e-10)
    # the chart matters: the metric in ψ is not the root metric at the same coordinates
    if psi.shape == theta.shape:
        assert _rel(D, space.metric.dense(new.chart(psi))) > 1e-2


def test_metric_in_a_chart_of_a_chart():
    space, theta = _space("ce", n=15)
    mid = space.reparametrize({"0.weight": cv.reparam.WeightNorm()})
    new = mid.reparametrize(_sinh())
    psi = new.chart.inverse(mid.chart.inverse(theta))
    G = GGN.from_space(new)
    assert torch.allclose(G.dense(psi), new.metric.dense(psi), rtol=1e-10, atol=1e-10)
    # ...and for a with_metric copy of that chart
    same = new.with_metric(G)
    assert torch.allclose(GGN.from_space(same).dense(psi), G.dense(psi), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Riemannian Hessian with a GGN metric (differentiates matvec in p)
# ------------------------------------------------------------------------------------------


def _manual_mse(out, y):
    return ((out - y) ** 2).mean()


# nn.MSELoss itself is left out here: with torch 2.13, ``space.hvp`` (jvp of grad through
# F.mse_loss) hits a PyTorch ZeroTensor bug in the core's Euclidean HVP, not in the metric.
REGRESSION_LOSSES = {"bce": nn.BCEWithLogitsLoss(), "mse_generic": _manual_mse}


def _regression_space(loss: str = "bce"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = _data(30, 2, 2, "bce" if loss == "bce" else "mse", seed=3)
    return cv.ParameterSpace.from_module(model, REGRESSION_LOSSES[loss], (X, y), metric="ggn")


def _riemannian_hessian_truth(space, theta) -> torch.Tensor:
    """∇²L − Γ^m_ij ∂_m L with Γ from jacfwd of the dense ground-truth GGN (docs/math.md §3)."""
    H = torch.func.hessian(space._loss)(theta)
    g = torch.func.grad(space._loss)(theta)
    G = _ggn_truth(space, theta)
    dG = torch.func.jacfwd(lambda q: _ggn_truth(space, q))(theta)  # dG[j, l, i] = ∂_i G_jl
    r = torch.linalg.solve(G, g)
    corr = 0.5 * (
        torch.einsum("jli,l->ij", dG, r)
        + torch.einsum("ilj,l->ij", dG, r)
        - torch.einsum("ijl,l->ij", dG, r)
    )
    return H - corr


@pytest.mark.parametrize("loss", list(REGRESSION_LOSSES))
def test_riemannian_hvp_general_path_matches_dense_hessian(loss):
    space, theta = _regression_space(loss)
    assert space.metric.rank(theta) == theta.numel()
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hv = space.hvp(theta, v, method="general")
    H = space.hessian(theta)
    assert _rel(hv, H @ v) < 1e-8
    # both paths differentiate GGN.matvec; the ground truth differentiates jacrev/hessian
    truth = _riemannian_hessian_truth(space, theta)
    assert _rel(H, truth) < 1e-8
    assert _rel(hv, truth @ v) < 1e-8
    euclid = space.hvp(theta, v, riemannian=False)
    assert _rel(hv, euclid) > 1e-3  # the connection term is not negligible here


@pytest.mark.parametrize("loss", list(REGRESSION_LOSSES))
def test_riemannian_hvp_with_in_chart_ggn_equals_pullback_path(loss):
    space, theta = _regression_space(loss)
    new = space.reparametrize(_sinh())
    psi = new.chart.inverse(theta)
    own = new.with_metric(metric_from_name("ggn", new))  # in-chart GGN, general path only
    v = torch.randn(psi.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _rel(own.hvp(psi, v, method="general"), new.hvp(psi, v, method="pullback")) < 1e-8


# ------------------------------------------------------------------------------------------
# Degenerate metrics
# ------------------------------------------------------------------------------------------


def _tiny_data_space(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = _data(3, 3, 2, "mse")
    return cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y), metric="ggn", **kw)


def test_singular_ggn_raises_instead_of_a_huge_number():
    space, theta = _tiny_data_space()
    d = theta.numel()
    G = space.metric
    truth = _ggn_truth(space, theta)
    assert G.rank(theta) == int(torch.linalg.matrix_rank(truth, hermitian=True)) <= 6 < d
    assert G.rank_bound(theta) == 6
    w = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(SingularMetricError, match=r"Damped\(G, lam, reference=") as err:
        G.solve(theta, w)
    assert "solve_mode='pinv'" in str(err.value) and "at most 6" in str(err.value)
    with pytest.raises(SingularMetricError, match="rank"):
        G.logdet(theta)
    # a loss gradient lies in the range of the GGN: it has a solution, and CG finds G⁺g
    g = space.grad(theta)
    pinv = torch.linalg.pinv(truth, hermitian=True, rtol=1e-10)
    assert _rel(space.riemannian_grad(theta), pinv @ g) < 1e-6
    # damping with a reference metric gives a finite, exact solve
    damped = Damped(G, 1e-3, reference=Euclidean())
    x = damped.solve(theta, w)
    assert torch.allclose(damped.matvec(theta, x), w, rtol=1e-8, atol=1e-9)


def test_pinv_mode_gives_the_projected_answer():
    space, theta = _tiny_data_space(solve_mode="pinv")
    G = space.metric
    truth = _ggn_truth(space, theta)
    w = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.linalg.pinv(truth, hermitian=True, rtol=1e-10) @ w
    x = G.solve(theta, w)
    assert _rel(x, expected) < 1e-6
    evals = torch.linalg.eigvalsh(truth)
    pseudo = evals[evals > 1e-10 * evals[-1]].log().sum()
    assert torch.allclose(G.logdet(theta), pseudo, rtol=1e-8)
    assert torch.allclose(G.pseudo_logdet(theta), pseudo, rtol=1e-8)


def test_cross_entropy_symmetry_makes_ggn_singular():
    """Adding a constant to all logits changes nothing: the GGN has zero eigenvalues although
    outputs × samples exceeds d. Consistent right-hand sides (gradients) still solve."""
    space, theta = _space("ce", n=40, solve_mode="pinv")
    G = space.metric
    d = theta.numel()
    assert G.rank_bound(theta) > d
    assert G.rank(theta) == d - 5  # output bias + one per hidden unit of the last layer
    g = space.grad(theta)
    truth = _ggn_truth(space, theta)
    expected = torch.linalg.pinv(truth, hermitian=True, rtol=1e-10) @ g
    assert _rel(space.riemannian_grad(theta), expected) < 1e-6
    strict = GGN.from_space(space)
    w = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(SingularMetricError):
        strict.solve(theta, w)


@pytest.mark.parametrize("loss", list(REGRESSION_LOSSES))
def test_full_rank_solve_and_logdet_match_dense(loss):
    space, theta = _regression_space(loss)
    G = space.metric
    truth = _ggn_truth(space, theta)
    w = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _rel(G.solve(theta, w), torch.linalg.solve(truth, w)) < 1e-8
    assert torch.allclose(G.logdet(theta), torch.linalg.slogdet(truth)[1], rtol=1e-8)


# ------------------------------------------------------------------------------------------
# AdamMetric
# ------------------------------------------------------------------------------------------


def _run(opt_factory, steps=4):
    model = _mlp()
    X, y = _data(20, 3, 3, "ce")
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_metric_matches_hand_computation(amsgrad):
    model, opt = _run(lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), eps=1e-6,
                                                   amsgrad=amsgrad))
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
        parts.append((v / (1 - 0.95 ** float(st["step"]))).sqrt().reshape(-1) + 1e-6)
    expected = torch.cat(parts)
    G = AdamMetric(opt)
    assert torch.allclose(G.diag, expected, rtol=1e-12, atol=0)
    assert isinstance(cv.metrics.AdamMetric(opt), AdamMetric)  # lazy re-export
    assert G.is_constant
    p = torch.zeros_like(expected)
    w = torch.randn(expected.shape, dtype=torch.float64)
    assert torch.allclose(G.solve(p, w), w / expected)
    assert torch.allclose(G.logdet(p), expected.log().sum())
    # the same from the state dict and from .state with params
    assert torch.equal(AdamMetric(opt.state_dict()).diag, G.diag)
    bare = AdamMetric(opt.state, params=list(model.parameters()), eps=1e-6, beta2=0.95)
    assert torch.allclose(bare.diag, G.diag, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="beta2"):
        AdamMetric(opt.state, params=list(model.parameters()))
    assert torch.allclose(AdamMetric(opt, eps=0.5).diag, expected - 1e-6 + 0.5)


def test_rmsprop_and_adagrad_metrics():
    model, opt = _run(lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-7))
    expected = torch.cat([opt.state[p]["square_avg"].sqrt().reshape(-1) + 1e-7
                          for p in model.parameters()])
    assert AdamMetric(opt).kind == "rmsprop"
    assert torch.allclose(AdamMetric(opt).diag, expected, rtol=1e-12, atol=0)
    model, opt = _run(lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    expected = torch.cat([opt.state[p]["sum"].sqrt().reshape(-1) + 1e-10
                          for p in model.parameters()])
    assert torch.allclose(AdamMetric(opt, kind="adagrad").diag, expected, rtol=1e-12, atol=0)


def test_adam_metric_errors():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="optimizer step"):
        AdamMetric(opt)
    with pytest.raises(ValueError, match="kind"):
        AdamMetric(opt, kind="sgd")


# ------------------------------------------------------------------------------------------
# By name, and errors
# ------------------------------------------------------------------------------------------


def test_metric_from_name_choices_and_errors():
    space, _ = _space("ce", metric="euclidean")
    assert isinstance(metric_from_name("GGN", space), GGN)
    assert isinstance(metric_from_name("empirical-fisher", space), EmpiricalFisher)
    assert isinstance(metric_from_name("euclidean", space), Euclidean)
    fisher = metric_from_name("fisher", space, mc_samples=3, seed=5)
    assert isinstance(fisher, Fisher) and fisher.mc_samples == 3
    with pytest.raises(ValueError, match="'ggn', 'fisher', 'empirical_fisher'"):
        metric_from_name("hessian", space)
    plain = cv.ParameterSpace(lambda p: (p**2).sum())
    with pytest.raises(ValueError, match="from_module"):
        metric_from_name("ggn", plain)
    with pytest.raises(ValueError, match="from_module"):
        metric_from_name("ggn", plain.reparametrize(cv.reparam.Scale(2.0)))
    with pytest.raises(ValueError, match="GGN"):
        _space("mse", loss_fn=nn.SmoothL1Loss(), metric="fisher")
    with pytest.raises(ValueError, match="reduction"):
        _space("ce", loss_fn=nn.CrossEntropyLoss(reduction="none"), metric="ggn")
    with pytest.raises(ValueError, match="solve_mode"):
        GGN.from_space(space, solve_mode="lstsq")
