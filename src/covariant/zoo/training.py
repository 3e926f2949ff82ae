"""Plain, deterministic training and evaluation of classifiers (cross-entropy).

This is the everyday baseline that experiments start from: a seeded mini-batch loop with
Adam, AdamW or SGD. The Riemannian optimizers live in :mod:`covariant.optim`.

Example
-------
>>> import torch
>>> from covariant.zoo.data import make_synthetic_classification
>>> from covariant.zoo.architectures import build
>>> ds = make_synthetic_classification(200, 4, 2, seed=0)
>>> _ = torch.manual_seed(0)
>>> model = build("mlp", 4, 2, hidden=(16,))
>>> losses = train_classifier(model, ds.X_train, ds.y_train, epochs=5, lr=1e-2)
>>> len(losses), losses[-1] < losses[0]
(5, True)
>>> accuracy(model, ds.X_test, ds.y_test) > 0.8
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress_bar
from ..errors import NonFiniteError, ShapeMismatchError

__all__ = ["OPTIMIZERS", "accuracy", "evaluate", "train_classifier"]

OPTIMIZERS = ("adam", "adamw", "sgd")
"""Optimizer names accepted by :func:`train_classifier`."""


def _reference_param(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def _prepare(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Check shapes and labels; move ``X``/``y`` to the model's device and ``X`` to its dtype."""
    if X.shape[0] != y.shape[0]:
        raise ShapeMismatchError(f"X has {X.shape[0]} examples but y has {y.shape[0]}")
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ShapeMismatchError(
            f"y must be a 1-D tensor of integer class labels, got shape {tuple(y.shape)} "
            f"and dtype {y.dtype}"
        )
    p = _reference_param(model)
    if p is not None:
        X = X.to(device=p.device, dtype=p.dtype if X.is_floating_point() else X.dtype)
        y = y.to(p.device)
    return X, y.long()


def _check_positive(*, epochs: int, batch_size: int) -> None:
    if epochs < 0:
        raise ValueError(f"epochs={epochs} must be non-negative")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")


def _make_optimizer(
    name: str, params, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    key = name.lower()
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
           order: torch.Tensor, batch_size: int) -> float:
    """One pass over the examples in ``order``, in mini-batches; the mean loss as seen."""
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for idx in torch.split(order, batch_size):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.detach().to(torch.float64) * idx.numel()
    return float(total) / X.shape[0]


def _fit(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, *,
         epochs: int, batch_size: int, seed: int, progress: bool, what: str) -> list[float]:
    """The epochs of :func:`train_classifier`: seeded orders, in-model randomness forked and
    seeded, the model's mode restored; the mean loss of each epoch."""
    n = X.shape[0]
    order_gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            bar = progress_bar(range(epochs), enabled=progress, total=epochs, desc="train")
            for epoch in bar:
                order = torch.randperm(n, generator=order_gen).to(X.device)
                mean = _epoch(model, opt, X, y, order, batch_size)
                if not math.isfinite(mean):
                    raise NonFiniteError(
                        f"training loss became {mean} in epoch {epoch} with {what}; "
                        "lower lr or check the inputs for NaN/Inf"
                    )
                losses.append(mean)
                bar.set_postfix(loss=f"{mean:.4f}")
    finally:
        model.train(was_training)
    return losses


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    optimizer: str = "adam",
    seed: int = 0,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place by mini-batch cross-entropy minimisation.

    Each epoch visits every example once in an order drawn from a private generator seeded
    with ``seed``. Randomness inside the model (e.g. dropout) uses the global RNG forked and
    seeded with ``seed``, so the global state is unchanged afterwards. The same model
    initialisation, data and settings therefore give the same losses and weights.

    Parameters
    ----------
    model : nn.Module
        Maps ``X`` to logits ``(N, C)``; trained in place and left in its previous mode.
    X : torch.Tensor
        Inputs; floating inputs are cast to the dtype of the model's parameters.
    y : torch.Tensor
        Integer class labels of shape ``(N,)``.
    epochs : int, default 20
        Number of passes over the data.
    lr : float, default 1e-3
        Learning rate.
    batch_size : int, default 128
        Mini-batch size (the last batch of an epoch may be smaller).
    optimizer : {"adam", "adamw", "sgd"}, default "adam"
        The ``torch.optim`` optimizer.
    seed : int, default 0
        Seed of the shuffling (and of in-model randomness).
    weight_decay : float, default 0.0
        Weight decay passed to the optimizer.
    momentum : float, default 0.0
        Momentum of SGD (ignored by Adam/AdamW).
    progress : bool, default False
        Show a progress bar over epochs (needs tqdm).

    Returns
    -------
    list of float
        Mean training loss of each epoch, averaged over examples as seen during the epoch.

    Raises
    ------
    covariant.errors.NonFiniteError
        If the loss becomes NaN or infinite (lower ``lr``).

    Example
    -------
    >>> _ = torch.manual_seed(0)
    >>> m = nn.Linear(2, 2)
    >>> X, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    >>> len(train_classifier(m, X, y, epochs=3, lr=0.1, optimizer="sgd"))
    3
    """
    _check_positive(epochs=epochs, batch_size=batch_size)
    X, y = _prepare(model, X, y)
    n = X.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = _make_optimizer(optimizer, params, lr, weight_decay, momentum)
    return _fit(model, opt, X, y, epochs=epochs, batch_size=batch_size, seed=seed,
                progress=progress, what=f"lr={lr} and optimizer={optimizer!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096
) -> dict[str, float]:
    """Mean cross-entropy (``"nll"``) and ``"accuracy"`` of ``model`` on ``(X, y)``.

    Runs in eval mode without gradients, in chunks of ``batch_size``; the model's mode is
    restored afterwards.

    Example
    -------
    >>> m = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = m.weight.copy_(torch.eye(2)), m.bias.zero_()
    >>> evaluate(m, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))["accuracy"]
    0.5
    """
    X, y = _prepare(model, X, y)
    n = X.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    try:
        nll = 0.0
        correct = 0
        for start in range(0, n, batch_size):
            logits = model(X[start:start + batch_size])
            yb = y[start:start + batch_size]
            nll += float(F.cross_entropy(logits, yb, reduction="sum").to(torch.float64))
            correct += int((logits.argmax(-1) == yb).sum())
    finally:
        model.train(was_training)
    return {"nll": nll / n, "accuracy": correct / n}


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of examples whose arg-max logit equals the label.

    Example
    -------
    >>> accuracy(nn.Identity(), torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5
    """
    return evaluate(model, X, y)["accuracy"]
