"""Small full-batch training helpers for the network parts (c)-(f): MNIST-1D, an MLP, the
trajectory of its effective weights, and the charts (weight norm, per-layer scales) as
``torch.nn.utils.parametrize`` parametrizations.

Example
-------
>>> model = mlp([4], seed=0)
>>> weight_names(model), float(weights(model, weight_names(model)).numel())
(['0.weight', '0.bias', '2.weight', '2.bias'], 214.0)
>>> scaled = with_scales(model, [2.0, 0.5])
>>> bool(torch.equal(weights(scaled, weight_names(model)), weights(model, weight_names(model))))
True
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from ..._progress import progress_bar
from ...zoo.architectures import MLP
from ...zoo.data import load_mnist1d

__all__ = ["DT", "accuracy", "dataset", "dist_curve", "mlp", "train", "weight_names", "weights",
           "with_scales", "with_weight_norm"]

DT = torch.float64


def dataset(num_samples: int, seed: int, cache: Path | None) -> tuple[Tensor, ...]:
    """MNIST-1D in float64 (drawn with seed ``42 + seed``): ``X, y, X_test, y_test``."""
    ds = load_mnist1d(num_samples, seed=42 + seed, dtype=DT, cache_dir=cache)
    return ds.X_train, ds.y_train, ds.X_test, ds.y_test


def mlp(hidden: list[int], seed: int) -> nn.Sequential:
    """A float64 tanh MLP 40-hidden-10, initialized with ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return MLP(40, 10, hidden=tuple(hidden), activation="tanh").to(DT)


def weights(model: nn.Module, names: list[str]) -> Tensor:
    """The effective tensors (parametrized weights included), flat, in the order ``names``."""
    parts = []
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        parts.append(getattr(model.get_submodule(mod_name), attr).detach().reshape(-1))
    return torch.cat(parts)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: Tensor,
    y: Tensor,
    steps: int,
    names: list[str],
    *,
    progress: bool = False,
    desc: str = "",
) -> dict[str, Any]:
    """Full-batch training; returns the loss after every step and the w-trajectory."""
    loss_fn = nn.CrossEntropyLoss()
    traj = [weights(model, names)]
    losses = []
    with torch.no_grad():
        losses.append(float(loss_fn(model(X), y)))
    for _ in progress_bar(range(steps), enabled=progress, desc=desc):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        traj.append(weights(model, names))
        with torch.no_grad():
            losses.append(float(loss_fn(model(X), y)))
    return {"loss": losses, "traj": torch.stack(traj)}


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of correct arg-max predictions."""
    with torch.no_grad():
        return float((model(X).argmax(-1) == y).to(DT).mean())


def weight_names(model: nn.Module) -> list[str]:
    """The parameter names of the model in w (its effective tensors after any chart)."""
    return [n for n, _ in model.named_parameters()]


def with_weight_norm(model: nn.Module) -> nn.Module:
    """A copy with every Linear weight in the weight-norm chart (g, v), row-wise."""
    new = copy.deepcopy(model)
    for module in new.modules():
        if isinstance(module, nn.Linear):
            weight_norm(module, dim=0)
    return new


class _Scale(nn.Module):
    """W = s · Ω as a ``torch.nn.utils.parametrize`` parametrization."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = float(s)

    def forward(self, omega: Tensor) -> Tensor:
        return self.s * omega

    def right_inverse(self, w: Tensor) -> Tensor:
        return w / self.s


def with_scales(model: nn.Module, scales: list[float]) -> nn.Module:
    """A copy with Linear weight l written as W_l = scales[l] · Ω_l."""
    new = copy.deepcopy(model)
    linears = [m for m in new.modules() if isinstance(m, nn.Linear)]
    for module, s in zip(linears, scales, strict=True):
        parametrize.register_parametrization(module, "weight", _Scale(s))
    return new


def dist_curve(a: Tensor, b: Tensor) -> list[float]:
    """‖a_k − b_k‖ for every step k of two trajectories."""
    return torch.linalg.vector_norm(a - b, dim=1).tolist()
