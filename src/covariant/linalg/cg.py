"""Preconditioned conjugate gradients for symmetric positive-definite systems.

:func:`cg` solves ``A x = b`` with ``A`` given only as a callable ``v ↦ A v``. Convergence is
tested on the *true* residual ``b − A x``, and a non-positive curvature ``pᵀ A p`` raises a
:class:`~covariant.errors.SingularMetricError` instead of returning garbage.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
>>> res = cg(lambda v: A @ v, torch.ones(3, dtype=torch.float64))
>>> res.converged, [round(v, 6) for v in res.x.tolist()], res.num_iters
(True, [1.0, 0.1, 0.01], 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import default_tol
from ..errors import NonFiniteError, NotConvergedError, ShapeMismatchError, SingularMetricError
from ._common import _DAMPING_HINT, Matvec, _check_finite, _check_vector
from .results import CGResult

__all__ = ["cg"]


def cg(
    matvec: Matvec,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    raise_on_failure: bool = True,
) -> CGResult:
    r"""Solve ``A x = b`` for symmetric positive-definite ``A`` by preconditioned CG.

    With the preconditioner ``M⁻¹`` (a callable ``r ↦ M⁻¹ r``, SPD) and ``z_k = M⁻¹ r_k``:

    .. math::

        α_k = \frac{r_kᵀ z_k}{p_kᵀ A p_k},\quad x_{k+1} = x_k + α_k p_k,\quad
        r_{k+1} = r_k − α_k A p_k,\quad
        p_{k+1} = z_{k+1} + \frac{r_{k+1}ᵀ z_{k+1}}{r_kᵀ z_k} p_k .

    The iteration stops when ``‖r‖ <= max(rtol·‖b‖, atol)``. The residual that passes this test
    is then recomputed as ``b − A x`` (one extra product); if the recursively updated residual
    drifted, CG restarts from the true one. So ``converged=True`` means the *true* residual is
    below tolerance.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v`` on flat tensors; ``A`` must be SPD.
    b : Tensor
        Right-hand side, shape ``(dim,)``. Its dtype and device set those of the solve.
    x0 : Tensor, optional
        Initial guess (default zeros).
    preconditioner : callable, optional
        ``r ↦ M⁻¹ r`` for an SPD ``M ≈ A`` (e.g. a diagonal metric's inverse).
    rtol : float, optional
        Relative tolerance. Default ``1e-10`` in float64; in lower precision the default is
        floored at ``100·eps`` (about ``1.2e-5`` in float32), which is what that precision can
        attain.
    atol : float
        Absolute tolerance on ``‖b − A x‖``.
    maxiter : int, optional
        Maximum iterations (default ``10·dim``).
    raise_on_failure : bool
        If True (default), raise :class:`~covariant.errors.NotConvergedError` when the tolerance
        is not met; otherwise return the last iterate with ``converged=False``.

    Returns
    -------
    CGResult

    Raises
    ------
    SingularMetricError
        If ``pᵀ A p <= 0`` (``A`` is not positive definite) or ``rᵀ M⁻¹ r <= 0`` (the
        preconditioner is not).
    NotConvergedError
        If not converged within ``maxiter`` and ``raise_on_failure``.
    NonFiniteError
        If ``b`` or an operator output contains NaN or Inf.

    Notes
    -----
    The loop has data-dependent control flow (tolerance tests), so it cannot run under
    ``torch.func.vmap``; apply it per right-hand side instead. Autograd through the iterations
    works (no in-place updates of tensors that may carry a graph).

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> res = cg(lambda v: A @ v, b)
    >>> res.converged, torch.allclose(A @ res.x, b, atol=1e-9)
    (True, True)
    """
    if b.ndim != 1:
        raise ShapeMismatchError(
            f"cg expects a flat right-hand side b, got shape {tuple(b.shape)}."
        )
    _check_finite(b, "The right-hand side b of cg")
    dim = b.shape[0]
    rtol_ = default_tol(rtol, b.dtype, 1e-10)
    maxiter_ = 10 * dim if maxiter is None else int(maxiter)

    def A(v: Tensor) -> Tensor:
        return _check_vector(matvec(v), dim, "cg: matvec")

    def M(r: Tensor) -> Tensor:
        return (
            r
            if preconditioner is None
            else _check_vector(preconditioner(r), dim, "cg: preconditioner")
        )

    bnorm = float(torch.linalg.vector_norm(b))
    tol = max(rtol_ * bnorm, float(atol))
    if bnorm == 0.0:  # the unique solution of an SPD system with b = 0
        return CGResult(torch.zeros_like(b), 0, 0.0, True, 0)

    num_matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b
    else:
        if x0.shape != b.shape:
            raise ShapeMismatchError(
                f"cg: x0 has shape {tuple(x0.shape)} but b has shape {tuple(b.shape)}."
            )
        x = x0
        r = b - A(x0)
        num_matvecs += 1
    rnorm = float(torch.linalg.vector_norm(r))
    _check_finite(torch.tensor(rnorm), "cg: the initial residual")
    if rnorm <= tol:
        return CGResult(x, 0, rnorm, True, num_matvecs)

    x, it, rnorm, converged, used = _iterate(A, M, b, x, r, tol, maxiter_)
    num_matvecs += used
    if not converged and raise_on_failure:
        raise NotConvergedError(
            f"cg did not converge: residual norm {rnorm:.3e} > tolerance {tol:.3e} "
            f"(rtol={rtol_:.1e} × ‖b‖={bnorm:.3e}, atol={float(atol):.1e}) after {it} "
            f"iterations (maxiter={maxiter_}). Increase maxiter, loosen rtol/atol, pass a "
            "preconditioner, or, if the operator is an ill-conditioned metric, damp it "
            "(covariant.metrics.Damped). Pass raise_on_failure=False to get the last iterate."
        )
    return CGResult(x, it, rnorm, converged, num_matvecs)


def _precondition(M: Callable[[Tensor], Tensor], r: Tensor, it: int) -> tuple[Tensor, Tensor]:
    """``z = M⁻¹ r`` and ``rᵀ z``; raises unless ``rᵀ z`` is finite and positive."""
    z = M(r)
    rz = torch.dot(r, z)
    rz_f = float(rz)
    if not math.isfinite(rz_f):
        raise NonFiniteError(f"cg: the preconditioned residual is not finite (iteration {it}).")
    if rz_f <= 0.0:
        raise SingularMetricError(
            f"cg: rᵀ M⁻¹ r = {rz_f:.3e} <= 0 at iteration {it}: the preconditioner is not "
            "positive definite. Pass an SPD preconditioner or none."
        )
    return z, rz


def _iterate(
    A: Callable[[Tensor], Tensor],
    M: Callable[[Tensor], Tensor],
    b: Tensor,
    x: Tensor,
    r: Tensor,
    tol: float,
    maxiter: int,
) -> tuple[Tensor, int, float, bool, int]:
    """The CG iterations from the iterate ``x`` with residual ``r = b − A x``.

    Returns ``(x, iterations, residual norm, converged, operator applications)``. A recursive
    residual below ``tol`` is checked against the true one ``b − A x``; if they disagree, CG
    restarts from the true residual.
    """
    num_matvecs = 0
    rnorm = float(torch.linalg.vector_norm(r))
    converged = False
    it = 0
    z, rz = _precondition(M, r, it)
    p = z
    while it < maxiter:
        Ap = A(p)
        num_matvecs += 1
        it += 1
        pAp = torch.dot(p, Ap)
        pAp_f = float(pAp)
        if not math.isfinite(pAp_f):
            raise NonFiniteError(
                f"cg: the operator returned NaN or Inf at iteration {it} (pᵀAp = {pAp_f})."
            )
        if pAp_f <= 0.0:
            raise SingularMetricError(
                f"cg: non-positive curvature pᵀAp = {pAp_f:.3e} at iteration {it}: the "
                "operator is not positive definite (it is indefinite or singular), so CG cannot "
                f"solve with it. {_DAMPING_HINT}"
            )
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rnorm = float(torch.linalg.vector_norm(r))
        if rnorm <= tol:
            r_true = b - A(x)
            num_matvecs += 1
            rnorm = float(torch.linalg.vector_norm(r_true))
            if rnorm <= tol:
                converged = True
                break
            r = r_true  # the recursive residual drifted: restart from the true one
            z, rz = _precondition(M, r, it)
            p = z
            continue
        z, rz_new = _precondition(M, r, it)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it, rnorm, converged, num_matvecs
