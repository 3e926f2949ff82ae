"""Shared problems of the Laplace tests: a non-Gaussian 2-D log joint, charts, models."""

from __future__ import annotations

import torch
from torch import nn

from covariant import density as cvd
from covariant import laplace as cvl
from covariant.reparam import Affine, Compose, Sinh


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def _log_joint(theta):
    """A non-Gaussian 2-D log joint (unnormalized), so that chart effects are visible."""
    m = _t([0.8, -0.3])
    P = _t([[2.0, 0.6], [0.6, 1.5]])
    d = theta - m
    return -0.5 * d @ P @ d - 0.1 * (theta**4).sum() + 0.3 * torch.sin(theta[0]) + 1.7


CHARTS = {
    "sinh": lambda: Sinh(_t([0.9, 1.3]), _t([1.2, 0.8]), _t([0.1, -0.2])),
    "affine∘sinh": lambda: Compose(Affine(_t([[1.0, 0.4], [-0.3, 1.2]]), _t([0.2, 0.1])),
                                   Sinh(0.8, 1.1)),
}


def _in_chart(space, theta, h, riemannian):
    new = space.reparametrize(h)
    psi = cvd.map_estimate(new, h.inverse(theta), riemannian=riemannian).point
    return new, psi


def _regression_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(25, 1, generator=g, dtype=torch.float64)
    y = 0.8 * X + 0.5 * torch.randn(25, 1, generator=g, dtype=torch.float64)
    space, theta0 = cvl.posterior_space(nn.Linear(1, 1).double(), (X, y),
                                        likelihood="regression", sigma_noise=0.5)
    return space, cvd.map_estimate(space, theta0, riemannian=False).point
