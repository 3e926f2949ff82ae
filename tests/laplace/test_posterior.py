"""Model posteriors: the log joint, its binding (the negative log-likelihood), the prior."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from covariant import laplace as cvl
from covariant.errors import ShapeMismatchError
from covariant.reparam import Sinh


def test_prior_precision_argument_and_with_prior_precision(model_problem):
    space, theta, _ = model_problem
    (X, y), = space.binding.batches
    space3, _ = cvl.posterior_space(space.binding.model, (X, y), prior_precision=3.0)
    a = cvl.laplace(space, theta, riemannian=False, prior_precision=3.0).log_evidence
    b = cvl.laplace(space3, theta, riemannian=False).log_evidence
    assert abs(a - b) < 1e-10


def test_the_binding_loss_is_the_negative_log_likelihood(model_problem):
    """space.binding.loss is −log p(D|θ) on the root coordinates, in every chart."""
    space, theta, X = model_problem
    (_, y), = space.binding.batches
    f = space.binding.forward(theta, X)
    nll = float(nn.functional.cross_entropy(f, y, reduction="sum"))
    assert abs(float(space.binding.loss(theta)) - nll) < 1e-12
    prior = float(cvl.gaussian_prior_nll(theta, 1.0))
    assert abs(prior - (0.5 * float(theta @ theta) - 0.5 * len(theta) * (
        -math.log(2 * math.pi)))) < 1e-12
    assert abs(float(space.loss(theta)) - (nll + prior)) < 1e-10
    h = Sinh(1.1, 0.9, 0.05)
    new = space.reparametrize(h)
    assert new.binding is space.binding and new.binding.is_bayesian
    (X_bound, _), = new.binding.batches
    assert X_bound is X


def test_gaussian_likelihood_and_per_coordinate_prior():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 1, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1, generator=g, dtype=torch.float64)
    lam = torch.tensor([2.0, 0.5], dtype=torch.float64)
    space, theta = cvl.posterior_space(nn.Linear(1, 1).double(), (X, y),
                                       likelihood="regression", sigma_noise=0.3,
                                       prior_precision=lam)
    f = space.binding.forward(theta, X)
    nll = 0.5 * float(((f - y) ** 2).sum()) / 0.09 + 5 * math.log(2 * math.pi * 0.09)
    prior = 0.5 * float((lam * theta**2).sum()) - 0.5 * float((lam.log() - math.log(2 * math.pi))
                                                              .sum())
    assert abs(float(space.loss(theta)) - (nll + prior)) < 1e-10
    s2 = cvl.with_prior_precision(space, 4.0)
    prior4 = float(cvl.gaussian_prior_nll(theta, 4.0))
    assert abs(float(s2.loss(theta)) - (nll + prior4)) < 1e-10
    assert s2.binding.prior_precision == 4.0 and space.binding.prior_precision is lam


def test_with_prior_precision_in_a_chart_evaluates_the_prior_at_theta(model_problem):
    space, theta, _ = model_problem
    h = Sinh(1.3, 0.8, 0.0)
    new = space.reparametrize(h)
    psi = h.inverse(theta)
    moved = cvl.with_prior_precision(new, 5.0)
    diff = float(moved.loss(psi) - new.loss(psi))
    expected = float(cvl.gaussian_prior_nll(theta, 5.0) - cvl.gaussian_prior_nll(theta, 1.0))
    assert abs(diff - expected) < 1e-10
    assert moved.chart is new.chart


def test_posterior_space_bad_inputs():
    X = torch.randn(5, 2, dtype=torch.float64)
    model = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="likelihood"):
        cvl.posterior_space(model, (X, torch.zeros(5).long()), likelihood="poisson")
    with pytest.raises(ValueError, match="one"):
        cvl.posterior_space(model, X)
    with pytest.raises(ShapeMismatchError, match="integers"):
        cvl.posterior_space(model, (X, torch.zeros(5, dtype=torch.float64)))
    plain = cvl.posterior_space(model, (X, torch.zeros(5).long()))[0]
    with pytest.raises(ValueError, match="posterior_space"):
        cvl.with_prior_precision(plain.with_binding(None), 2.0)
