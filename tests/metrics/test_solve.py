"""The generic Metric.solve: a cached dense factor for small d, conjugate gradients above."""

import pytest
import torch

from covariant.metrics import Damped, Euclidean, Metric, base

F64 = torch.float64


class Counting(Metric):
    """G(p) = A + diag(p²) with only matvec defined, counting its products."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.products = A, 0

    def matvec(self, p, v):
        self.products += 1
        return self.A @ v + p**2 * v


@pytest.fixture
def metric():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=F64)
    return Counting(B @ B.T + torch.eye(6, dtype=F64))


def test_small_metrics_solve_from_one_dense_factor_per_point(metric):
    p = torch.linspace(-1, 1, 6, dtype=F64)
    G = metric.A + torch.diag(p**2)
    W = torch.randn(6, 5, dtype=F64)
    for j in range(5):
        torch.testing.assert_close(metric.solve(p, W[:, j]), torch.linalg.solve(G, W[:, j]),
                                   rtol=1e-12, atol=1e-12)
    first = metric.products
    assert first <= 6 * 2  # one dense build (d products, vmapped), not CG per right-hand side
    metric.solve(p, W[:, 0])
    assert metric.products == first  # the factor is reused at the same point
    q = p + 0.1
    metric.solve(q, W[:, 0])
    assert metric.products > first  # a new point builds a new factor


def test_above_the_limit_conjugate_gradients_run(metric, monkeypatch):
    monkeypatch.setattr(base, "DENSE_SOLVE_DIM", 3)
    p = torch.linspace(-1, 1, 6, dtype=F64)
    w = torch.ones(6, dtype=F64)
    x = metric.solve(p, w)
    torch.testing.assert_close(x, torch.linalg.solve(metric.A + torch.diag(p**2), w),
                               rtol=1e-8, atol=1e-10)


def test_damped_dense_is_the_sum_of_parts(metric):
    p = torch.linspace(-1, 1, 6, dtype=F64)
    D = Damped(metric, 0.3, Euclidean())
    torch.testing.assert_close(D.dense(p), metric.A + torch.diag(p**2) + 0.3 * torch.eye(6,
                               dtype=F64), rtol=1e-14, atol=1e-14)
