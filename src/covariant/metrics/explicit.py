r"""Metrics given explicitly as a field of the point: a diagonal and a dense SPD matrix.

:class:`Diagonal` is G(p) = diag(d(p)) (a tensor, or a differentiable function of p), with
closed-form solves, log-determinants and inverse square roots; :class:`Dense` is a small dense
SPD matrix function G(p) = fn(p), solved by Cholesky. Both are re-exported by
:mod:`covariant.metrics`.

Example
-------
>>> import torch
>>> G = Diagonal(lambda p: 1 + p ** 2)
>>> p = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> G.solve(p, torch.tensor([2.0, 5.0], dtype=torch.float64))
tensor([1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteError, ShapeMismatchError, SingularMetricError
from .base import SINGULAR_HINT, Metric, check_dense_size, cholesky_or_raise

__all__ = ["Dense", "Diagonal"]


class Diagonal(Metric):
    """G(p) = diag(d(p)) from a tensor or a function of the point.

    Parameters
    ----------
    fn_or_tensor : Tensor or callable
        The diagonal, or ``p -> diagonal`` (differentiable torch code).
    """

    def __init__(self, fn_or_tensor: Tensor | Callable[[Tensor], Tensor]) -> None:
        if callable(fn_or_tensor) and not isinstance(fn_or_tensor, Tensor):
            self._fn: Callable[[Tensor], Tensor] = fn_or_tensor
            self.is_constant = False
        else:
            diag = torch.as_tensor(fn_or_tensor)
            if diag.ndim != 1:
                raise ShapeMismatchError("Diagonal: the diagonal must be a 1-D tensor")
            if not bool((diag > 0).all()):
                raise SingularMetricError(
                    "Diagonal: every diagonal entry must be > 0. " + SINGULAR_HINT
                )
            self._fn = lambda p: diag.to(p)
            self.is_constant = True

    def diagonal(self, p: Tensor) -> Tensor:
        return self._fn(p)

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self._fn(p) * v

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        d = self._fn(p)
        if not bool((d > 0).all()):
            raise SingularMetricError(
                f"Diagonal.solve: {int((d <= 0).sum())} diagonal entries are <= 0. "
                + SINGULAR_HINT
            )
        return w / d

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        check_dense_size(p.shape[0], "Diagonal.dense", max_dim)
        return torch.diag(self._fn(p))

    def logdet(self, p: Tensor) -> Tensor:
        d = self._fn(p)
        if not bool((d > 0).all()):
            raise SingularMetricError("Diagonal.logdet: entries <= 0. " + SINGULAR_HINT)
        return d.log().sum()

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        return self.logdet(p)

    def inv_sqrt(self, p: Tensor, Z: Tensor) -> Tensor:
        return Z / self.diagonal(p).sqrt()[:, None]


class Dense(Metric):
    """G(p) = fn(p), a dense SPD matrix function (small d; Cholesky solves).

    Example
    -------
    >>> import torch
    >>> G = Dense(lambda p: torch.diag(1 + p**2))
    >>> G.matvec(torch.tensor([1.0, 2.0]), torch.ones(2))
    tensor([2., 5.])
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self.fn(p) @ v

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        G = self.fn(p)
        if not bool(torch.isfinite(G).all()):
            raise NonFiniteError("Dense.solve: the metric matrix contains NaN or Inf")
        return torch.cholesky_solve(w[:, None], cholesky_or_raise(G, "Dense.solve"))[:, 0]

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        return self.fn(p)

    def logdet(self, p: Tensor) -> Tensor:
        return 2 * torch.diagonal(cholesky_or_raise(self.fn(p), "Dense.logdet")).log().sum()
