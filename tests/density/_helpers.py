"""Shared fixtures of the density tests: float64 tensors, the log-normal space, a dense field."""

from __future__ import annotations

import math

import torch

import covariant as cv
from covariant.metrics import Dense


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def _lognormal_space():
    normal = torch.distributions.Normal(_t(0.5), _t(0.8))
    return cv.ParameterSpace.from_log_prob(lambda x: normal.log_prob(x).sum())


def _dense_field(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    B = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)

    def G(p):
        M = A + torch.diag(torch.tanh(p)) @ B
        return M @ M.T + torch.eye(d, dtype=p.dtype) + torch.diag(p**2)

    return Dense(G), 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
