"""Operator types and the checks shared by the matrix-free solvers.

An *operator* is a callable ``matvec(v) -> A v`` on flat 1-D tensors of length ``dim``
(:data:`Matvec`), optionally with a block form ``matmat(V) -> A V`` on ``(dim, b)`` blocks
(:data:`Matmat`). The helpers here check what operators return and apply them to blocks.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
>>> X = torch.eye(3, dtype=torch.float64)[:, :2]
>>> _apply_block(lambda v: A @ v, None, X).tolist()
[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_finite
from ..errors import ShapeMismatchError

Matvec = Callable[[Tensor], Tensor]
"""A linear operator as a callable on flat 1-D tensors: ``v ↦ A v``."""

Matmat = Callable[[Tensor], Tensor]
"""A linear operator applied to the columns of a ``(dim, b)`` block: ``V ↦ A V``."""

_DAMPING_HINT = (
    "Damp the metric in a way that keeps invariance, e.g. "
    "covariant.metrics.Damped(G, lam, reference=...), or, for a submersion chart, work with the "
    "pseudo-inverse on the horizontal space (docs/math.md §5)."
)


def _check_dim(dim: int) -> int:
    """``dim`` as an ``int``; a ``ValueError`` unless it is a positive integer."""
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}.")
    return int(dim)


def _check_vector(y: Tensor, dim: int, who: str) -> Tensor:
    """``y`` itself; a ``ShapeMismatchError`` naming ``who`` unless it has shape ``(dim,)``."""
    if not isinstance(y, Tensor) or y.shape != (dim,):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ShapeMismatchError(
            f"{who} must return a flat tensor of shape ({dim},), got {shape}. Operators in "
            "covariant.linalg act on flat 1-D vectors."
        )
    return y


#: What to look at when an operator returns NaN or Inf.
OPERATOR_HINT = (
    "Check the operator (loss, Hessian-vector product, metric solve) at this point."
)


def _check_finite(t: Tensor, what: str) -> None:
    """A ``NonFiniteError`` naming ``what`` if ``t`` holds NaN or Inf."""
    check_finite(t, what, OPERATOR_HINT)


def _apply_block(
    matvec: Matvec,
    matmat: Matmat | None,
    X: Tensor,
    bar: Any = None,
) -> Tensor:
    """``A X`` for a ``(dim, b)`` block, by ``matmat`` when given, else column by column.

    The result is detached: estimators are not differentiated through, and keeping the
    autograd graphs of many Hessian-vector products alive would waste memory.
    """
    dim, b = X.shape
    if matmat is not None:
        Y = matmat(X)
        if not isinstance(Y, Tensor) or Y.shape != (dim, b):
            shape = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ShapeMismatchError(
                f"matmat must map a ({dim}, {b}) block to a ({dim}, {b}) block, got {shape}."
            )
        if bar is not None:
            bar.update(b)
        return Y.detach()
    cols = []
    for i in range(b):
        cols.append(_check_vector(matvec(X[:, i].contiguous()), dim, "matvec").detach())
        if bar is not None:
            bar.update(1)
    return torch.stack(cols, dim=1)
