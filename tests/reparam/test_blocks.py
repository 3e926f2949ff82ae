"""Block-diagonal charts by parameter name (names and glob patterns)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv


def test_parameterwise_by_name_and_glob():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y))
    new = space.reparametrize(
        {"*.weight": cv.reparam.WeightNorm(), "2.bias": cv.reparam.Scale(3.0)}
    )
    assert new.layout.names == ("0.weight.g", "0.weight.v", "0.bias", "2.weight.g", "2.weight.v",
                                "2.bias")
    psi = new.chart.inverse(theta)
    assert torch.allclose(new.chart(psi), theta, atol=1e-13)
    assert torch.allclose(new.unflatten(psi)["2.bias"] * 3.0, space.unflatten(theta)["2.bias"])
    assert torch.allclose(new.loss(psi), space.loss(theta), atol=1e-13)
    with pytest.raises(cv.errors.ShapeMismatchError, match="matches no parameter"):
        space.reparametrize({"3.weight": cv.reparam.Exp()})
