r"""Exact solves with λI + BᵀB in the m-dimensional space of B's rows (the Woodbury identity).

A damped curvature metric G = λI + BᵀB (a Gauss-Newton matrix or a Fisher written as BᵀB,
B of shape m × d, one row per sample and output direction) has, by the Woodbury identity,

.. math::

    G^{-1} = \tfrac{1}{λ}\,(I − Bᵀ K^{-1} B),  \qquad K = λI_m + BBᵀ,

so once the m × m matrix K is factored (K = L Lᵀ, m³/3 flops), every solve costs one product
with B and one with Bᵀ: no iterations, no tolerance. Where m ≪ d (a model of many parameters
analysed on fewer samples × outputs) this is far cheaper than conjugate gradients, whose
iteration count grows with the condition number (λ_max + λ)/λ.

A *factor* of G⁻¹ (W with W Wᵀ = G⁻¹, what Hutchinson's estimate of tr(G⁻¹H) needs) also
comes without any iteration: with the augmented matrix A = [√λ I; B] ((d + m) × d),
G = AᵀA, and W = G⁻¹Aᵀ (d × (d + m)) satisfies W Wᵀ = G⁻¹. Applied to a (d + m)-vector
z = (z₁, z₂),

.. math::

    W z = z₁ / √λ + Bᵀ K^{-1} (z₂ − B z₁ / √λ),

one product with B, one with Bᵀ and one triangular solve pair. For any such W, WᵀHW is
symmetric with the nonzero eigenvalues of G⁻¹H, so Hutchinson's estimate of tr(WᵀHW) =
tr(G⁻¹H) has the same Gaussian-probe variance 2Σλᵢ² as with the symmetric factor G^{-1/2}.

log det G = (d − m) log λ + log det K also comes from the factor (docs/math.md §5.1).

Every operation runs in float64 (the subtraction I − BᵀK⁻¹B loses about log₁₀(λ_max/λ)
digits), and returns tensors in the dtype of its input.

Example
-------
>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> B = torch.randn(6, 40, generator=g, dtype=torch.float64)
>>> f = DampedGramFactor(lambda V: B @ V, lambda U: B.T @ U, B @ B.T, 1e-3)
>>> G = 1e-3 * torch.eye(40, dtype=torch.float64) + B.T @ B
>>> w = torch.randn(40, generator=g, dtype=torch.float64)
>>> bool(torch.allclose(G @ f.solve(w), w, rtol=1e-9, atol=1e-9))
True
>>> W = f.inverse_factor(torch.eye(46, dtype=torch.float64))   # the whole W, (40, 46)
>>> bool(torch.allclose(W @ W.T, torch.linalg.inv(G), rtol=1e-8))
True
>>> bool(torch.isclose(f.logdet(), torch.linalg.slogdet(G)[1]))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._progress import progress_bar, progress_enabled
from ..errors import SingularMetricError

__all__ = ["DampedGramFactor"]

Matmat = Callable[[Tensor], Tensor]


class DampedGramFactor:
    """The Cholesky factor of K = λI + BBᵀ, and with it G⁻¹, a factor of G⁻¹ and log det G for
    G = λI + BᵀB (module docstring).

    Parameters
    ----------
    apply, adjoint : callable
        ``V ↦ B V`` for V of shape (d, k) and ``U ↦ Bᵀ U`` for U of shape (m, k), in float64.
    gram : Tensor
        BBᵀ, (m, m), float64. Only its lower triangle is read, and it is overwritten by the
        Cholesky factor of λI + BBᵀ (pass a copy to keep it): one m × m matrix in memory.
    lam : float
        λ > 0.
    """

    def __init__(self, apply: Matmat, adjoint: Matmat, gram: Tensor, lam: float) -> None:
        if not lam > 0:
            raise ValueError(f"DampedGramFactor: lam must be > 0, got {lam}")
        self.apply, self.adjoint, self.lam = apply, adjoint, float(lam)
        self.size = int(gram.shape[0])
        gram.diagonal().add_(self.lam)
        info = torch.empty((), dtype=torch.int32, device=gram.device)
        L, info = torch.linalg.cholesky_ex(gram, out=(gram, info))  # in place: one m × m
        if int(info) != 0:
            raise SingularMetricError(
                "DampedGramFactor: λI + BBᵀ is not positive definite (λ too small for the "
                "precision, or B not finite)")
        self.L = L

    @classmethod
    def of(cls, build: Callable[[], Any], lam: float) -> DampedGramFactor | None:
        """The factor of λI + BᵀB for the B that ``build()`` returns (anything with ``apply``,
        ``adjoint``, ``size`` and ``gram(lower_only=True)``, e.g. a
        :class:`~covariant.metrics.sample_space.LinearSampleSpace`), or None when it returns
        None; a progress bar inside ``progress_scope(True)`` names the three stages."""
        bar = progress_bar(enabled=progress_enabled(), total=3,
                           desc="sample-space factor (signals, Gram, Cholesky)")
        B = build()
        bar.update()
        factor = None
        if B is not None:
            bar.set_postfix(m=B.size)
            gram = B.gram(lower_only=True)
            bar.update()
            factor = cls(B.apply, B.adjoint, gram, lam)
            bar.update()
        bar.close()
        return factor

    def _kernel_solve(self, R: Tensor) -> Tensor:
        """K⁻¹R by two triangular solves (``torch.cholesky_solve`` copies the m × m factor on
        every call: 10× slower for one column at m = 4,608, the same digits)."""
        Y = torch.linalg.solve_triangular(self.L, R, upper=False)
        return torch.linalg.solve_triangular(self.L.mT, Y, upper=True)

    def solve(self, w: Tensor) -> Tensor:
        """G⁻¹w = (w − BᵀK⁻¹Bw)/λ for a vector or the columns of a (d, k) matrix."""
        W = w.reshape(w.shape[0], -1).to(torch.float64)
        X = (W - self.adjoint(self._kernel_solve(self.apply(W)))) / self.lam
        return X.reshape(w.shape).to(w.dtype)

    def inverse_factor(self, Z: Tensor) -> Tensor:
        """W Z for the columns of Z, shape (d + m, k): z₁/√λ + BᵀK⁻¹(z₂ − Bz₁/√λ), with
        W Wᵀ = G⁻¹ (module docstring); returns (d, k)."""
        d = Z.shape[0] - self.size
        Z64 = Z.to(torch.float64)
        Z1 = Z64[:d] / math.sqrt(self.lam)
        U = Z1 + self.adjoint(self._kernel_solve(Z64[d:] - self.apply(Z1)))
        return U.to(Z.dtype)

    def logdet(self, dim: int | None = None) -> Tensor:
        """log det G = (d − m) log λ + log det K, with d = ``dim`` (the number of columns of B;
        inferred from one product when not given)."""
        if dim is None:
            dim = int(self.adjoint(self.L.new_zeros(self.size, 1)).shape[0])
        return (dim - self.size) * math.log(self.lam) + 2 * self.L.diagonal().log().sum()
