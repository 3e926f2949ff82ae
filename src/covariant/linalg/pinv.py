r"""Pseudo-inverse solves ``x = A⁺ b`` of a symmetric positive semi-definite operator.

:func:`pinv_solve` is "CG on the range": Lanczos on the Krylov space ``K(A, b)`` with full
reorthogonalization. With the orthonormal basis ``V`` and ``T = Vᵀ A V = U diag(θ) Uᵀ``,

.. math::

    x = V\, T^{+} (‖b‖ e_1),\qquad T^{+} = \sum_{θ_j > τ θ_{\max}} θ_j^{-1} u_j u_jᵀ ,

where ``τ = rank_rtol``. The null-space part of ``b`` is an eigenvector of ``A`` with
eigenvalue 0, so it shows up as a Ritz value below the threshold and is dropped: the same
threshold as ``torch.linalg.pinv(A, rtol=rank_rtol)``. On an SPD ``A`` this is CG in exact
arithmetic; unlike CG, a right-hand side outside the range cannot make it blow up. It keeps
the basis: ``k`` vectors of size ``dim`` after ``k`` steps.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64))
>>> res = pinv_solve(lambda v: A @ v, torch.ones(3, dtype=torch.float64))
>>> [round(v, 10) for v in res.x.tolist()], res.rank, res.converged
([0.5, 0.25, 0.0], 2, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import default_tol
from ..errors import NonFiniteError, NotConvergedError
from ._common import Matvec, _check_vector
from .results import PinvSolveResult

__all__ = ["pinv_solve"]


def pinv_solve(
    matvec: Matvec,
    b: Tensor,
    *,
    rank_rtol: float | None = None,
    rtol: float | None = None,
    maxiter: int | None = None,
    raise_on_failure: bool = True,
) -> PinvSolveResult:
    r"""``A⁺ b`` for a symmetric positive semi-definite ``A`` by Lanczos on the range.

    Each step adds ``q_{k+1} ∝ (I − V Vᵀ) A q_k`` (Gram-Schmidt twice against the whole
    basis), solves the projected problem ``x = V T⁺ (‖b‖ e_1)`` with Ritz values below
    ``rank_rtol · max |θ|`` dropped, and stops when

    - the Krylov space is invariant (``β_k <= rank_rtol · max |θ|``): the solve is exact on it;
      or
    - the residual outside ``span(V)``, ``β_k |y_k|``, is at most ``rtol · ‖T⁺-part of b‖``
      (the norm of the kept coefficients ``‖b‖ U_keptᵀ e_1``) and every dropped Ritz pair is a
      converged null vector (``β_k |u_{kj}| <= rank_rtol · max |θ|``).

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v`` on flat tensors; ``A`` symmetric positive semi-definite. Its outputs are
        used as they are (not detached).
    b : Tensor
        Right-hand side, shape ``(dim,)``; its dtype and device set those of the basis.
    rank_rtol : float, optional
        Ritz values ``<= rank_rtol · max |θ|`` count as zero. Default ``1e-10``, floored at
        ``100·eps`` of ``b.dtype``.
    rtol : float, optional
        Relative tolerance of the stopping test. Default ``1e-12``, floored at ``100·eps``.
    maxiter : int, optional
        Maximum Lanczos steps, capped at ``dim`` (default ``dim``).
    raise_on_failure : bool
        If True (default), raise :class:`~covariant.errors.NotConvergedError` when the test
        fails within ``maxiter < dim`` steps. After ``dim`` steps the basis spans the whole
        space, so the result is returned (with ``converged=False``) even then.

    Returns
    -------
    PinvSolveResult
        ``x`` in the dtype and device of ``b``.

    Raises
    ------
    NonFiniteError
        If ``b`` or ``qᵀ A q`` is NaN or Inf.
    NotConvergedError
        As described under ``raise_on_failure``.

    Examples
    --------
    >>> import torch
    >>> u = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / 2 ** 0.5
    >>> A = 3.0 * torch.outer(u, u)  # rank one
    >>> b = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64)
    >>> res = pinv_solve(lambda v: A @ v, b)
    >>> bool(torch.allclose(res.x, torch.linalg.pinv(A) @ b, atol=1e-12)), res.num_matvecs
    (True, 2)
    """
    d = b.shape[0]
    tol = default_tol(rank_rtol, b.dtype, 1e-10)
    rtol_ = default_tol(rtol, b.dtype, 1e-12)
    maxiter_ = d if maxiter is None else min(int(maxiter), d)
    nw = float(torch.linalg.vector_norm(b))
    if not math.isfinite(nw):
        raise NonFiniteError("pinv_solve: the right-hand side is NaN or Inf.")
    if nw == 0.0:
        return PinvSolveResult(torch.zeros_like(b), 0, 0.0, True, 0, 0)
    Q = [b / nw]
    alphas: list[float] = []
    betas: list[float] = []
    y = torch.zeros(1, dtype=torch.float64)
    residual, rank = nw, 0
    converged = False
    for _ in range(maxiter_):
        z = _check_vector(matvec(Q[-1]), d, "pinv_solve: matvec")
        alphas.append(float(torch.dot(Q[-1], z)))
        if not math.isfinite(alphas[-1]):
            raise NonFiniteError("pinv_solve: A v is NaN or Inf.")
        V = torch.stack(Q)
        for _ in range(2):  # full reorthogonalization; twice is enough
            z = z - V.T @ (V @ z)
        beta = float(torch.linalg.vector_norm(z))
        theta, U, keep, top = _ritz(alphas, betas, tol)
        c_kept = nw * U[0, keep]  # U_keptᵀ (‖b‖ e₁)
        y = U[:, keep] @ (c_kept / theta[keep])
        residual, rank = beta * abs(float(y[-1])), int(keep.sum())
        if beta <= tol * top:  # invariant Krylov space: exact on it
            converged = True
            break
        dropped_ok = bool((beta * U[-1, ~keep].abs() <= tol * top).all())
        if residual <= rtol_ * float(c_kept.norm()) and dropped_ok:
            converged = True
            break
        Q.append(z / beta)
        betas.append(beta)
    if not converged and maxiter_ < d and raise_on_failure:
        raise NotConvergedError(
            f"pinv_solve did not converge in {maxiter_} iterations (residual {residual:.3e}, "
            f"rtol={rtol_:.1e}). Raise maxiter or loosen rtol, or damp the operator."
        )
    V = torch.stack(Q[: y.shape[0]])
    x = V.T @ y.to(dtype=b.dtype, device=b.device)
    return PinvSolveResult(x, len(alphas), residual, converged, len(alphas), rank)


def _ritz(
    alphas: list[float], betas: list[float], rank_rtol: float
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Eigenpairs ``(θ, U)`` of the tridiagonal ``T`` (float64, CPU), the mask of the Ritz
    values above ``rank_rtol · max |θ|``, and ``max |θ|``."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, U = torch.linalg.eigh(T)
    top = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
    return theta, U, theta > rank_rtol * top, top
