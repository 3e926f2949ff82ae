"""Woodbury solves of a damped curvature metric in sample space (metrics/sample_space.py,
linalg/woodbury.py) and the invariant trace they give (flatness/trace.py).

Ground truth everywhere is a dense float64 computation: the Jacobian GGN, ``torch.linalg``
solves, and the dense Riemannian Hessian. To exercise the path on small models the dense
limit of the all-Linear metric is lowered (``linear_structure.MAX_DENSE_DIM``): at scale
(d above 4,096) this is the path every solve of ``Damped(G, λ)`` takes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import covariant as cv
from covariant.flatness.trace import factored_trace
from covariant.linalg.probes import probe_block
from covariant.linalg.woodbury import DampedGramFactor
from covariant.metrics import linear_structure
from covariant.metrics.sample_space import DenseSampleSpace, linear_sample_space, per_sample_space

DT = torch.float64


@pytest.fixture
def small_dense_limit(monkeypatch):
    """All-Linear metrics factor their dense matrix only up to 8 coordinates."""
    monkeypatch.setattr(linear_structure, "MAX_DENSE_DIM", 8)


def _mlp(bias: bool = True, out: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6, bias=bias),
                         nn.Tanh(), nn.Linear(6, out, bias=bias)).to(DT)


def _data(sizes: tuple[int, ...], kind: str = "ce", classes: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        X = torch.randn(n, 5, generator=g, dtype=DT)
        y = torch.randint(0, classes, (n,), generator=g) if kind == "ce" else \
            torch.randn(n, classes, generator=g, dtype=DT)
        out.append((X, y))
    return out


def _B(space_b) -> torch.Tensor:
    return space_b.adjoint(torch.eye(space_b.size, dtype=DT)).T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ linalg/woodbury.py
def test_damped_gram_factor_against_dense_inverse_and_logdet():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(12, 50, generator=g, dtype=DT) * torch.logspace(0, -3, 12, dtype=DT)[:, None]
    lam = 1e-4
    f = DampedGramFactor(lambda V: B @ V, lambda U: B.T @ U, B @ B.T, lam)
    G = lam * torch.eye(50, dtype=DT) + B.T @ B
    W = torch.randn(50, 3, generator=g, dtype=DT)
    assert _rel(f.solve(W), torch.linalg.solve(G, W)) < 1e-10
    assert _rel(f.solve(W[:, 0]), torch.linalg.solve(G, W[:, 0])) < 1e-10
    Wf = f.inverse_factor(torch.eye(62, dtype=DT))
    assert _rel(Wf @ Wf.T, torch.linalg.inv(G)) < 1e-10
    assert abs(float(f.logdet(50) - torch.linalg.slogdet(G)[1])) < 1e-9
    # float32 in, float32 out, computed in float64
    assert f.solve(W.float()).dtype == torch.float32


def test_damped_gram_factor_needs_positive_damping():
    with pytest.raises(ValueError, match="lam must be > 0"):
        DampedGramFactor(lambda V: V, lambda U: U, torch.eye(2, dtype=DT), 0.0)


# ------------------------------------------------------------------ metrics/sample_space.py
@pytest.mark.parametrize("bias", [True, False])
def test_cross_entropy_gram_is_the_ggn_with_one_null_direction_dropped(bias):
    """BᵀB = the dense GGN over two batches of different sizes; softmax: r = C − 1."""
    model = _mlp(bias)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 _data((6, 9)), "ggn")
    B = space.metric.sample_space(theta)
    assert B is not None and B.rank == 3 and B.size == 15 * 3
    Bd = _B(B)
    assert _rel(Bd.T @ Bd, space.metric.dense(theta)) < 1e-12
    assert _rel(B.apply(torch.eye(theta.shape[0], dtype=DT)), Bd) < 1e-14
    assert _rel(B.gram(), Bd @ Bd.T) < 1e-12
    low = B.gram(lower_only=True)
    assert _rel(low.tril(), (Bd @ Bd.T).tril()) < 1e-12


@pytest.mark.parametrize("name", ["mse", "fisher", "empirical_fisher"])
def test_other_losses_and_metrics(name):
    if name == "mse":
        space, theta = cv.ParameterSpace.from_module(_mlp(), nn.MSELoss(),
                                                     _data((8,), "mse"), "ggn")
        metric, rank = space.metric, 4          # MSE: Λ_n = 2c·I, full rank
    else:
        space, theta = cv.ParameterSpace.from_module(_mlp(), nn.CrossEntropyLoss(),
                                                     _data((8,)), "ggn")
        metric = cv.metrics.Fisher.from_space(space) if name == "fisher" else \
            cv.metrics.EmpiricalFisher.from_space(space)
        rank = 3 if name == "fisher" else 1     # the empirical Fisher: g gᵀ, rank one
    B = metric.sample_space(theta)
    assert B is not None and B.rank == rank
    Bd = _B(B)
    assert _rel(Bd.T @ Bd, metric.dense(theta)) < 1e-12


class _Attention(nn.Module):
    """A one-head self-attention classifier over (N, T, 5) sequences, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(h.mean(1))


def _other_model(kind: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    if kind == "conv":
        model = nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                              nn.Tanh(), nn.Linear(6, 4)).to(DT)
        X = torch.randn(7, 5, generator=g, dtype=DT)
    elif kind == "attention":
        model = _Attention().to(DT)
        X = torch.randn(7, 3, 5, generator=g, dtype=DT)
    else:  # batch norm, evaluated with its running statistics
        model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(),
                              nn.Linear(7, 4)).to(DT)
        model(torch.randn(16, 5, generator=g, dtype=DT))      # nontrivial running stats
        model.eval()
        X = torch.randn(7, 5, generator=g, dtype=DT)
    return model, (X, torch.randint(0, 4, (7,), generator=g))


@pytest.mark.parametrize("kind", ["conv", "attention", "batchnorm_eval"])
def test_other_models_get_b_from_per_sample_jacobians(kind):
    """Not all nn.Linear: B is materialized from per-sample Jacobians, BᵀB = the dense GGN."""
    model, data = _other_model(kind)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    assert linear_structure.linear_layers(model, theta.shape[0]) is None
    B = space.metric.sample_space(theta)
    assert isinstance(B, DenseSampleSpace) and B.size == 7 * 3 < theta.shape[0]
    assert _rel(B.B.T @ B.B, space.metric.dense(theta)) < 1e-12
    assert _rel(B.gram(), B.B @ B.B.T) < 1e-14


def test_batch_norm_in_training_mode_gives_none():
    """Batch statistics make the samples interact: no per-sample B (the check rejects it, or
    a batch of one cannot run)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 4)).to(DT)
    X = torch.randn(7, 5, generator=torch.Generator().manual_seed(4), dtype=DT)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(),
                                                 (X, torch.randint(0, 4, (7,))), "ggn")
    assert model.training and space.metric.sample_space(theta) is None


def test_models_that_do_not_qualify_give_none():
    # more rows than columns: the d × d matrix is the smaller one
    space, theta = cv.ParameterSpace.from_module(_mlp(), nn.CrossEntropyLoss(),
                                                 _data((200,)), "ggn")
    assert space.metric.sample_space(theta) is None
    layers = linear_structure.linear_layers(space.binding.model, theta.shape[0])
    m = space.metric
    assert linear_sample_space(m.forward, m._output_matvec, m.batches[:1], m.weights[:1],
                               theta, layers, max_size=10) is None
    # a materialized B over its memory budget
    model, data = _other_model("conv")
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    m = space.metric
    assert per_sample_space(m.forward, m._output_matvec, m.batches, m.weights, theta,
                            max_bytes=21 * 36 * 8 - 1) is None
    assert per_sample_space(m.forward, m._output_matvec, m.batches, m.weights, theta,
                            max_bytes=21 * 36 * 8) is not None


def test_interacting_samples_fail_the_product_check():
    class Centered(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(0, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), Centered(), nn.Tanh(), nn.Linear(7, 4)).to(DT)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), _data((8,)),
                                                 "ggn")
    m = space.metric
    layers = linear_structure.linear_layers(model, theta.shape[0])
    raw = linear_sample_space(m.forward, m._output_matvec, m.batches, m.weights, theta, layers)
    Bd = _B(raw)
    assert _rel(Bd.T @ Bd, m.dense(theta)) > 1e-3   # the per-sample formula is wrong here
    assert m.sample_space(theta) is None             # and the check rejects it


# ------------------------------------------------------------------ Damped.solve
def test_damped_solve_above_the_dense_size_is_the_woodbury_solve(small_dense_limit):
    space, theta = cv.ParameterSpace.from_module(_mlp(), nn.CrossEntropyLoss(),
                                                 _data((6, 9)), "ggn")
    d = theta.shape[0]
    G = cv.metrics.Damped(space.metric, 1e-3)
    assert G.cholesky_factor(theta) is None             # above the (lowered) dense size
    assert G.sample_space_factor(theta) is not None
    w = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=DT)
    dense = space.metric.dense(theta) + 1e-3 * torch.eye(d, dtype=DT)
    assert _rel(G.solve(theta, w), torch.linalg.solve(dense, w)) < 1e-10
    # opting out, asking for Nyström-preconditioned CG, or a reference other than the identity
    # keep conjugate gradients
    assert cv.metrics.Damped(space.metric, 1e-3, sample_space=False).sample_space_factor(
        theta) is None
    assert cv.metrics.Damped(space.metric, 1e-3, nystrom_rank=5).sample_space_factor(
        theta) is None
    ref = cv.metrics.Diagonal(lambda p: 1.0 + p ** 2)
    assert cv.metrics.Damped(space.metric, 1e-3, ref).sample_space_factor(theta) is None


# ------------------------------------------------------------------ the invariant trace
def test_factored_trace_is_hutchinson_on_the_woodbury_factor(small_dense_limit):
    """The estimate is exactly the mean of uᵀ Hess u over u = W z, W = G⁻¹[√λ I, Bᵀ] and the
    (d + m)-dimensional probes z of the seed, with the dense Riemannian Hessian."""
    lam = 1e-2
    space, theta = cv.ParameterSpace.from_module(_mlp(), nn.CrossEntropyLoss(),
                                                 _data((10,)), "ggn")
    space = space.with_metric(cv.metrics.Damped(space.metric, lam))
    d = theta.shape[0]
    est = factored_trace(space, theta, num_probes=5, seed=3)
    assert est is not None
    B = space.metric.metric.sample_space(theta)
    Bd = _B(B)
    G = lam * torch.eye(d, dtype=DT) + Bd.T @ Bd
    W = torch.linalg.solve(G, torch.cat([math.sqrt(lam) * torch.eye(d, dtype=DT), Bd.T], 1))
    assert _rel(W @ W.T, torch.linalg.inv(G)) < 1e-10
    H = space.hessian(theta, riemannian=True, max_dim=d)
    U = W @ probe_block(3, d + B.size, 5)
    truth = float(((H @ U) * U).sum(0).mean())
    assert abs(est.value - truth) < 1e-9 * abs(truth)


def test_invariant_trace_in_the_weight_norm_chart_matches_the_dense_answer(small_dense_limit):
    """A damped GGN pulled back to the weight-norm chart: the sample-space estimate of
    tr(G⁻¹Hess) agrees with the dense value within 3 standard errors, and the Euclidean trace
    of the same chart (what reparametrization changes) is far from it."""
    space, theta = cv.ParameterSpace.from_module(_mlp(), nn.CrossEntropyLoss(),
                                                 _data((36,)), "ggn")   # m = 108 < d = 118
    damped = space.with_metric(cv.metrics.Damped(space.metric, 1e-1))
    truth = cv.flatness(damped, theta, measures=("trace",), method="dense")["trace"].value
    wn = damped.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    psi = wn.chart.inverse(theta)
    got = cv.flatness(wn, psi, measures=("trace",), method="stochastic", num_probes=1500,
                      seed=0)["trace"]
    assert "Woodbury" in got.info["products"]
    assert abs(got.value - truth) < 3 * got.stderr
    assert got.stderr < 0.1 * abs(truth)  # 1,500 probes: about 8 %
    naive = cv.flatness(wn.with_metric(cv.metrics.Euclidean()), psi, measures=("trace",),
                        method="dense")["trace"].value
    assert abs(naive - truth) > 10 * got.stderr


def test_factored_trace_of_a_conv_net_with_the_per_sample_factor():
    """The same exactness for a conv net (B from per-sample Jacobians, d > the lowered
    generic dense size)."""
    lam = 1e-2
    model, data = _other_model("conv")
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    space = space.with_metric(cv.metrics.Damped(space.metric, lam))
    d = theta.shape[0]
    space.metric.dense_solve_dim = lambda p: 8  # pretend d = 36 is large
    est = factored_trace(space, theta, num_probes=4, seed=2)
    assert est is not None
    Bd = space.metric.metric.sample_space(theta).B
    G = lam * torch.eye(d, dtype=DT) + Bd.T @ Bd
    W = torch.linalg.solve(G, torch.cat([math.sqrt(lam) * torch.eye(d, dtype=DT), Bd.T], 1))
    H = space.hessian(theta, riemannian=True, max_dim=d)
    U = W @ probe_block(2, d + Bd.shape[0], 4)
    truth = float(((H @ U) * U).sum(0).mean())
    assert abs(est.value - truth) < 1e-9 * abs(truth)
