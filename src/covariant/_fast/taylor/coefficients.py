r"""Taylor coefficients of recorded values: how the rules read and combine them.

Every intermediate x(t) = x₀ + x₁ t + x₂ t² + O(t³) of t ↦ L(p + t v) is held as its value at
p, x₀ (``primal``, per node), and the pair (x₁, x₂) (``coef``, per node and probe). A missing
coefficient (``None``) is zero, so rules skip the terms it would contribute.

Example
-------
>>> import torch
>>> a = torch.ones(2)
>>> accumulate(a, torch.full((2,), 2.0)) is a  # fresh and of the sum's shape: in place
True
>>> add_optional(None, a) is a
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .recording import Node, substitute

__all__ = ["accumulate", "add_optional", "coef_of", "primal_of", "resolved"]


def primal_of(arg: Any, primal: dict[Any, Any]) -> Any:
    """The value at p of an argument: a recorded node's output, or the literal itself."""
    return primal[arg] if isinstance(arg, Node) else arg


def coef_of(arg: Any, coef: dict[Any, tuple[Any, Any]], k: int) -> Any:
    """Coefficient k ∈ {1, 2} of an argument (None: zero)."""
    pair = coef.get(arg)
    return None if pair is None else pair[k - 1]


def resolved(node: Any, primal: dict[Any, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of ``node`` with every recorded argument replaced by its value at p."""
    return substitute(node.args, primal), substitute(node.kwargs, primal)


def accumulate(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    """total + term, in place on ``total`` when it is a fresh result of this rule (never a
    coefficient that other nodes hold) and the sum keeps its shape."""
    if total is None:
        return term
    if term is None:
        return total
    if _keeps_shape(total.shape, term.shape):
        return total.add_(term)
    return total + term


def _keeps_shape(big: torch.Size, small: torch.Size) -> bool:
    """broadcast_shapes(big, small) == big, without ``torch.broadcast_shapes`` (a Python
    reference implementation: 0.2 ms a call, and about 1 s to import on first use)."""
    return len(small) <= len(big) and all(
        s == 1 or s == b for s, b in zip(reversed(small), reversed(big), strict=False))


def add_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b
