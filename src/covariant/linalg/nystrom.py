r"""Randomized Nyström approximation and the Nyström preconditioner of A + μI.

For a symmetric positive semi-definite ``A`` (given by a block product ``V ↦ A V``),
:func:`nystrom` builds the rank-ℓ approximation Â = Û Λ̂ Ûᵀ from one block of ℓ products with
an orthonormalised Gaussian test matrix Ω, by the numerically stable shifted algorithm of
Frangella, Tropp & Udell (2023, "Randomized Nyström preconditioning", Algorithm 2.1):

    Y = AΩ,  ν = √d·eps·‖Y‖_F,  Y_ν = Y + νΩ,  C = chol(ΩᵀY_ν),  B = Y_ν C⁻ᵀ,
    B = Û Σ Vᵀ (thin SVD),  Λ̂ = max(Σ² − ν, 0).

:class:`NystromPreconditioner` is then the inverse of the preconditioner for A + μI,

    P⁻¹ = (λ̂_ℓ + μ) Û (Λ̂ + μI)⁻¹ Ûᵀ + (I − ÛÛᵀ),

an SPD operator (pass it as ``cg(..., preconditioner=P)``) that maps the top ℓ eigen-directions
of Â to the scale of the rest, so that conjugate gradients on A + μI see a condition number of
about (λ_{ℓ+1} + μ)/μ instead of (λ_1 + μ)/μ when the spectrum decays. P⁻¹ changes how fast
CG converges, never what it converges to (the stopping test is on the true residual).

Example
-------
>>> import torch
>>> from covariant.linalg import cg
>>> g = torch.Generator().manual_seed(0)
>>> Q = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))[0]
>>> lam = 10.0 ** torch.linspace(1, -8, 300, dtype=torch.float64)  # fast decay
>>> A = (Q * lam) @ Q.T                                 # cond(A + 1e-2·I) = 1e3
>>> P = NystromPreconditioner(nystrom(lambda V: A @ V, 300, 60, seed=0), mu=1e-2)
>>> b = torch.ones(300, dtype=torch.float64)
>>> plain = cg(lambda v: A @ v + 1e-2 * v, b, rtol=1e-10)
>>> pre = cg(lambda v: A @ v + 1e-2 * v, b, rtol=1e-10, preconditioner=P)
>>> pre.num_iters < plain.num_iters / 3
True
>>> bool((pre.x - plain.x).norm() <= 2e-7 * plain.x.norm())  # both within cond·rtol
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import Matmat, _check_dim

__all__ = ["NystromApproximation", "NystromPreconditioner", "nystrom"]


@dataclass
class NystromApproximation:
    """Â = U diag(eigenvalues) Uᵀ: ``U`` (d, ℓ) with orthonormal columns, ``eigenvalues``
    (ℓ,) descending and >= 0, and the number of products it took."""

    U: Tensor
    eigenvalues: Tensor
    num_matvecs: int


def nystrom(matmat: Matmat, dim: int, rank: int, *, seed: int = 0,
            dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
            ) -> NystromApproximation:
    """The randomized rank-``rank`` Nyström approximation of a PSD operator (module docstring).

    ``matmat(V)`` applies A to the columns of a (dim, k) block; it is called once, on the
    whole (dim, rank) test matrix (chunk inside ``matmat`` to bound memory). The test matrix
    is drawn from a CPU generator seeded with ``seed``, so a seed gives the same Â everywhere.
    """
    dim = _check_dim(dim)
    rank = int(rank)
    if not 1 <= rank <= dim:
        raise ValueError(f"nystrom: rank must be in [1, dim={dim}], got {rank}")
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
    omega = torch.linalg.qr(omega)[0].to(dtype=dtype, device=device)
    Y = matmat(omega)
    if Y.shape != (dim, rank):
        raise ValueError(f"nystrom: matmat returned shape {tuple(Y.shape)}, "
                         f"expected ({dim}, {rank})")
    nu = dim ** 0.5 * torch.finfo(Y.dtype).eps * float(torch.linalg.matrix_norm(Y))
    Y = Y + nu * omega
    core = omega.T @ Y
    C = torch.linalg.cholesky(0.5 * (core + core.T))
    B = torch.linalg.solve_triangular(C, Y.T, upper=False).T  # Y C⁻ᵀ
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = torch.clamp(S * S - nu, min=0.0)
    return NystromApproximation(U, lam, rank)


class NystromPreconditioner:
    """``r ↦ P⁻¹ r`` for A + μI from a Nyström approximation of A (module docstring).

    Parameters
    ----------
    approx : NystromApproximation
    mu : float
        The shift μ > 0 of the system A + μI.
    """

    def __init__(self, approx: NystromApproximation, mu: float) -> None:
        if not mu > 0:
            raise ValueError(f"NystromPreconditioner: mu must be > 0, got {mu}")
        self.U = approx.U
        self.mu = float(mu)
        self.eigenvalues = approx.eigenvalues
        floor = float(approx.eigenvalues[-1]) + self.mu
        self.scale = floor / (approx.eigenvalues + self.mu) - 1.0  # (λ̂_ℓ+μ)/(λ̂+μ) − 1

    def __call__(self, r: Tensor) -> Tensor:
        U = self.U.to(r)
        c = U.T @ r
        return r + U @ (self.scale.to(r) * c)
