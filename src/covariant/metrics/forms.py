r"""The connection quadratic form of a metric, split for Taylor mode (docs/math.md §3).

For a fixed covector-like r (r = G⁻¹∇L in the Riemannian Hessian), u ↦ rᵀ G Γ(u, u) is a
quadratic form in u. A :class:`ConnectionForm` holds it as uᵀ∇²ψ(p)u + remainder(u): the
*potential* ψ is a scalar function of the point whose Hessian quadratic form a caller folds
into another one (the loss's: one Taylor-mode pass of L − ψ), the remainder is the rest.

Example
-------
>>> import torch
>>> p = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> a = ConnectionForm(lambda q: (q**2).sum(), lambda u: u.sum())
>>> b = ConnectionForm(None, lambda u: 2 * u.sum())
>>> c = a.plus(b, 0.5)                       # a + 0.5 b
>>> u = torch.ones(2, dtype=torch.float64)
>>> float(c.potential(p)), float(c.remainder(u))
(5.0, 4.0)
>>> c.remainders(torch.eye(2, dtype=torch.float64))        # one column per u
tensor([2., 2.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ConnectionForm"]


@dataclass(frozen=True)
class ConnectionForm:
    r"""The quadratic form u ↦ rᵀ G Γ(u, u) of a metric at a point p, for a fixed r.

    rᵀGΓ(u, u) = uᵀ ∇²ψ(p) u + remainder(u), with ``potential`` ψ (None: ψ = 0).
    ``batched`` (optional) maps a block U (d, k) to the k remainders of its columns at once
    (a vmapped remainder); :meth:`remainders` falls back to one call per column without it.
    """

    potential: Callable[[Tensor], Tensor] | None
    remainder: Callable[[Tensor], Tensor]
    batched: Callable[[Tensor], Tensor] | None = None
    #: The metric's own data loss minus ψ, Σ_b w_b [ℓ(f_b(q), y_b) − ⟨a_b, f_b(q)⟩], in one
    #: forward pass per batch (None: not offered). It may replace L − ψ only where the loss
    #: is that data loss; ``loss_data`` = (loss_fn, batches, weights) says which it is.
    loss_minus_potential: Callable[[Tensor], Tensor] | None = None
    loss_data: Any = None

    def remainders(self, U: Tensor) -> Tensor:
        """remainder(u) for every column u of U (d, k), as a (k,) tensor."""
        if self.batched is not None:
            return self.batched(U)
        return torch.stack([self.remainder(u).reshape(()) for u in U.T])

    def plus(self, other: ConnectionForm, scale: float) -> ConnectionForm:
        """The form of ``self + scale · other`` (a damped metric's)."""
        pots = [(1.0, self.potential), (scale, other.potential)]
        live = [(c, f) for c, f in pots if f is not None]

        def potential(q: Tensor) -> Tensor:
            return sum(c * f(q) for c, f in live)  # type: ignore[return-value]

        def remainder(u: Tensor) -> Tensor:
            return self.remainder(u) + scale * other.remainder(u)

        def batched(U: Tensor) -> Tensor:
            return self.remainders(U) + scale * other.remainders(U)

        return ConnectionForm(potential if live else None, remainder, batched)
