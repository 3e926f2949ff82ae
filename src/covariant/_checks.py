"""Input checks and default tolerances: one copy of each, used across the package.

Every check raises a typed error from :mod:`covariant.errors` that names the caller
(``owner``) and what was wrong, so the message says where to look.

Example
-------
>>> import torch
>>> from covariant._checks import check_flat, default_tol
>>> check_flat(torch.zeros(3), "flatness", dim=3)
>>> try:
...     check_flat(torch.zeros(2, 2), "flatness")
... except Exception as err:
...     print(type(err).__name__)
ShapeMismatchError
>>> default_tol(None, torch.float32, 1e-10) == 100 * torch.finfo(torch.float32).eps
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import NonFiniteError, ShapeMismatchError

__all__ = ["check_finite", "check_flat", "default_tol"]

#: What to look at when a loss, gradient or product of a space is not finite.
SPACE_HINT = (
    "Check the point (is it inside every chart's domain?) and the loss (log of 0, overflow)."
)


def default_tol(tol: float | None, dtype: torch.dtype, base: float) -> float:
    """``tol`` if given, else ``base`` floored at what ``dtype`` can attain (100·eps)."""
    if tol is not None:
        return float(tol)
    return max(base, 100.0 * torch.finfo(dtype).eps)


def check_flat(
    x: Tensor, owner: str, name: str = "the point p", dim: int | None = None
) -> None:
    """A flat, finite 1-D tensor (of length ``dim`` when given), else a typed error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 1:
        raise ShapeMismatchError(
            f"{owner}: {name} must be a flat 1-D tensor (one coordinate vector), "
            f"got shape {tuple(x.shape)}; use x.reshape(-1)"
        )
    if dim is not None and x.shape[0] != dim:
        raise ShapeMismatchError(
            f"{owner}: {name} has {x.shape[0]} coordinates, this space has {dim}"
        )
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{owner}: {name} contains NaN or Inf")


def check_finite(x: Tensor, what: str, hint: str = SPACE_HINT) -> Tensor:
    """``x`` itself; a :class:`NonFiniteError` naming ``what`` if it holds NaN or Inf."""
    # fast path: a finite sum proves every entry finite; only NaN/Inf or an overflowing sum
    # needs the elementwise test
    if math.isfinite(float(x.detach().sum())):
        return x
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} is NaN or Inf. {hint}")
    return x
