"""Batches of a model space: a list of batches averages like the full batch."""

from __future__ import annotations

import torch
from torch import nn

import covariant as cv


def test_batches_average_like_full_batch():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    full, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    split, _ = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])]
    )
    summed, _ = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(reduction="sum"), [(X[:4], y[:4]), (X[4:], y[4:])]
    )
    assert torch.allclose(full.loss(theta), split.loss(theta), atol=1e-14)
    assert torch.allclose(full.grad(theta), split.grad(theta), atol=1e-14)
    assert torch.allclose(summed.loss(theta), 10 * full.loss(theta), atol=1e-12)
