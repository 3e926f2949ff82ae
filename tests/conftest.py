"""Shared fixtures: float64 everywhere, the reference problem of MATH.md §8."""

from __future__ import annotations

import pytest
import torch

import covariant as cv


def reference_loss(p: torch.Tensor) -> torch.Tensor:
    """L(x, y) = (x² + 2y² − 1)² + 0.3 sin 2x + 0.1 xy (MATH.md §8)."""
    x, y = p[0], p[1]
    return (x**2 + 2 * y**2 - 1) ** 2 + 0.3 * torch.sin(2 * x) + 0.1 * x * y


def _phi(theta: torch.Tensor) -> torch.Tensor:
    """ψ = φ(θ) = (x + 0.2x³, y + 0.5 sin x)."""
    x, y = theta[0], theta[1]
    return torch.stack([x + 0.2 * x**3, y + 0.5 * torch.sin(x)])


def _phi_inverse(psi: torch.Tensor) -> torch.Tensor:
    """h = φ⁻¹ by Newton's method on the monotone cubic x + 0.2x³ = u."""
    u = psi[0]
    x = u / (1 + 0.2 * u**2)
    for _ in range(40):
        x = x - (x + 0.2 * x**3 - u) / (1 + 0.6 * x**2)
    return torch.stack([x, psi[1] - 0.5 * torch.sin(x)])


class PhiChart(cv.reparam.Reparametrization):
    """h = φ⁻¹ through the implicit function theorem (independent of FromFunctions)."""

    def forward(self, psi):
        # Newton's map N(θ, ψ) = θ − J_φ(θ)⁻¹ (φ(θ) − ψ) has ∂N/∂θ = 0 at the solution, so
        # three steps from a detached solution carry exact derivatives up to third order.
        theta = _phi_inverse(psi).detach()
        for _ in range(3):
            theta = theta - torch.linalg.solve(torch.func.jacfwd(_phi)(theta), _phi(theta) - psi)
        return theta

    def _inverse(self, theta):
        return _phi(theta)


def phi_chart_from_functions() -> cv.reparam.FromFunctions:
    """The same chart as a user would write it with FromFunctions."""
    return cv.reparam.FromFunctions(_phi_inverse, _phi)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's problems are tiny: one thread avoids oversubscription on 2-core CI."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def reference_space() -> cv.ParameterSpace:
    return cv.ParameterSpace(reference_loss)
