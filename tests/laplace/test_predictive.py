"""GLM and Monte Carlo predictives: invariance of the invariant GLM, agreement for a linear
model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covariant import density as cvd
from covariant import laplace as cvl
from covariant.reparam import Sinh

from ._problems import _in_chart, _regression_problem


def test_model_evidence_and_glm_predictive_are_invariant(model_problem):
    space, theta, X = model_problem
    ref = cvl.laplace(space, theta, riemannian=True)
    ref_ggn = cvl.laplace(space, theta, riemannian=True, hessian="ggn")
    d = theta.shape[0]
    h = Sinh(torch.linspace(0.5, 1.2, d, dtype=torch.float64), 1.1, 0.05)
    new, psi = _in_chart(space, theta, h, riemannian=True)
    res = cvl.laplace(new, psi, riemannian=True)
    res_ggn = cvl.laplace(new, psi, riemannian=True, hessian="ggn")
    assert abs(res.log_evidence - ref.log_evidence) < 1e-8 * abs(ref.log_evidence)
    assert abs(res_ggn.log_evidence - ref_ggn.log_evidence) < 1e-8 * abs(ref.log_evidence)
    p_ref = ref.predictive(X[:6])
    p_new = res.predictive(X[:6])
    assert torch.allclose(p_new, p_ref, atol=1e-9)
    assert torch.allclose(p_new.sum(1), torch.ones(6, dtype=torch.float64))
    # the classic version in the same chart differs
    new_c, psi_c = _in_chart(space, theta, h, riemannian=False)
    classic = cvl.laplace(new_c, psi_c, riemannian=False)
    assert abs(classic.log_evidence - ref.log_evidence) > 1e-3
    assert float((classic.predictive(X[:6]) - p_ref).abs().max()) > 1e-4
    # the MC predictive averages the likelihood over posterior draws
    mc = ref.predictive(X[:6], method="mc", n_samples=50, seed=4)
    draws = ref.sample(50, seed=4)
    forward = space.binding.forward
    manual = torch.stack([torch.softmax(forward(q, X[:6]), -1) for q in draws]).mean(0)
    assert torch.allclose(mc, manual, atol=1e-12)


def test_mc_and_glm_predictives_agree_for_a_linear_model():
    """For a model linear in its parameters the GLM is exact: MC over parameters = MC over
    Gaussian logits (link="mc"), up to Monte Carlo error; probit is an approximation of it."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.8 * torch.randn(40, generator=g, dtype=torch.float64) > 0).long()
    model = nn.Linear(2, 2).double()
    space, theta0 = cvl.posterior_space(model, (X, y), prior_precision=1.0)
    theta = cvd.map_estimate(space, theta0, riemannian=False).point
    res = cvl.laplace(space, theta, riemannian=False)
    mc = res.predictive(X[:8], method="mc", n_samples=4000, seed=0)
    glm_mc = res.predictive(X[:8], link="mc", n_samples=4000, seed=1)
    probit = res.predictive(X[:8])
    assert float((mc - glm_mc).abs().max()) < 0.03
    assert float((probit - glm_mc).abs().max()) < 0.06
    mean, var = cvl.laplace(*_regression_problem(), riemannian=False).predictive(X[:3, :1])
    assert mean.shape == (3, 1) and bool((var > 0.25 - 1e-12).all())


def test_glm_regression_variance_is_j_sigma_jt_plus_noise():
    space, theta = _regression_problem()
    res = cvl.laplace(space, theta, riemannian=False)
    X = torch.tensor([[-1.0], [0.5]], dtype=torch.float64)
    mean, var = res.predictive(X)
    J = torch.cat([X, torch.ones(2, 1, dtype=torch.float64)], 1)  # f = w x + b
    assert torch.allclose(var[:, 0], torch.diagonal(J @ res.covariance @ J.T) + 0.25,
                          atol=1e-12)
    assert torch.allclose(mean, space.binding.forward(theta, X))


def test_predictive_needs_a_model_posterior(problem):
    space, theta = problem
    res = cvl.laplace(space, theta, riemannian=False)
    with pytest.raises(ValueError, match="posterior_space"):
        res.predictive(torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="glm"):
        res.predictive(torch.zeros(1, 2, dtype=torch.float64), method="bogus")
