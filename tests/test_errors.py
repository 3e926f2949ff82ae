"""Bad input gets a clear, typed error that names the parameter and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import errors


def test_point_outside_chart_domain():
    with pytest.raises(errors.DomainError, match="theta must be > 0"):
        cv.reparam.Exp().inverse(torch.tensor([1.0, -2.0]))
    with pytest.raises(errors.DomainError, match="psi must be > 0"):
        cv.reparam.Log()(torch.tensor([-1.0]))
    h = cv.reparam.WeightNorm((2, 2))
    with pytest.raises(errors.DomainError, match="zero norm"):
        h(torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 2.0]))
    with pytest.raises(errors.DomainError, match="gain g is zero"):
        h(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 2.0]))
    with pytest.raises(errors.DomainError, match="slice of w is zero"):
        h.inverse(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    with pytest.raises(errors.DomainError, match="radius"):
        cv.reparam.Polar()(torch.tensor([-1.0, 0.3]))


def test_domain_error_names_the_parameter_in_module_spaces():
    model = nn.Sequential(nn.Linear(2, 2)).double()
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y))
    new = space.reparametrize({"0.bias": cv.reparam.Exp()})
    with pytest.raises(errors.DomainError, match="'0.bias'"):
        new.chart.inverse(torch.tensor([1.0, 1.0, 1.0, 1.0, -0.5, 0.5], dtype=torch.float64))


def test_non_finite_point_and_loss():
    space = cv.ParameterSpace(lambda p: (p.log()).sum())
    with pytest.raises(errors.NonFiniteError, match="point p"):
        space.loss(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(errors.NonFiniteError, match="loss"):
        space.loss(torch.tensor([-1.0, 1.0]))
    with pytest.raises(errors.NonFiniteError):
        cv.reparam.Exp()(torch.tensor([float("inf")]))


def test_shape_mismatch():
    with pytest.raises(errors.ShapeMismatchError, match="flat 1-D"):
        cv.reparam.Exp()(torch.ones(2, 2))
    h = cv.reparam.WeightNorm((2, 3))
    with pytest.raises(errors.ShapeMismatchError, match="expected 2 gains"):
        h(torch.ones(7))
    model = nn.Sequential(nn.Linear(2, 3))
    X, y = torch.randn(4, 2), torch.randn(4, 3)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y))
    with pytest.raises(errors.ShapeMismatchError, match=r"built for shape \(5, 5\)"):
        space.reparametrize({"0.weight": cv.reparam.WeightNorm((5, 5))})
    with pytest.raises(errors.ShapeMismatchError, match="this space has 9"):
        space.loss(torch.ones(8))
    with pytest.raises(errors.ShapeMismatchError, match="parameter layout"):
        cv.ParameterSpace(lambda p: p.sum()).reparametrize({"w": cv.reparam.Exp()})


def test_singular_metric_points_to_damping_or_submersion():
    with pytest.raises(errors.SingularMetricError, match="Damped"):
        cv.metrics.Constant(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    singular = cv.metrics.Dense(lambda p: torch.outer(p, p))
    space = cv.ParameterSpace(lambda p: (p**2).sum(), singular)
    p = torch.tensor([1.0, 2.0])
    with pytest.raises(errors.SingularMetricError, match="submersion"):
        space.riemannian_grad(p)
    with pytest.raises(errors.SingularMetricError):
        cv.flatness(space, p, measures=("trace",))
    with pytest.raises(errors.SingularMetricError, match="pseudo_logdet"):
        cv.metrics.Pullback(cv.metrics.Euclidean(), cv.reparam.WeightNorm((1, 2))).logdet(
            torch.tensor([1.0, 1.0, 1.0])
        )
    # damping fixes it, and the answer is finite and exact
    damped = space.with_metric(cv.metrics.Damped(singular, 0.5))
    r = damped.riemannian_grad(p)
    G = torch.outer(p, p) + 0.5 * torch.eye(2)
    assert torch.allclose(r, torch.linalg.solve(G, 2 * p), atol=1e-10)


def test_dense_request_too_large():
    space = cv.ParameterSpace(lambda p: (p**2).sum(), max_dense_dim=10)
    with pytest.raises(errors.DenseTooLargeError, match="matrix-free"):
        space.hessian(torch.ones(11))
    with pytest.raises(errors.DenseTooLargeError, match="stochastic"):
        cv.flatness(space, torch.ones(11))
    with pytest.raises(errors.DenseTooLargeError):
        cv.metrics.Diagonal(torch.ones(5000)).dense(torch.ones(5000))


def test_density_through_a_submersion():
    space = cv.ParameterSpace.from_log_prob(lambda w: -(w**2).sum())
    with pytest.raises(errors.NotABijectionError, match="no log\\|det J\\|"):
        space.reparametrize(cv.reparam.WeightNorm((2, 2)))
    with pytest.raises(errors.NotABijectionError):
        cv.density.pushforward_log_prob(lambda w: -(w**2).sum(), cv.reparam.WeightNorm((2, 2)))
    with pytest.raises(errors.NotABijectionError):
        cv.reparam.WeightNorm((2, 2)).log_abs_det_jacobian(torch.ones(6))


def test_errors_are_also_builtin_exceptions():
    assert issubclass(errors.DomainError, ValueError)
    assert issubclass(errors.DenseTooLargeError, MemoryError)
    assert issubclass(errors.NotConvergedError, RuntimeError)
