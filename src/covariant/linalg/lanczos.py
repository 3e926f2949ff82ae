"""Extreme eigenpairs by thick-restart (Krylov-Schur) Lanczos.

:func:`lanczos` runs Lanczos with full reorthogonalization, optionally in a ``B``-inner
product: with ``matvec = G⁻¹ Hess`` and ``inner_matvec = G`` its Ritz values are the
eigenvalues of the shape operator (docs/math.md §4), computed with ``G``-solves only. The small
projected matrices live on the CPU in float64, where an ``m × m`` eigendecomposition is
cheapest and most accurate; the basis keeps the operator's dtype and device.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([-3.0, 1.0, 2.0, 5.0], dtype=torch.float64))
>>> res = lanczos(lambda v: A @ v, 4, k=1, which="both")
>>> [round(v, 8) for v in res.eigenvalues.tolist()], res.converged
([5.0, -3.0], True)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import default_tol
from .._progress import progress_bar
from ..errors import NonFiniteError, SingularMetricError
from ._common import _DAMPING_HINT, Matvec, _check_dim, _check_finite, _check_vector
from .probes import _generator, _probe
from .results import EigResult

__all__ = ["lanczos"]


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    which: Literal["largest", "smallest", "both"] = "largest",
    inner_matvec: Matvec | None = None,
    num_steps: int | None = None,
    max_restarts: int = 30,
    tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
    residuals: Literal["basis", "recompute"] = "basis",
) -> EigResult:
    r"""Extreme eigenpairs of a self-adjoint operator by restarted Lanczos.

    Builds a Krylov basis ``V`` with full reorthogonalization in the inner product
    ``⟨x, y⟩_B = xᵀ B y`` (``B = I`` without ``inner_matvec``), so that

    .. math::

        A V = V T + f bᵀ,\qquad Vᵀ B V = I,\qquad T = Vᵀ B A V,

    and returns Ritz pairs ``(θ, V y)`` of ``T y = θ y``. When the basis reaches ``num_steps``
    vectors before the wanted pairs converge, it is compressed to the most wanted Ritz vectors
    (a Krylov-Schur thick restart) and extended again, at most ``max_restarts`` times.

    **Generalized problem.** Pass ``matvec = B⁻¹H`` and ``inner_matvec = B`` (SPD). ``B⁻¹H`` is
    self-adjoint in the ``B``-inner product, so the Ritz values approximate the eigenvalues of
    ``H x = λ B x``. With ``H = Hess`` and ``B = G`` these are the eigenvalues of the shape
    operator ``E = G⁻¹ Hess`` (docs/math.md §4), computed with ``G``-solves only; no ``G^{-1/2}``.
    The eigenvectors are ``B``-orthonormal and the residual norms are ``B``-norms, so both
    the values and the convergence flags are chart-invariant.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``; ``A`` self-adjoint in the chosen inner product.
    dim : int
        Length of the vectors.
    k : int
        Number of eigenpairs wanted (``2k`` for ``which="both"``, or all ``dim`` if fewer).
    which : {"largest", "smallest", "both"}
        Algebraically largest, smallest, or the ``k`` largest and ``k`` smallest.
    inner_matvec : callable, optional
        ``v ↦ B v`` for an SPD ``B`` defining the inner product.
    num_steps : int, optional
        Maximum basis size per cycle; default ``min(dim, max(2·nwant + 20, 40))`` with
        ``nwant = k`` (``2k`` for ``"both"``).
    max_restarts : int
        Maximum thick restarts.
    tol : float, optional
        Convergence threshold on the relative residual ``‖A x − θ x‖_B / ρ`` with
        ``ρ = max |θ|``. Default ``1e-8``, floored at ``100·eps`` of ``dtype`` (about
        ``1.2e-5`` in float32).
    seed : int
        Seed of the random start vector.
    dtype, device :
        Of the basis vectors; ``matvec`` receives vectors of this dtype and device.
    progress : bool
        Show a progress bar over operator applications.
    residuals : {"basis", "recompute"}
        How the final residuals ``A x − θ x`` are formed. "basis" keeps the products ``A V``
        of the basis vectors (``num_steps`` more vectors of memory) and uses
        ``A x = (A V) y``: no extra products, and still the true residual of ``x`` for a
        linear operator. "recompute" applies ``matvec`` to each Ritz vector (one product per
        eigenpair, no extra memory).

    Returns
    -------
    EigResult
        Eigenvalues sorted descending. Not converging is reported by ``converged=False`` and
        ``residuals``, never raised.

    Notes
    -----
    In exact arithmetic single-vector Lanczos sees one copy of a repeated eigenvalue. When the
    Krylov space becomes invariant (e.g. for a low-rank operator), the basis is continued with
    fresh random vectors until it is full, which recovers multiplicities such as the many zero
    eigenvalues of a low-rank Hessian; otherwise copies appear through roundoff and restarts,
    so a multiple eigenvalue can take longer to resolve. The final residuals are true
    residuals, not the Lanczos estimates ``β |e_mᵀ y|``: they come from the operator's own
    products (kept, or recomputed), so they also reflect an inexact or non-self-adjoint
    operator (e.g. inner CG solves).

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> res = lanczos(lambda v: A @ v, 100, k=2, num_steps=60)
    >>> res.converged, [round(float(x), 6) for x in res.eigenvalues]
    (True, [100.0, 99.0])
    """
    dim = _check_dim(dim)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}.")
    if residuals not in ("basis", "recompute"):
        raise ValueError(f"residuals must be 'basis' or 'recompute', got {residuals!r}.")
    if k < 1 or k > dim:
        raise ValueError(f"k must be in 1..dim={dim}, got {k}.")
    nwant = min(2 * k, dim) if which == "both" else k
    m = min(dim, max(2 * nwant + 20, 40)) if num_steps is None else min(int(num_steps), dim)
    if m < dim and m < nwant + 2:
        raise ValueError(
            f"num_steps={num_steps} is too small for {nwant} wanted eigenpairs: use at least "
            f"{nwant + 2} (or dim={dim})."
        )
    # residuals of products of a large network reach about 1000·eps in low precision
    tol_ = default_tol(tol, dtype, 1e-8) if tol is not None else max(
        1e-8, 1000.0 * torch.finfo(dtype).eps)
    keep = min(nwant + (m - nwant) // 2, m - 1) if m < dim else m
    bar = progress_bar(
        None, enabled=progress,
        total=m + max_restarts * (m - keep) + (nwant if residuals == "recompute" else 0),
        desc="lanczos",
    )
    run = _KrylovSchur(matvec, inner_matvec, dim, m, which, nwant, seed, dtype, device, bar,
                       keep_products=residuals == "basis")
    j, theta, Y, scale, restarts = run.iterate(keep, tol_, max_restarts)
    values, X, res = run.ritz_pairs(j, theta, Y, scale)
    bar.close()
    return EigResult(
        eigenvalues=values.to(dtype=dtype, device=device),
        eigenvectors=X,
        residual=res.to(dtype=dtype, device=device),
        converged=bool((res <= tol_).all()),
        num_matvecs=run.num_matvecs,
        num_inner_matvecs=run.num_inner_matvecs,
        num_restarts=restarts,
    )


class _KrylovSchur:
    """One restarted Lanczos run: the operators, their product counts and the Krylov basis.

    The basis ``V`` (and ``B V``, and ``A V`` when the products are kept) has ``m`` columns;
    ``T = Vᵀ B A V`` is the projected ``m × m`` matrix in float64 on the CPU.
    """

    def __init__(
        self,
        matvec: Matvec,
        inner_matvec: Matvec | None,
        dim: int,
        m: int,
        which: str,
        nwant: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
        bar: Any,
        keep_products: bool,
    ) -> None:
        self.matvec, self.inner_matvec = matvec, inner_matvec
        self.dim, self.m, self.which, self.nwant = dim, m, which, nwant
        self.dtype, self.device, self.bar = dtype, device, bar
        self.gen = _generator(seed)
        self.num_matvecs = 0
        self.num_inner_matvecs = 0
        # The basis is stored row-major as (m, dim) and used through its transpose, so each
        # basis vector is contiguous and projections read V[:, :j] as a transposed block
        # (3-10x faster than a strided (dim, m) column slice; benchmarks/).
        # (empty, not zeros: a column is read only after it is written; restarts use all m)
        self.V = torch.empty(m, dim, dtype=dtype, device=device).T
        self.BV = (self.V if inner_matvec is None
                   else torch.empty(m, dim, dtype=dtype, device=device).T)
        self.AV = torch.empty(m, dim, dtype=dtype, device=device).T if keep_products else None
        self.T = torch.zeros(m, m, dtype=torch.float64)

    def A(self, v: Tensor) -> Tensor:
        """``A v``, checked, detached and counted."""
        w = _check_vector(self.matvec(v), self.dim, "lanczos: matvec").detach()
        self.num_matvecs += 1
        self.bar.update(1)
        _check_finite(w, "lanczos: the output of matvec")
        return w

    def B(self, v: Tensor) -> Tensor:
        """``B v`` (``v`` itself without an inner product), checked, detached and counted."""
        if self.inner_matvec is None:
            return v
        self.num_inner_matvecs += 1
        return _check_vector(self.inner_matvec(v), self.dim, "lanczos: inner_matvec").detach()

    @staticmethod
    def b_norm(v: Tensor, Bv: Tensor, what: str) -> float:
        """``√(vᵀ B v)``; raises if it is not finite or ``vᵀ B v < 0``."""
        sq = float(torch.dot(v, Bv))
        if not math.isfinite(sq):
            raise NonFiniteError(f"lanczos: {what} has a non-finite B-norm.")
        if sq < 0.0:
            raise SingularMetricError(
                f"lanczos: vᵀBv = {sq:.3e} < 0 for {what}: inner_matvec is not positive "
                f"definite. {_DAMPING_HINT}"
            )
        return math.sqrt(sq)

    def fresh(self, j: int) -> tuple[Tensor, Tensor, float]:
        """A random vector, B-orthogonalized against the first ``j`` basis vectors, with its
        ``B`` product and ``B``-norm."""
        f = _probe(self.gen, self.dim, "gaussian", self.dtype, self.device)
        if j > 0:
            f, _ = _orthogonalize(f, self.V[:, :j], self.BV[:, :j])
        Bf = self.B(f)
        return f, Bf, self.b_norm(f, Bf, "the start vector")

    def iterate(
        self, keep: int, tol: float, max_restarts: int
    ) -> tuple[int, Tensor, Tensor, float, int]:
        """Extend the basis until the wanted Ritz pairs pass ``tol``, restarting when full.

        Returns the basis size ``j``, the Ritz values ``θ`` (ascending) and vectors ``Y`` of
        ``T[:j, :j]``, the scale ``ρ = max |θ|`` and the number of restarts.
        """
        V, BV, AV, T, m, nwant = self.V, self.BV, self.AV, self.T, self.m, self.nwant
        eps = torch.finfo(self.dtype).eps
        f, Bf, beta = self.fresh(0)
        j = 0
        restarts = 0
        scale = 0.0
        theta = torch.zeros(0, dtype=torch.float64)
        Y = torch.zeros(0, 0, dtype=torch.float64)
        broke = False
        while True:
            if broke:
                # Invariant subspace: continue with a fresh direction (its coupling to V is 0).
                f, Bf, beta = self.fresh(j)
            V[:, j] = f / beta
            if self.inner_matvec is not None:
                BV[:, j] = Bf / beta
            w = self.A(V[:, j])
            if AV is not None:
                AV[:, j] = w
            w, c = _orthogonalize(w, V[:, : j + 1], BV[:, : j + 1])
            c64 = c.to(device="cpu", dtype=torch.float64)
            T[: j + 1, j] = c64
            T[j, : j + 1] = c64
            f, Bf = w, self.B(w)
            beta = self.b_norm(f, Bf, "a Lanczos vector")
            j += 1
            theta, Y = torch.linalg.eigh(T[:j, :j])
            scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
            broke = beta <= 100.0 * eps * scale
            # After a breakdown every Ritz pair is exact, but the Krylov space may have missed
            # eigenvalues (e.g. copies of a multiple one): keep exploring until the basis is
            # full. Test only once the basis is about twice the wanted count: with fewer
            # vectors a loose tolerance can accept Ritz values that are not yet eigenvalues
            # (benchmarks/).
            if j >= min(m, 2 * nwant + 1) and (not broke or j == m):
                want = _priority(j, self.which)[:nwant]
                est = beta * Y[j - 1, want].abs() / scale
                if bool((est <= tol).all()):
                    break
            if j == m:
                if m == self.dim or restarts >= max_restarts:
                    break
                self.restart(theta, Y, keep)
                j = keep
                restarts += 1
        return j, theta, Y, scale, restarts

    def restart(self, theta: Tensor, Y: Tensor, keep: int) -> None:
        """Krylov-Schur thick restart: keep the ``keep`` most wanted Ritz vectors of the full
        basis; ``T`` becomes their Ritz values on the diagonal."""
        kept = _priority(self.m, self.which)[:keep]
        Yk = Y[:, kept].to(dtype=self.dtype, device=self.device)
        self.V[:, :keep] = self.V @ Yk
        if self.inner_matvec is not None:
            self.BV[:, :keep] = self.BV @ Yk
        if self.AV is not None:
            self.AV[:, :keep] = self.AV @ Yk
        self.T.zero_()
        self.T[:keep, :keep] = torch.diag(theta[kept])

    def ritz_pairs(
        self, j: int, theta: Tensor, Y: Tensor, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The wanted Ritz values (descending, float64), their vectors ``V y`` and the true
        relative residuals ``‖A x − θ x‖_B / ρ`` (float64, on the CPU)."""
        want = _priority(j, self.which)[: self.nwant]
        want = want[torch.argsort(theta[want], descending=True)]
        values = theta[want]
        Yw = Y[:, want].to(dtype=self.dtype, device=self.device)
        X = self.V[:, :j] @ Yw
        AX = self.AV[:, :j] @ Yw if self.AV is not None else None
        res = torch.empty(len(want), dtype=torch.float64)
        for i in range(len(want)):
            x = X[:, i]
            r = (self.A(x) if AX is None else AX[:, i]) - float(values[i]) * x
            res[i] = self.b_norm(r, self.B(r), "a residual") / scale
        return values, X, res


def _priority(n: int, which: str) -> Tensor:
    """Indices of ascending Ritz values ordered from most to least wanted."""
    if which == "largest":
        return torch.arange(n - 1, -1, -1)
    if which == "smallest":
        return torch.arange(n)
    order = torch.empty(n, dtype=torch.long)  # "both": alternate from the two ends
    order[0::2] = torch.arange(n - 1, n - 1 - (n + 1) // 2, -1)
    order[1::2] = torch.arange(n // 2)
    return order


def _orthogonalize(w: Tensor, V: Tensor, BV: Tensor) -> tuple[Tensor, Tensor]:
    """``w − V (BVᵀ w)`` twice (CGS2), a third time if the second pass removed much.

    Returns the orthogonalized vector and the accumulated coefficients ``BVᵀ w``.
    """
    c = BV.T @ w
    w = w - V @ c
    norm1 = torch.linalg.vector_norm(w)
    c2 = BV.T @ w
    w = w - V @ c2
    c = c + c2
    if float(torch.linalg.vector_norm(w)) < 0.5 * float(norm1):
        c3 = BV.T @ w
        w = w - V @ c3
        c = c + c3
    return w, c
