"""Batched Hessian products (the GPU path of stochastic traces) against the dense Hessian.

``autodiff.hvp_matmat_operator`` runs one batched second backward for a block of probes;
it is used on CUDA only, but its arithmetic is device-independent, so CPU float64 checks it
against ``dense_hessian`` here (benchmarks/gpu_checks.py compares the CUDA run to the CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import autodiff


def _space(kind: str) -> tuple[cv.ParameterSpace, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.randn(12, 5, 4, dtype=torch.float64) if kind == "attention" \
        else torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    elif kind == "batchnorm-train":
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    else:
        model = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0,
                                                         batch_first=True),
                              nn.Flatten(1), nn.Linear(20, 3))
    model = model.double()
    model.train(kind == "batchnorm-train")
    return cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))


@pytest.mark.parametrize("kind", ["mlp", "batchnorm-train", "attention"])
def test_batched_products_equal_the_dense_hessian(kind: str) -> None:
    space, theta = _space(kind)
    V = torch.randn(theta.shape[0], 5, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    H = autodiff.dense_hessian(space.loss_function, theta)
    HV = autodiff.hvp_matmat_operator(space.loss_function, theta)(V)
    assert float((HV - H @ V).norm() / (H @ V).norm()) < 1e-12


def test_a_linear_loss_has_zero_products() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    V = torch.randn(3, 4, dtype=torch.float64)
    out = autodiff.hvp_matmat_operator(lambda p: (w * p).sum(), torch.ones(3,
                                       dtype=torch.float64))(V)
    assert out.shape == (3, 4) and bool((out == 0).all())


@pytest.mark.parametrize(("graph", "free", "k", "want"), [
    (100, 10_000, 1000, 50),      # ⌊0.5 · 10⁴ / 100⌋
    (100, 10_000, 20, 20),        # never more than the probes
    (10**9, 10, 8, 1),            # at least one
    (0, 10_000, 7, 7),            # an empty graph counts as one byte
])
def test_probe_chunk_size(graph: int, free: int, k: int, want: int) -> None:
    assert autodiff.probe_chunk_size(graph, free, k) == want
