"""Damped(G, lam, nystrom_rank=ℓ): Nyström-preconditioned CG solves above the dense limit,
checked against dense float64 solves and the unpreconditioned CG on a GGN with d > 2048."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv
from covariant.linalg import cg
from covariant.metrics import Damped, base
from covariant.metrics.nystrom import NYSTROM_CHUNK, data_subsample

F64 = torch.float64


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    # a layer norm with parameters: not an all-Linear net, so no cheap dense factor up to
    # 4096 coordinates (Metric.dense_solve_dim): the solves above 2048 are CG
    model = nn.Sequential(nn.Linear(16, 96), nn.LayerNorm(96), nn.Tanh(),
                          nn.Linear(96, 8)).double()
    data = (torch.randn(60, 16, dtype=F64), torch.randint(0, 8, (60,)))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    assert theta.shape[0] > base.DENSE_SOLVE_DIM  # the CG path, not the dense factor
    assert space.metric.dense_solve_dim(theta) == base.DENSE_SOLVE_DIM
    G = space.metric.dense(theta)
    return space, theta.detach(), G


class Counted(cv.metrics.Metric):
    """A metric's products, counted (a vmapped block counts once)."""

    def __init__(self, metric):
        self.metric, self.products, self.is_constant = metric, 0, False

    def matvec(self, p, v):
        self.products += 1
        return self.metric.matvec(p, v)


def _damped(G, lam):
    """G + λI and its eigenvalues (the dense float64 ground truth)."""
    A = G + lam * torch.eye(G.shape[0], dtype=F64)
    return A, torch.linalg.eigvalsh(A)


def test_preconditioned_solves_match_dense_float64(case):
    space, theta, G = case
    lam = 1e-2
    d = theta.shape[0]
    A, evals = _damped(G, lam)
    cond = float(evals[-1] / evals[0])
    plain = Damped(space.metric, lam, sample_space=False)   # conjugate gradients
    pre = Damped(space.metric, lam, nystrom_rank=80)
    W = torch.randn(d, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    W[:, 0] = space.grad(theta)
    for w in W.T:
        exact = torch.linalg.solve(A, w)
        x, y = pre.solve(theta, w), plain.solve(theta, w)
        # metric solves stop at the true residual 1e-10·‖w‖ (cg's float64 default)
        assert float((A @ x - w).norm()) <= 1e-10 * float(w.norm())
        assert float((x - exact).norm()) <= cond * 1e-10 * float(exact.norm())
        assert float((x - y).norm()) <= 2 * cond * 1e-10 * float(exact.norm())
    assert pre.cg_preconditioner(theta) is pre.cg_preconditioner(theta)  # one build per point


def test_fewer_products_per_solve_and_one_build_per_point(case):
    space, theta, _ = case
    counted = Counted(space.metric)
    lam, rank = 1e-3, 200
    pre = Damped(counted, lam, nystrom_rank=rank)
    w = space.grad(theta)
    P = pre.cg_preconditioner(theta)  # built once: ℓ products in vmapped chunks
    assert counted.products == -(-rank // NYSTROM_CHUNK) and P.U.shape == (theta.shape[0], rank)
    counted.products = 0
    pre.solve(theta, w)
    pre.solve(theta, 2 * w)
    assert pre.cg_preconditioner(theta) is P  # reused, not rebuilt
    with_nystrom = counted.products / 2
    counted.products = 0
    plain = cg(lambda v: counted.matvec(theta, v) + lam * v, w, maxiter=10 * theta.shape[0])
    assert counted.products == plain.num_matvecs + 0
    assert with_nystrom < plain.num_matvecs / 2


def test_off_by_default_and_where_it_does_not_apply(case):
    space, theta, _ = case
    d = theta.shape[0]
    w = space.grad(theta)
    damped = Damped(space.metric, 1e-2, sample_space=False)  # the default solve is exact
    assert damped.cg_preconditioner(theta) is None             # (sample space) since then
    reference = cg(lambda x: damped.matvec(theta, x), w, maxiter=10 * d).x
    assert torch.equal(damped.solve(theta, w), reference)  # the numbers of before, bitwise
    exact = Damped(space.metric, 1e-2)
    assert exact.cg_preconditioner(theta) is None and exact.sample_space_factor(theta) is not None
    assert float((exact.solve(theta, w) - reference).norm()) < 1e-7 * float(reference.norm())
    small = theta[: base.DENSE_SOLVE_DIM]
    assert Damped(space.metric, 1e-2, nystrom_rank=8).cg_preconditioner(small) is None
    assert Damped(space.metric, 0.0, nystrom_rank=8).cg_preconditioner(theta) is None
    other = Damped(space.metric, 1e-2, cv.metrics.Diagonal(torch.ones(d, dtype=F64)),
                   nystrom_rank=8)
    assert other.cg_preconditioner(theta) is None  # reference not the identity
    pulled = Damped(space.metric, 1e-2, nystrom_rank=8).pullback(cv.reparam.Scale(2.0))
    assert pulled.nystrom is not None and pulled.nystrom.rank == 8
    with pytest.raises(ValueError, match="nystrom_rank"):
        Damped(space.metric, 1e-2, nystrom_rank=0)


def test_invariant_trace_unchanged(case):
    space, theta, _ = case
    lam = 1e-2
    values = []
    for rank in (None, 60):
        s = space.with_metric(Damped(space.metric, lam, nystrom_rank=rank, sample_space=False))
        r = cv.flatness(s, theta, measures=("trace",), method="stochastic", num_probes=3,
                        seed=0)
        values.append(r["trace"].value)
    # each solve is exact to cond·1e-10 (cond(G + 1e-2·I) < 1e3 here)
    assert values[1] == pytest.approx(values[0], rel=1e-7, abs=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_data_subsample_keeps_the_scale(reduction):
    # 40 copies of one sample: any subset has the same G iff the weights are rescaled right
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(1, 3, dtype=F64).repeat(40, 1), torch.ones(40, dtype=torch.long)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    space, theta = cv.ParameterSpace.from_module(model, loss, [(X[:25], y[:25]),
                                                               (X[25:], y[25:])], "ggn")
    sub = data_subsample(space.metric, 8)
    assert [len(b[1]) for b in sub.batches] == [5, 3]
    torch.testing.assert_close(sub.dense(theta), space.metric.dense(theta), rtol=1e-12,
                               atol=1e-14)
    assert data_subsample(space.metric, 40) is space.metric
    euclidean = cv.metrics.Euclidean()
    assert data_subsample(euclidean, 8) is euclidean  # no data to draw from


def test_subsampled_build_solves_exactly(case):
    space, theta, G = case
    lam = 1e-2
    A, evals = _damped(G, lam)
    pre = Damped(space.metric, lam, nystrom_rank=80, nystrom_samples=20)
    w = space.grad(theta)
    x, exact = pre.solve(theta, w), torch.linalg.solve(A, w)
    assert float((A @ x - w).norm()) <= 1e-10 * float(w.norm())
    assert float((x - exact).norm()) <= float(evals[-1] / evals[0]) * 1e-10 * float(exact.norm())
