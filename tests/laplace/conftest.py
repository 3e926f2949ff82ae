"""Fixtures of the Laplace tests: the 2-D log joint at its MAP, a small classifier posterior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import density as cvd
from covariant import laplace as cvl

from ._problems import _log_joint, _t


@pytest.fixture(scope="module")
def problem():
    space = cv.ParameterSpace.from_log_prob(_log_joint)
    theta = cvd.map_estimate(space, _t([0.5, 0.0]), riemannian=False).point
    return space, theta


@pytest.fixture(scope="module")
def model_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.7 * torch.randn(30, generator=g, dtype=torch.float64)
         > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    space, theta0 = cvl.posterior_space(model, (X, y), prior_precision=1.0)
    theta = cvd.map_estimate(space, theta0, riemannian=False).point
    return space, theta, X
