"""Batches of a model space average like the full batch; bad models and data get typed errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import covariant as cv


def test_batches_average_like_full_batch():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    full, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    split, _ = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])]
    )
    summed, _ = cv.ParameterSpace.from_module(
        model, nn.CrossEntropyLoss(reduction="sum"), [(X[:4], y[:4]), (X[4:], y[4:])]
    )
    assert torch.allclose(full.loss(theta), split.loss(theta), atol=1e-14)
    assert torch.allclose(full.grad(theta), split.grad(theta), atol=1e-14)
    assert torch.allclose(summed.loss(theta), 10 * full.loss(theta), atol=1e-12)


# ---------------------------------------------------------------- model and data checks (issue 10)
def _mlp(*extra: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *extra, nn.Tanh(), nn.Linear(4, 1)).float()


_GEN = torch.Generator().manual_seed(0)
X3 = torch.randn(10, 3, generator=_GEN, dtype=torch.float32)
Y3 = torch.randn(10, 1, generator=_GEN, dtype=torch.float32)


def test_dtype_mismatch_of_data_or_point_is_a_typed_error():
    from covariant.errors import ShapeMismatchError

    model = _mlp()  # float32
    with pytest.raises(ShapeMismatchError, match=r"float64 but the model's parameters are "
                                                 r"torch.float32.*model.to\(torch.float64\)"):
        cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3.double(), Y3.double()))
    # a float64 point of the float32 model is evaluated in float64 (data, buffers promoted)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3, Y3))
    double, theta64 = cv.ParameterSpace.from_module(copy.deepcopy(model).double(), nn.MSELoss(),
                                                    (X3.double(), Y3.double()))
    assert torch.equal(theta.double(), theta64)
    got = cv.flatness(space, theta.double(), measures=("trace",))["trace"].value
    assert got == cv.flatness(double, theta64, measures=("trace",))["trace"].value
    # integer inputs (token ids) are not checked against the model's dtype
    emb = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(4, 1)).float()
    cv.ParameterSpace.from_module(emb, nn.MSELoss(), (torch.randint(0, 5, (6, 2)), Y3[:6]))


def test_wrong_input_width_or_target_length_is_a_typed_error():
    from covariant.errors import ShapeMismatchError

    model = _mlp()
    with pytest.raises(ShapeMismatchError, match=r"first batch of inputs, X of shape \(10, 5\)"):
        wide = torch.randn(10, 5, dtype=torch.float32)
        cv.ParameterSpace.from_module(model, nn.MSELoss(), (wide, Y3))
    with pytest.raises(ShapeMismatchError, match=r"10 inputs .* but 7 targets"):
        cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3, Y3[:7]))
    with pytest.raises(ShapeMismatchError, match=r"batch 1 has 5 inputs"):
        cv.ParameterSpace.from_module(model, nn.MSELoss(), [(X3[:5], Y3[:5]), (X3[5:], Y3[:3])])


@pytest.mark.parametrize("module", [nn.Dropout(0.5), nn.AlphaDropout(0.2)])
def test_train_mode_randomness_is_refused_until_eval(module):
    """Dropout (and RReLU) in training mode give no single loss: call model.eval()."""
    from covariant.errors import UnsupportedStructureError

    model = _mlp(module)
    assert model.training
    with pytest.raises(UnsupportedStructureError, match=r"call model.eval\(\)"):
        cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3, Y3))
    with pytest.raises(UnsupportedStructureError, match=type(module).__name__):
        cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3, Y3))
    model.eval()
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3, Y3))
    trace = cv.flatness(space, theta, measures=("trace",))["trace"].value
    assert math.isfinite(trace)


@pytest.mark.parametrize("module", [nn.Dropout(0.0), nn.BatchNorm1d(4, track_running_stats=False),
                                    nn.BatchNorm1d(4)])
def test_deterministic_train_mode_is_accepted(module):
    """Dropout with p = 0 is the identity, batch norm in training mode (with or without running
    statistics) a function of the batch: nothing to refuse in training mode."""
    model = _mlp(module)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X3, Y3))
    want = nn.MSELoss()(model(X3), Y3)
    assert torch.allclose(space.loss(theta), want)
    assert math.isfinite(cv.flatness(space, theta, measures=("trace",))["trace"].value)


class _FunctionalDropout(nn.Module):
    """Dropout called as a function, with training=True hard-wired: no module shows it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(nn.functional.dropout(x, p=0.5, training=True))


def test_a_random_forward_without_a_dropout_module_is_detected():
    from covariant.errors import UnsupportedStructureError

    model = _FunctionalDropout().double().eval()  # eval() cannot switch this dropout off
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    with pytest.raises(UnsupportedStructureError, match="forward is random"):
        cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))


class _DrawsButIgnores(nn.Module):
    """Draws random numbers and multiplies them by 0: deterministic, but it uses the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x + 0.0 * torch.rand_like(x))


def test_the_determinism_check_leaves_the_users_random_stream_alone():
    model = _DrawsButIgnores().double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    assert torch.equal(torch.rand(3), expected)
