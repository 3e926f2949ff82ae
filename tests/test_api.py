"""The public names of docs/api.md are a contract: each resolves, and the central example gives
its closed-form numbers (trace of G⁻¹Hess is chart-independent; the naive one is not)."""

from __future__ import annotations

import importlib

import pytest
import torch

import covariant as cv

CONTRACT = {
    "covariant.reparam": ["Reparametrization", "FromFunctions", "Exp", "Softplus", "Scale",
                          "Affine", "WeightNorm", "Polar", "Compose", "from_parametrization",
                          "from_transform"],
    "covariant.metrics": ["Metric", "Euclidean", "Constant", "Diagonal", "Dense", "Pullback",
                          "GGN", "Fisher", "EmpiricalFisher", "AdamMetric", "Damped"],
    "covariant.optim": ["RiemannianGD", "riemannian_gd", "gradient_flow"],
    "covariant.density": ["pushforward_log_prob", "riemannian_log_prob", "map_estimate"],
    "covariant.laplace": ["laplace", "posterior_space"],
    "covariant": ["ParameterSpace", "flatness", "check_invariance", "check_gradient",
                  "check_hessian", "check_chart"],
}
SPACE_METHODS = ["loss", "grad", "riemannian_grad", "hvp", "hessian", "christoffel",
                 "shape_operator", "exp", "reparametrize", "with_metric", "unflatten",
                 "from_log_prob", "from_module"]


@pytest.mark.parametrize("module", list(CONTRACT))
def test_contract_names_resolve(module):
    mod = importlib.import_module(module)
    missing = [n for n in CONTRACT[module] if not hasattr(mod, n)]
    assert missing == []


def test_space_methods_and_the_central_example():
    assert all(hasattr(cv.ParameterSpace, m) for m in SPACE_METHODS)
    space = cv.ParameterSpace(lambda p: p[0] ** 2 + 3 * p[1] ** 2)        # G = I in θ
    p = torch.tensor([0.5, -0.2], dtype=torch.float64)
    squeezed = space.reparametrize(cv.reparam.Scale(0.1))                # θ = 0.1 ψ
    psi = squeezed.chart.inverse(p)
    assert cv.flatness(space, p)["trace"].value == pytest.approx(8.0, abs=1e-12)
    assert cv.flatness(squeezed, psi)["trace"].value == pytest.approx(8.0, abs=1e-12)
    naive = squeezed.with_metric(cv.metrics.Euclidean())
    assert cv.flatness(naive, psi)["trace"].value == pytest.approx(0.08, abs=1e-12)
