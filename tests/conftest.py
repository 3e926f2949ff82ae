"""Shared fixtures: float64 everywhere, the reference problem of docs/math.md §8
(:mod:`covariant.zoo.problems`)."""

from __future__ import annotations

import pytest
import torch

import covariant as cv
from covariant.zoo.problems import ReferenceChart, reference_h, reference_loss, reference_phi

__all__ = ["PhiChart", "phi_chart_from_functions", "reference_loss"]


#: h = φ⁻¹ with closed-form Jacobian products (its own jvp / vjp / log-det).
PhiChart = ReferenceChart


def phi_chart_from_functions() -> cv.reparam.FromFunctions:
    """The same chart as a user would write it with FromFunctions (autodiff Jacobians)."""
    return cv.reparam.FromFunctions(reference_h, reference_phi)


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
