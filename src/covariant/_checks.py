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
>>> try:
...     check_flat(torch.zeros(3, dtype=torch.long), "flatness")
... except Exception as err:
...     print(str(err).split(";")[1].strip())
use p.double() or p.float()
>>> check_k(0, "flatness")
Traceback (most recent call last):
...
ValueError: flatness: k must be a positive integer (the number of eigenvalues), got 0
>>> default_tol(None, torch.float32, 1e-10) == 100 * torch.finfo(torch.float32).eps
True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import NonFiniteError, ShapeMismatchError

__all__ = ["check_finite", "check_flat", "check_k", "check_loss_value", "default_tol",
           "same_point"]

#: What to look at when a loss, gradient or product of a space is not finite.
SPACE_HINT = (
    "Check the point (is it inside every chart's domain?) and the loss (log of 0, overflow)."
)


def same_point(q: Tensor | None, p: Tensor) -> bool:
    """True when ``q`` (a cached point, or None) holds the same values as ``p`` with the same
    shape, dtype and device: the key of every per-point cache (factors, preconditioners)."""
    return q is not None and q.shape == p.shape and q.dtype == p.dtype \
        and q.device == p.device and bool(torch.equal(q, p))


def default_tol(tol: float | None, dtype: torch.dtype, base: float) -> float:
    """``tol`` if given, else ``base`` floored at what ``dtype`` can attain (100·eps)."""
    if tol is not None:
        return float(tol)
    return max(base, 100.0 * torch.finfo(dtype).eps)


def check_flat(
    x: Tensor, owner: str, name: str = "the point p", dim: int | None = None
) -> None:
    """A flat, finite, floating 1-D tensor (of length ``dim`` when given), else a typed error.

    An integer or boolean tensor raises :class:`ShapeMismatchError` (its dtype cannot carry
    a tangent vector or a gradient).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise ShapeMismatchError(
            f"{owner}: {name} has dtype {x.dtype}, a point must be floating; "
            "use p.double() or p.float()"
        )
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


def check_k(k: int, owner: str) -> int:
    """``k`` (a number of eigenvalues) as an int; a ``ValueError`` unless it is an integer ≥ 1."""
    try:
        value = None if isinstance(k, bool) else operator.index(k)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{owner}: k must be a positive integer (the number of eigenvalues), "
                         f"got {k!r}")
    return value


def check_loss_value(loss: Callable[[Tensor], Tensor], p: Tensor, owner: str) -> None:
    """A :class:`NonFiniteError` naming the loss if ``loss(p)`` is NaN or Inf.

    A finite point does not make a finite loss (``log`` of a negative coordinate), and the
    derivatives of a NaN loss can still be finite, so the value itself is checked. Call it
    with a plain tensor point (not inside a ``torch.func`` transform).
    """
    with torch.no_grad():
        value = loss(p.detach())
    if not bool(torch.isfinite(torch.as_tensor(value)).all()):
        raise NonFiniteError(
            f"{owner}: the loss at p is {float(torch.as_tensor(value).reshape(-1)[0])}, not a "
            f"finite number. {SPACE_HINT}"
        )
