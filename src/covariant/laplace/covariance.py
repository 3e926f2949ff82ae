r"""Covariance operators of a Laplace approximation: Σ = P⁻¹ for a structured precision P.

Each operator offers ``matvec``, ``matmat``, ``dense``, ``diagonal``, ``sqrt_matmat`` (S Z with
S Sᵀ = Σ, to draw samples) and ``summary`` (a few JSON-ready numbers instead of the d×d
matrix):

- :class:`DenseCovariance`: Σ = P⁻¹ from the Cholesky factor P = L Lᵀ (``structure="full"``);
- :class:`DiagonalCovariance`: Σ = diag(1/h) (``structure="diag"``);
- :class:`LowRankCovariance`: Σ = λ₀⁻¹ G⁻¹ + U diag(1/λ − 1/λ₀) Uᵀ, the inverse of the
  precision λ₀G + Σ_i (λ_i − λ₀) G u_i u_iᵀ G (``structure="lowrank"``);
- :class:`KroneckerCovariance`: Σ = J⁻¹ P⁻¹ J⁻ᵀ for a Kronecker-factored precision P in the
  weights' chart (``structure="kron"``), closed-form per layer.

Σ is a (2,0) tensor: Σ_Ψ = J⁻¹ Σ_Θ J⁻ᵀ under θ = h(ψ).

Example
-------
>>> import torch
>>> P = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
>>> cov = DenseCovariance(torch.linalg.cholesky(P))
>>> bool(torch.allclose(cov.dense(), torch.linalg.inv(P)))
True
>>> Z = torch.randn(2, 3, dtype=torch.float64)
>>> S = cov.sqrt_matmat(torch.eye(2, dtype=torch.float64))      # S Sᵀ = Σ
>>> bool(torch.allclose(S @ S.T, cov.dense()))
True
>>> DiagonalCovariance(torch.tensor([2.0, 4.0])).diagonal().tolist()
[0.5, 0.25]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..metrics import MAX_DENSE_DIM, Metric
from ..metrics.base import check_dense_size
from ..metrics.kronecker import KroneckerFactored
from ..reparam.base import Linearization

__all__ = ["DenseCovariance", "DiagonalCovariance", "KroneckerCovariance", "LowRankCovariance"]


def _variance_summary(kind: str, diag: Tensor) -> dict[str, Any]:
    """The JSON summary every operator gives: kind, dim, trace and the range of variances."""
    return {
        "kind": kind, "dim": int(diag.shape[0]), "trace": float(diag.sum()),
        "min_variance": float(diag.min()), "max_variance": float(diag.max()),
    }


class DenseCovariance:
    """Σ = P⁻¹ from the lower Cholesky factor L of the precision P = L Lᵀ.

    ``dense`` is Σ = ``torch.cholesky_inverse(L)``, formed once (or passed in as
    ``covariance``); ``matvec`` / ``matmat`` multiply by it; ``sqrt_matmat`` is L⁻ᵀ Z (so
    (L⁻ᵀ)(L⁻ᵀ)ᵀ = (L Lᵀ)⁻¹ = Σ).

    Example
    -------
    >>> import torch
    >>> L = torch.linalg.cholesky(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
    >>> DenseCovariance(L).matvec(torch.ones(2, dtype=torch.float64)).tolist()
    [0.25, 1.0]
    """

    def __init__(self, cholesky: Tensor, covariance: Tensor | None = None) -> None:
        self.cholesky = cholesky
        self._dense = torch.cholesky_inverse(cholesky) if covariance is None else covariance

    def dense(self) -> Tensor:
        return self._dense

    def matvec(self, v: Tensor) -> Tensor:
        return self._dense @ v

    def matmat(self, M: Tensor) -> Tensor:
        return self._dense @ M

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.dense())

    def sqrt_matmat(self, Z: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.cholesky.T, Z, upper=True)

    def summary(self) -> dict[str, Any]:
        return _variance_summary("full", self.diagonal())

    def __repr__(self) -> str:
        return f"DenseCovariance(dim={self.cholesky.shape[0]})"


class DiagonalCovariance:
    """Σ = diag(1/h): the covariance of a diagonal Laplace approximation.

    Methods ``matvec``, ``matmat``, ``dense``, ``diagonal`` and ``sqrt_matmat`` (S Z with
    S Sᵀ = Σ).

    Example
    -------
    >>> import torch
    >>> cov = DiagonalCovariance(torch.tensor([4.0, 1.0]))
    >>> cov.sqrt_matmat(torch.ones(2, 1)).flatten().tolist()
    [0.5, 1.0]
    """

    def __init__(self, precision_diag: Tensor) -> None:
        self.precision_diag = precision_diag

    def diagonal(self) -> Tensor:
        return 1.0 / self.precision_diag

    def matvec(self, v: Tensor) -> Tensor:
        return v / self.precision_diag

    def matmat(self, M: Tensor) -> Tensor:
        return M / self.precision_diag[:, None]

    def dense(self) -> Tensor:
        return torch.diag(1.0 / self.precision_diag)

    def sqrt_matmat(self, Z: Tensor) -> Tensor:
        return Z / self.precision_diag.sqrt()[:, None]

    def summary(self) -> dict[str, Any]:
        return _variance_summary("diag", self.diagonal())

    def __repr__(self) -> str:
        return f"DiagonalCovariance(dim={self.precision_diag.shape[0]})"


class LowRankCovariance:
    r"""Σ = λ₀⁻¹ G⁻¹ + U diag(1/λ − 1/λ₀) Uᵀ: the inverse of λ₀G + Σ_i (λ_i − λ₀) G u_i u_iᵀ G.

    ``U`` holds the top-k generalized eigenvectors of Hess u = λ G u, G-orthonormal
    (UᵀGU = I), so the precision agrees with Hess on span(U) and is λ₀ G on its
    G-orthogonal complement. All of it transforms as a (2,0) tensor.

    Example
    -------
    >>> import torch
    >>> from covariant.metrics import Euclidean
    >>> U = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> cov = LowRankCovariance(U, torch.tensor([4.0], dtype=torch.float64), 2.0, Euclidean(),
    ...                         torch.zeros(2, dtype=torch.float64))
    >>> cov.diagonal().tolist()                 # 1/4 on u, 1/λ₀ = 1/2 elsewhere
    [0.25, 0.5]
    """

    def __init__(self, U: Tensor, eigenvalues: Tensor, floor: float, metric: Metric,
                 point: Tensor) -> None:
        self.U, self.eigenvalues, self.floor = U, eigenvalues, float(floor)
        self.metric, self.point = metric, point

    def matvec(self, v: Tensor) -> Tensor:
        coef = (1.0 / self.eigenvalues - 1.0 / self.floor) * (self.U.T @ v)
        return self.metric.solve(self.point, v) / self.floor + self.U @ coef

    def matmat(self, M: Tensor) -> Tensor:
        return torch.stack([self.matvec(c) for c in M.T], 1)

    def dense(self) -> Tensor:
        d = self.point.shape[0]
        return self.matmat(torch.eye(d, dtype=self.point.dtype, device=self.point.device))

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.dense())

    def sqrt_matmat(self, Z: Tensor) -> Tensor:
        # a ~ N(0, G⁻¹); x = λ₀^{-1/2}(I − U UᵀG) a + U diag(λ^{-1/2}) UᵀG a has covariance Σ
        A = self.metric.inv_sqrt(self.point, Z)
        GA = torch.stack([self.metric.matvec(self.point, c) for c in A.T], 1)
        c = self.U.T @ GA
        return (A - self.U @ c) / math.sqrt(self.floor) + self.U @ (
            c / self.eigenvalues.sqrt()[:, None])

    def summary(self) -> dict[str, Any]:
        """kind, dim, rank, floor and the k eigenvalues (the variances need d solves: not
        included)."""
        return {
            "kind": "lowrank", "dim": int(self.point.shape[0]), "rank": int(self.U.shape[1]),
            "floor": self.floor, "eigenvalues": [float(x) for x in self.eigenvalues],
        }

    def __repr__(self) -> str:
        return f"LowRankCovariance(dim={self.point.shape[0]}, rank={self.U.shape[1]})"


class KroneckerCovariance:
    r"""Σ = J⁻¹ P⁻¹ J⁻ᵀ: a Kronecker-factored precision P = K + δ of the weights' chart,
    transported as a (2,0) tensor to the chart w = h(ψ) of ``chart`` (None: the weights').

    Per block P = Q diag(Λ + δ) Qᵀ with Q = Q_B ⊗ Q_A the eigenbases of the factors (as
    :class:`~covariant.metrics.kronecker.KroneckerFactored` takes them: Λ = b aᵀ, or EK-FAC's
    eigenvalues), computed once by the precision, so every product is closed-form and runs as large
    matrix products, ``chunk`` columns at a time: ``matvec`` / ``matmat`` are J⁻¹ P⁻¹ J⁻ᵀ M,
    ``sqrt_matmat`` is J⁻¹ Q (Λ + δ)^{-1/2} Z (S Sᵀ = Σ with one rotation instead of two),
    and in the weights' chart ``diagonal`` is, per block, (Q_B ∘ Q_B) (Λ + δ)^{-1}
    (Q_A ∘ Q_A)ᵀ (no d × d matrix). In another chart the variances need d products
    (``diagonal``; ``summary`` includes them up to ``MAX_DENSE_DIM``). ``eigenvalues`` and
    ``logdet`` give the spectrum of K + δ for this or another damping δ.

    Example
    -------
    >>> import torch
    >>> from covariant.metrics.kronecker import KroneckerBlock, KroneckerFactored
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> B = torch.tensor([[3.0]], dtype=torch.float64)
    >>> P = KroneckerFactored([KroneckerBlock("w", torch.arange(2), A, B)], dim=2, damping=1.0)
    >>> cov = KroneckerCovariance(P)
    >>> bool(torch.allclose(cov.dense(), torch.linalg.inv(P.dense())))
    True
    >>> bool(torch.allclose(cov.diagonal(), torch.diagonal(cov.dense())))
    True
    >>> sorted(cov.eigenvalues().tolist())              # 3·{1, 3} + 1
    [4.0, 10.0]
    """

    def __init__(self, precision: KroneckerFactored, chart: Linearization | None = None,
                 chunk: int = 64) -> None:
        self.precision = precision
        self.chart = chart
        self.chunk = int(chunk)

    @property
    def dim(self) -> int:
        return self.precision.dim

    # ------------------------------------------------------------------ spectrum
    def spectra(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per block (Q_B, Q_A, Λ) with Λ (out, in) the undamped eigenvalues (computed once,
        by the precision: :meth:`KroneckerFactored.spectra`)."""
        return self.precision.spectra()

    def eigenvalues(self, damping: float | Tensor | None = None) -> Tensor:
        """All d eigenvalues of K + δ, block by block then the rest (the order of
        ``KroneckerFactored.eigenvalues``); δ is the precision's damping unless given."""
        P = self.precision
        return (P if damping is None else P.with_damping(damping)).eigenvalues()

    # ------------------------------------------------------------------ products
    def _weights_apply(self, V: Tensor, fn: Any, symmetric: bool) -> Tensor:
        """Q f(Λ + δ) Qᵀ V (``symmetric``) or Q f(Λ + δ) V, V of shape (d, k)."""
        return self.precision.apply(V, fn, symmetric=symmetric, chunk=self.chunk)

    def _columns(self, fn: Any, V: Tensor) -> Tensor:
        return torch.stack([fn(c) for c in V.T], 1) if V.shape[1] else V

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, M: Tensor) -> Tensor:
        lin = self.chart
        if lin is not None:
            M = self._columns(lin.inverse_vjp, M)
        W = self._weights_apply(M, torch.reciprocal, symmetric=True)
        return W if lin is None else self._columns(lin.inverse_jvp, W)

    def sqrt_matmat(self, Z: Tensor) -> Tensor:
        """S Z with S Sᵀ = Σ: J⁻¹ Q (Λ + δ)^{-1/2} Z."""
        V = self._weights_apply(Z, torch.rsqrt, symmetric=False)
        return V if self.chart is None else self._columns(self.chart.inverse_jvp, V)

    def dense(self) -> Tensor:
        check_dense_size(self.dim, "KroneckerCovariance.dense")
        ref = self.eigenvalues()
        return self.matmat(torch.eye(self.dim, dtype=ref.dtype, device=ref.device))

    def _weights_diagonal(self) -> Tensor:
        """diag P⁻¹ in the weights' chart, closed form per block."""
        return self.precision.diagonal(torch.reciprocal)

    def diagonal(self) -> Tensor:
        if self.chart is None:
            return self._weights_diagonal()
        return torch.diagonal(self.dense())

    def summary(self) -> dict[str, Any]:
        """kind "kron", dim, the number of blocks and, where affordable (the weights' chart,
        or d <= MAX_DENSE_DIM), trace and the range of the marginal variances."""
        extra = {"blocks": len(self.precision.blocks), "chart": self.chart is not None}
        if self.chart is not None and self.dim > MAX_DENSE_DIM:
            return {"kind": "kron", "dim": self.dim, **extra}
        return {**_variance_summary("kron", self.diagonal()), **extra}

    def __repr__(self) -> str:
        return (f"KroneckerCovariance(dim={self.dim}, blocks={len(self.precision.blocks)}, "
                f"chart={self.chart is not None})")
