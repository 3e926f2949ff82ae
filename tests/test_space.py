"""ParameterSpace as an immutable value: derived spaces keep the model binding."""

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import laplace as cvl
from covariant.layout import ModelBinding


@pytest.fixture
def posterior():
    torch.manual_seed(0)
    X = torch.randn(30, 2, dtype=torch.float64)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    space, theta = cvl.posterior_space(model, (X, y), prior_precision=2.0)
    return space, theta, model, X, y


def test_with_metric_keeps_the_model_posterior(posterior):
    """Before the binding, with_metric dropped the posterior and hessian='ggn' raised."""
    space, theta, *_ = posterior
    other = space.with_metric(cv.metrics.Euclidean())
    assert other.binding is space.binding
    a = cvl.laplace(space, theta, riemannian=False, hessian="ggn")
    b = cvl.laplace(other, theta, riemannian=False, hessian="ggn")
    assert a.log_evidence == pytest.approx(b.log_evidence, rel=1e-12)


def test_reparametrized_space_carries_binding_and_ggn_uses_the_chart(posterior):
    space, theta, *_ = posterior
    scaled = space.reparametrize(cv.reparam.Scale(0.5))
    assert scaled.binding is space.binding
    psi = scaled.chart.inverse(theta)
    # GGN of the composed forward ψ ↦ f(0.5 ψ) is 0.25 × the GGN in θ: a chart-aware build
    G_theta = cv.metrics.GGN.from_space(space).dense(theta)
    G_psi = cv.metrics.GGN.from_space(scaled).dense(psi)
    torch.testing.assert_close(G_psi, 0.25 * G_theta, rtol=1e-12, atol=1e-14)


def test_binding_loss_is_the_full_batch_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    for loss_fn, full in [
        (nn.CrossEntropyLoss(), nn.CrossEntropyLoss()(model(X), y)),
        (nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(reduction="sum")(model(X), y)),
    ]:
        binding, theta = ModelBinding.from_module(model, loss_fn, batches)
        torch.testing.assert_close(binding.loss(theta), full, rtol=1e-13, atol=0)
        space, theta2 = cv.ParameterSpace.from_module(model, loss_fn, batches)
        torch.testing.assert_close(space.loss(theta2), full, rtol=1e-13, atol=0)


def test_with_prior_precision_changes_only_the_prior(posterior):
    space, theta, *_ = posterior
    new = cvl.with_prior_precision(space, 5.0)
    assert new.binding.prior_precision == 5.0 and space.binding.prior_precision == 2.0
    # −log N(θ; 0, λ⁻¹I) differs by ½(5−2)‖θ‖² − ½ d (log 5 − log 2)
    d = theta.shape[0]
    expected = 0.5 * 3.0 * (theta**2).sum() - 0.5 * d * (torch.log(torch.tensor(5.0 / 2.0)))
    torch.testing.assert_close(new.loss(theta) - space.loss(theta), expected.double(),
                               rtol=1e-12, atol=1e-12)


def test_binding_is_frozen_and_checked():
    model = nn.Linear(2, 1)
    data = (torch.randn(3, 2), torch.randn(3, 1))
    binding, _ = ModelBinding.from_module(model, nn.MSELoss(), data)
    with pytest.raises(AttributeError):
        binding.weights = (2.0,)
    with pytest.raises(TypeError, match="ModelBinding"):
        cv.ParameterSpace(lambda p: p.sum(), binding="not a binding")
    with pytest.raises(cv.errors.ShapeMismatchError, match="weights"):
        binding.replace(weights=(0.5, 0.5))
