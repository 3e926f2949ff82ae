"""Matrix-free linear algebra on plain callables.

An *operator* here is a callable ``matvec(v) -> A v`` on flat 1-D tensors of length ``dim``.
Nothing in this module builds a ``dim × dim`` matrix. Every routine is torch-native, so it runs
in float32 or float64 on whatever device the operator's tensors live on; only the tiny projected
(Lanczos) matrices are moved to the CPU in float64, where an ``m × m`` eigendecomposition is
cheapest and most accurate.

Contents (each a small pure function, named after its method):

- :func:`cg`: preconditioned conjugate gradients for SPD systems ``A x = b``.
- :func:`lanczos`: extreme eigenpairs by thick-restart (Krylov-Schur) Lanczos with full
  reorthogonalization, optionally in a ``B``-inner product. With ``matvec = G⁻¹ Hess`` and
  ``inner_matvec = G`` this is the spectrum of the shape operator (MATH.md §4).
- :func:`hutchinson`, :func:`hutchpp`, :func:`xtrace`: stochastic trace estimators with
  standard errors.
- :func:`slq`: stochastic Lanczos quadrature for ``tr f(A)`` (log-determinants).
- :func:`spectral_density`, :func:`dense_spectral_density`: Gaussian-broadened spectral densities.

Randomness is drawn from a CPU :class:`torch.Generator` seeded with ``seed`` and then moved to
the target device, so that a seed gives the same probes on every device.

Example
-------
>>> import torch
>>> from covariant.linalg import cg, hutchinson
>>> g = torch.Generator().manual_seed(0)
>>> X = torch.randn(20, 20, generator=g, dtype=torch.float64)
>>> A = X @ X.T + 20 * torch.eye(20, dtype=torch.float64)  # SPD
>>> cg(lambda v: A @ v, torch.ones(20, dtype=torch.float64)).converged
True
>>> est = hutchinson(lambda v: A @ v, 20, 100)
>>> abs(est.value - float(A.trace())) < 3 * est.stderr
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._progress import progress_bar
from .errors import NonFiniteError, NotConvergedError, ShapeMismatchError, SingularMetricError

__all__ = [
    "CGResult",
    "EigResult",
    "SLQResult",
    "TraceEstimate",
    "cg",
    "dense_spectral_density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "slq",
    "spectral_density",
    "xtrace",
]

Matvec = Callable[[Tensor], Tensor]
"""A linear operator as a callable on flat 1-D tensors: ``v ↦ A v``."""

Matmat = Callable[[Tensor], Tensor]
"""A linear operator applied to the columns of a ``(dim, b)`` block: ``V ↦ A V``."""

Distribution = Literal["rademacher", "gaussian"]

_DAMPING_HINT = (
    "Damp the metric in a way that keeps invariance, e.g. "
    "covariant.metrics.Damped(G, lam, reference=...), or, for a submersion chart, work with the "
    "pseudo-inverse on the horizontal space (MATH.md §5)."
)


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass
class CGResult:
    """Result of :func:`cg`.

    Attributes
    ----------
    x : Tensor
        The approximate solution of ``A x = b``.
    num_iters : int
        CG iterations taken (one operator application each).
    residual_norm : float
        Euclidean norm ``‖b − A x‖`` of the final residual. When ``converged`` is True it was
        recomputed from ``x`` (not the recursively updated residual).
    converged : bool
        Whether ``residual_norm <= max(rtol·‖b‖, atol)``.
    num_matvecs : int
        Operator applications in total (iterations plus residual checks).
    """

    x: Tensor
    num_iters: int
    residual_norm: float
    converged: bool
    num_matvecs: int = 0


@dataclass
class EigResult:
    """Result of :func:`lanczos`.

    Attributes
    ----------
    eigenvalues : Tensor
        Ritz values, shape ``(k,)`` (``(2k,)`` for ``which="both"``), sorted descending.
    eigenvectors : Tensor
        Ritz vectors as columns, shape ``(dim, len(eigenvalues))``, orthonormal in the inner
        product ``⟨x, y⟩_B = xᵀ B y`` (the Euclidean one when no ``inner_matvec`` is given).
    residuals : Tensor
        Relative residuals ``‖A x − λ x‖_B / ρ`` per pair, recomputed with the operator, where
        ``ρ`` is the largest Ritz value in magnitude (an estimate of ``‖A‖``).
    converged : bool
        Whether every returned pair has ``residual <= tol``.
    num_matvecs : int
        Applications of ``matvec`` (including the final residual checks).
    num_inner_matvecs : int
        Applications of ``inner_matvec`` (0 without one).
    num_restarts : int
        Thick restarts performed.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    num_matvecs: int
    num_inner_matvecs: int = 0
    num_restarts: int = 0


@dataclass
class TraceEstimate:
    """Result of a stochastic trace estimator.

    Attributes
    ----------
    value : float
        The estimate of ``tr A``; equal to ``samples.mean()``.
    stderr : float
        Standard error of ``value``: ``samples.std() / sqrt(len(samples))``. NaN with a single
        sample, 0.0 when the trace was computed exactly.
    num_matvecs : int
        Operator applications used.
    samples : Tensor
        The exchangeable per-probe estimates whose mean is ``value``.
    """

    value: float
    stderr: float
    num_matvecs: int
    samples: Tensor


@dataclass
class SLQResult:
    """Result of :func:`slq`.

    Attributes
    ----------
    value : float
        Estimate of ``tr f(A)``; ``value = dim · mean_l Σ_j weights[l, j] · f(nodes[l, j])``.
    stderr : float
        Standard error over probes (NaN with a single probe).
    num_matvecs : int
        Applications of ``matvec``.
    nodes : Tensor
        Ritz values, shape ``(num_probes, num_steps)``. When a probe's Krylov space became
        invariant early its trailing entries repeat a valid node and carry zero weight.
    weights : Tensor
        Quadrature weights of the same shape; each row sums to ``‖z‖²/dim`` (exactly 1 for
        Rademacher probes).
    samples : Tensor
        Per-probe estimates of ``tr f(A)``, shape ``(num_probes,)``.
    num_inner_matvecs : int
        Applications of ``inner_matvec`` (0 without one).
    """

    value: float
    stderr: float
    num_matvecs: int
    nodes: Tensor
    weights: Tensor
    samples: Tensor
    num_inner_matvecs: int = 0


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _default_tol(tol: float | None, dtype: torch.dtype, base: float) -> float:
    """``tol`` if given, else ``base`` floored at what ``dtype`` can attain (100·eps)."""
    if tol is not None:
        return float(tol)
    return max(base, 100.0 * torch.finfo(dtype).eps)


def _check_dim(dim: int) -> int:
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}.")
    return int(dim)


def _check_vector(y: Tensor, dim: int, who: str) -> Tensor:
    if not isinstance(y, Tensor) or y.shape != (dim,):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ShapeMismatchError(
            f"{who} must return a flat tensor of shape ({dim},), got {shape}. Operators in "
            "covariant.linalg act on flat 1-D vectors."
        )
    return y


def _check_finite(t: Tensor, what: str) -> None:
    # fast path: a NaN or Inf anywhere makes the sum non-finite (a finite sum proves all
    # entries finite); only an overflowing sum needs the elementwise test
    if math.isfinite(float(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"{what} contains NaN or Inf. Check the operator (loss, Hessian-vector product, "
            "metric solve) at this point."
        )


def _stderr(samples: Tensor) -> float:
    n = samples.numel()
    if n < 2:
        return math.nan
    return float(samples.std(unbiased=True)) / math.sqrt(n)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _probe(
    gen: torch.Generator,
    dim: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """One probe vector, drawn on the CPU (device-independent stream) and moved to ``device``."""
    if distribution == "rademacher":
        # drawn directly in the floating dtype: the same stream as int64, without a copy
        z = torch.randint(0, 2, (dim,), generator=gen, dtype=dtype).mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}.")
    return z.to(device)


def _probes(
    gen: torch.Generator,
    dim: int,
    num: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """``num`` probes as the columns of a ``(dim, num)`` block; drawn one by one so that the
    stream does not depend on how probes are batched."""
    cols = [_probe(gen, dim, distribution, dtype, device) for _ in range(num)]
    return torch.stack(cols, dim=1)


def _apply_block(
    matvec: Matvec,
    matmat: Matmat | None,
    X: Tensor,
    bar: Any = None,
) -> Tensor:
    """``A X`` for a ``(dim, b)`` block, by ``matmat`` when given, else column by column.

    The result is detached: estimators are not differentiated through, and keeping the
    autograd graphs of many Hessian-vector products alive would waste memory.
    """
    dim, b = X.shape
    if matmat is not None:
        Y = matmat(X)
        if not isinstance(Y, Tensor) or Y.shape != (dim, b):
            shape = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ShapeMismatchError(
                f"matmat must map a ({dim}, {b}) block to a ({dim}, {b}) block, got {shape}."
            )
        if bar is not None:
            bar.update(b)
        return Y.detach()
    cols = []
    for i in range(b):
        cols.append(_check_vector(matvec(X[:, i].contiguous()), dim, "matvec").detach())
        if bar is not None:
            bar.update(1)
    return torch.stack(cols, dim=1)


def _trace_setup(
    name: str,
    minimum: int,
    desc: str,
    matvec: Matvec,
    dim: int,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    matmat: Matmat | None,
    progress: bool,
) -> tuple[int, Any, TraceEstimate | None]:
    """Shared start of the low-rank trace estimators: checks, progress bar, and the exact
    trace when the budget covers the dimension (then the bar is already closed)."""
    dim = _check_dim(dim)
    if num_matvecs < minimum:
        raise ValueError(f"{name} needs num_matvecs >= {minimum}, got {num_matvecs}.")
    bar = progress_bar(None, enabled=progress, total=min(num_matvecs, dim), desc=desc)
    if num_matvecs >= dim:
        out = _exact_trace(matvec, dim, dtype, device, matmat, bar)
        bar.close()
        return dim, bar, out
    return dim, bar, None


def _exact_trace(
    matvec: Matvec,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    matmat: Matmat | None,
    bar: Any,
) -> TraceEstimate:
    """``tr A = Σ_i e_iᵀ A e_i`` with ``dim`` products: used when the budget allows it."""
    total = torch.zeros((), dtype=dtype, device=device)
    chunk = 256
    for start in range(0, dim, chunk):
        stop = min(dim, start + chunk)
        E = torch.zeros(dim, stop - start, dtype=dtype, device=device)
        idx = torch.arange(start, stop, device=device)
        E[idx, idx - start] = 1
        AE = _apply_block(matvec, matmat, E, bar)
        total = total + AE[idx, idx - start].sum()
    _check_finite(total, "The trace")
    return TraceEstimate(float(total), 0.0, dim, total.reshape(1))


# --------------------------------------------------------------------------------------------
# Conjugate gradients
# --------------------------------------------------------------------------------------------


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
    rtol_ = _default_tol(rtol, b.dtype, 1e-10)
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

    def precondition(r: Tensor, it: int) -> tuple[Tensor, Tensor]:
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

    converged = False
    it = 0
    z, rz = precondition(r, it)
    p = z
    while it < maxiter_:
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
            z, rz = precondition(r, it)
            p = z
            continue
        z, rz_new = precondition(r, it)
        p = z + (rz_new / rz) * p
        rz = rz_new

    if not converged and raise_on_failure:
        raise NotConvergedError(
            f"cg did not converge: residual norm {rnorm:.3e} > tolerance {tol:.3e} "
            f"(rtol={rtol_:.1e} × ‖b‖={bnorm:.3e}, atol={float(atol):.1e}) after {it} "
            f"iterations (maxiter={maxiter_}). Increase maxiter, loosen rtol/atol, pass a "
            "preconditioner, or, if the operator is an ill-conditioned metric, damp it "
            "(covariant.metrics.Damped). Pass raise_on_failure=False to get the last iterate."
        )
    return CGResult(x, it, rnorm, converged, num_matvecs)


# --------------------------------------------------------------------------------------------
# Lanczos eigensolver (Krylov-Schur thick restart, B-inner product)
# --------------------------------------------------------------------------------------------


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
    operator ``E = G⁻¹ Hess`` (MATH.md §4), computed with ``G``-solves only; no ``G^{-1/2}``.
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
    tol_ = _default_tol(tol, dtype, 1e-8) if tol is not None else max(
        1e-8, 1000.0 * torch.finfo(dtype).eps)
    eps = torch.finfo(dtype).eps
    gen = _generator(seed)
    counts = {"A": 0, "B": 0}
    keep = min(nwant + (m - nwant) // 2, m - 1) if m < dim else m
    bar = progress_bar(
        None, enabled=progress,
        total=m + max_restarts * (m - keep) + (nwant if residuals == "recompute" else 0),
        desc="lanczos",
    )

    def A(v: Tensor) -> Tensor:
        w = _check_vector(matvec(v), dim, "lanczos: matvec").detach()
        counts["A"] += 1
        bar.update(1)
        _check_finite(w, "lanczos: the output of matvec")
        return w

    def B(v: Tensor) -> Tensor:
        if inner_matvec is None:
            return v
        counts["B"] += 1
        return _check_vector(inner_matvec(v), dim, "lanczos: inner_matvec").detach()

    def b_norm(v: Tensor, Bv: Tensor, what: str) -> float:
        sq = float(torch.dot(v, Bv))
        if not math.isfinite(sq):
            raise NonFiniteError(f"lanczos: {what} has a non-finite B-norm.")
        if sq < 0.0:
            raise SingularMetricError(
                f"lanczos: vᵀBv = {sq:.3e} < 0 for {what}: inner_matvec is not positive "
                f"definite. {_DAMPING_HINT}"
            )
        return math.sqrt(sq)

    # The basis is stored row-major as (m, dim) and used through its transpose, so each
    # basis vector is contiguous and projections read V[:, :j] as a transposed block
    # (3-10x faster than a strided (dim, m) column slice; benchmarks/).
    # (empty, not zeros: a column is read only after it is written; restarts use all m)
    V = torch.empty(m, dim, dtype=dtype, device=device).T
    BV = V if inner_matvec is None else torch.empty(m, dim, dtype=dtype, device=device).T
    AV = torch.empty(m, dim, dtype=dtype, device=device).T if residuals == "basis" else None
    T = torch.zeros(m, m, dtype=torch.float64)

    def fresh(j: int) -> tuple[Tensor, Tensor, float]:
        """A random vector, B-orthonormalized against the first ``j`` basis vectors."""
        f = _probe(gen, dim, "gaussian", dtype, device)
        if j > 0:
            f, _ = _orthogonalize(f, V[:, :j], BV[:, :j])
        Bf = B(f)
        return f, Bf, b_norm(f, Bf, "the start vector")

    f, Bf, beta = fresh(0)
    j = 0
    restarts = 0
    scale = 0.0
    theta = torch.zeros(0, dtype=torch.float64)
    Y = torch.zeros(0, 0, dtype=torch.float64)
    broke = False
    while True:
        if broke:
            # Invariant subspace: continue with a fresh direction (its coupling to V is zero).
            f, Bf, beta = fresh(j)
        V[:, j] = f / beta
        if inner_matvec is not None:
            BV[:, j] = Bf / beta
        w = A(V[:, j])
        if AV is not None:
            AV[:, j] = w
        w, c = _orthogonalize(w, V[:, : j + 1], BV[:, : j + 1])
        c64 = c.to(device="cpu", dtype=torch.float64)
        T[: j + 1, j] = c64
        T[j, : j + 1] = c64
        f, Bf = w, B(w)
        beta = b_norm(f, Bf, "a Lanczos vector")
        j += 1
        theta, Y = torch.linalg.eigh(T[:j, :j])
        scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        broke = beta <= 100.0 * eps * scale
        # After a breakdown every Ritz pair is exact, but the Krylov space may have missed
        # eigenvalues (e.g. copies of a multiple one): keep exploring until the basis is full.
        # test only once the basis is about twice the wanted count: with fewer vectors a
        # loose tolerance can accept Ritz values that are not yet eigenvalues (benchmarks/)
        if j >= min(m, 2 * nwant + 1) and (not broke or j == m):
            want = _priority(j, which)[:nwant]
            est = beta * Y[j - 1, want].abs() / scale
            if bool((est <= tol_).all()):
                break
        if j == m:
            if m == dim or restarts >= max_restarts:
                break
            # Krylov-Schur thick restart: keep the `keep` most wanted Ritz vectors.
            kept = _priority(m, which)[:keep]
            Yk = Y[:, kept].to(dtype=dtype, device=device)
            V[:, :keep] = V @ Yk
            if inner_matvec is not None:
                BV[:, :keep] = BV @ Yk
            if AV is not None:
                AV[:, :keep] = AV @ Yk
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[kept])
            j = keep
            restarts += 1

    want = _priority(j, which)[:nwant]
    want = want[torch.argsort(theta[want], descending=True)]
    values = theta[want]
    Yw = Y[:, want].to(dtype=dtype, device=device)
    X = V[:, :j] @ Yw
    AX = AV[:, :j] @ Yw if AV is not None else None
    res = torch.empty(len(want), dtype=torch.float64)
    for i in range(len(want)):
        x = X[:, i]
        r = (A(x) if AX is None else AX[:, i]) - float(values[i]) * x
        res[i] = b_norm(r, B(r), "a residual") / scale
    bar.close()
    return EigResult(
        eigenvalues=values.to(dtype=dtype, device=device),
        eigenvectors=X,
        residuals=res.to(dtype=dtype, device=device),
        converged=bool((res <= tol_).all()),
        num_matvecs=counts["A"],
        num_inner_matvecs=counts["B"],
        num_restarts=restarts,
    )


# --------------------------------------------------------------------------------------------
# Trace estimators
# --------------------------------------------------------------------------------------------


def hutchinson(
    matvec: Matvec,
    dim: int,
    num_probes: int,
    *,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    quadratic_form: Callable[[Tensor], Tensor] | None = None,
) -> TraceEstimate:
    r"""Hutchinson's trace estimator.

    .. math::

        \operatorname{tr} A ≈ \frac{1}{N} \sum_{l=1}^{N} z_lᵀ A z_l, \qquad
        \mathbb{E}[z zᵀ] = I,

    with Rademacher (±1) or standard Gaussian probes ``z_l``. Unbiased for any square ``A``,
    symmetric or not (e.g. the shape operator ``E = G⁻¹ Hess``). Its variance is
    ``2‖A_s‖_F² − 2Σ_i A_ii²`` (Rademacher) or ``2‖A_s‖_F²`` (Gaussian), with ``A_s`` the
    symmetric part, so the relative error decays only like ``1/√N``.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``.
    dim : int
        Length of the vectors.
    num_probes : int
        Number of probes ``N`` (= operator applications).
    seed : int
        Seed of the probes.
    distribution : {"rademacher", "gaussian"}
        Probe distribution.
    dtype, device :
        Of the probes.
    matmat : callable, optional
        ``V ↦ A V`` on ``(dim, b)`` blocks; used instead of ``matvec`` to batch probes.
    batch_size : int, optional
        Probes per ``matmat`` call (default: all at once).
    progress : bool
        Show a progress bar over probes.
    quadratic_form : callable, optional
        ``z ↦ zᵀ A z`` (a 0-d tensor), used instead of ``matvec`` when given: the estimator
        needs only these, and they can be cheaper than products (for a Hessian, Taylor mode,
        ``covariant._fast.QuadraticForm``). Probes are the same as with ``matvec``.

    Returns
    -------
    TraceEstimate

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> est = hutchinson(lambda v: A @ v, 10, 20, seed=0)
    >>> est.value  # a diagonal matrix: Rademacher probes give the exact trace
    55.0
    """
    dim = _check_dim(dim)
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
    gen = _generator(seed)
    bar = progress_bar(None, enabled=progress, total=num_probes, desc="hutchinson")
    if matmat is None or quadratic_form is not None:  # one probe at a time, no block copies
        values = []
        for _ in range(num_probes):
            z = _probe(gen, dim, distribution, dtype, device)
            if quadratic_form is not None:
                values.append(torch.as_tensor(quadratic_form(z)).detach().reshape(()))
            else:
                values.append(torch.dot(z, _check_vector(matvec(z), dim, "matvec")
                                        .detach()))
            bar.update(1)
        bar.close()
        s = torch.stack(values)
        _check_finite(s, "hutchinson: the probe values zᵀAz")
        return TraceEstimate(float(s.mean()), _stderr(s), num_probes, s)
    bs = batch_size or num_probes
    samples = []
    for start in range(0, num_probes, bs):
        b = min(bs, num_probes - start)
        Z = _probes(gen, dim, b, distribution, dtype, device)
        AZ = _apply_block(matvec, matmat, Z, bar)
        samples.append((Z * AZ).sum(0))
    bar.close()
    s = torch.cat(samples)
    _check_finite(s, "hutchinson: the probe values zᵀAz")
    return TraceEstimate(float(s.mean()), _stderr(s), num_probes, s)


def hutchpp(
    matvec: Matvec,
    dim: int,
    num_matvecs: int,
    *,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    progress: bool = False,
) -> TraceEstimate:
    r"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff, SOSA 2021).

    Spend ``s = ⌊m/3⌋`` products on a sketch ``Q = orth(A S)``, ``s`` on ``A Q`` and the
    remaining ``h = m − 2s`` on Hutchinson probes ``G`` of the deflated remainder:

    .. math::

        \operatorname{tr} A ≈ \operatorname{tr}(Qᵀ A Q)
        + \frac{1}{h} \operatorname{tr}\big(Gᵀ (I − QQᵀ) A (I − QQᵀ) G\big).

    For symmetric PSD ``A`` the error decays like ``1/m`` instead of Hutchinson's ``1/√m``;
    it is especially effective for fast-decaying spectra. The estimate is unbiased for *any*
    square ``A`` (the identity ``tr A = tr(PAP) + tr((I−P)A(I−P))`` holds for every orthogonal
    projector ``P``), so non-symmetric operators such as ``G⁻¹ Hess`` are fine; the variance
    guarantee is only proven for the symmetric PSD case.

    ``samples`` are ``tr(QᵀAQ) + gᵀ(I−QQᵀ)A(I−QQᵀ)g`` per residual probe ``g``, so
    ``stderr`` is the standard error of the Hutchinson part (the sketch part is treated as
    fixed).

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``.
    dim : int
        Length of the vectors.
    num_matvecs : int
        Total budget ``m >= 3`` of operator applications. If ``m >= dim`` the trace is computed
        exactly with ``dim`` products instead (``stderr = 0``).
    seed, distribution, dtype, device, matmat, progress :
        As in :func:`hutchinson`.

    Returns
    -------
    TraceEstimate

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(0.5 ** torch.arange(200, dtype=torch.float64))
    >>> est = hutchpp(lambda v: A @ v, 200, 30)
    >>> abs(est.value - 2.0) < 1e-2
    True
    """
    dim, bar, exact = _trace_setup("hutchpp", 3, "hutch++", matvec, dim, num_matvecs,
                                   dtype, device, matmat, progress)
    if exact is not None:
        return exact
    gen = _generator(seed)
    s = num_matvecs // 3
    h = num_matvecs - 2 * s
    S = _probes(gen, dim, s, distribution, dtype, device)
    Gp = _probes(gen, dim, h, distribution, dtype, device)
    Q, _ = torch.linalg.qr(_apply_block(matvec, matmat, S, bar))
    t_low = (Q * _apply_block(matvec, matmat, Q, bar)).sum()
    Gp = Gp - Q @ (Q.T @ Gp)
    AG = _apply_block(matvec, matmat, Gp, bar)
    bar.close()
    samples = t_low + (Gp * AG).sum(0)
    _check_finite(samples, "hutchpp: the estimates")
    return TraceEstimate(float(samples.mean()), _stderr(samples), num_matvecs, samples)


def xtrace(
    matvec: Matvec,
    dim: int,
    num_matvecs: int,
    *,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    progress: bool = False,
) -> TraceEstimate:
    r"""XTrace, the exchangeable trace estimator (Epperly, Tropp & Webber, SIMAX 2024).

    With ``n = ⌊m/2⌋`` probes ``Ω = [ω_1 … ω_n]``, let ``Q_i`` be an orthonormal basis of
    ``A Ω_{−i}`` (all probes but the ``i``-th) and ``P_i = Q_i Q_iᵀ``. Each probe gives an
    unbiased estimate

    .. math::

        t_i = \operatorname{tr}(Q_iᵀ A Q_i) + ω_iᵀ (I − P_i) A (I − P_i) ω_i,

    and XTrace returns ``mean(t_i)`` with the error estimate ``std(t_i)/√n`` as ``stderr``.
    All ``n`` leave-one-out bases come from a single QR ``A Ω = Q R``: ``Q_i Q_iᵀ =
    Q (I − s_i s_iᵀ) Qᵀ``, with ``s_i`` the normalized ``i``-th column of ``R⁻ᵀ``. Cost: ``2n``
    products (``A Ω`` and ``A Q``). This is the basic estimator of the paper with Rademacher
    or Gaussian probes, not its "improved" normalized-probe variant.

    Each ``t_i`` is unbiased for any square ``A`` (``Q_i`` does not depend on ``ω_i``), so
    non-symmetric operators such as ``G⁻¹ Hess`` are fine; the variance bounds of the paper
    assume a symmetric ``A``.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``.
    dim : int
        Length of the vectors.
    num_matvecs : int
        Total budget ``m >= 4`` (an odd ``m`` wastes one). If ``m >= dim`` the trace is computed
        exactly with ``dim`` products instead (``stderr = 0``).
    seed, distribution, dtype, device, matmat, progress :
        As in :func:`hutchinson`.

    Returns
    -------
    TraceEstimate

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(0.5 ** torch.arange(200, dtype=torch.float64))
    >>> est = xtrace(lambda v: A @ v, 200, 30)
    >>> abs(est.value - 2.0) < 1e-3
    True
    """
    dim, bar, exact = _trace_setup("xtrace", 4, "xtrace", matvec, dim, num_matvecs,
                                   dtype, device, matmat, progress)
    if exact is not None:
        return exact
    gen = _generator(seed)
    n = num_matvecs // 2
    Om = _probes(gen, dim, n, distribution, dtype, device)
    Y = _apply_block(matvec, matmat, Om, bar)
    Q, R = torch.linalg.qr(Y)
    Z = _apply_block(matvec, matmat, Q, bar)
    bar.close()
    H = Q.T @ Z
    eye = torch.eye(n, dtype=dtype, device=R.device)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    if not bool(torch.isfinite(Rinv).all()):  # A Ω rank-deficient (e.g. rank(A) < n)
        Rinv = torch.linalg.pinv(R)
    S = Rinv.T
    S = S / torch.linalg.vector_norm(S, dim=0, keepdim=True)
    C = Q.T @ Om
    # (I − P_i) ω_i = ω_i − Q d_i with d_i = (I − s_i s_iᵀ) Qᵀ ω_i.
    D = C - S * (S * C).sum(0)
    APw = Y - Z @ D  # A (I − P_i) ω_i
    E = Q.T @ APw
    PAPw = APw - Q @ (E - S * (S * E).sum(0))  # (I − P_i) A (I − P_i) ω_i
    samples = torch.trace(H) - (S * (H @ S)).sum(0) + (Om * PAPw).sum(0)
    _check_finite(samples, "xtrace: the estimates")
    return TraceEstimate(float(samples.mean()), _stderr(samples), 2 * n, samples)


# --------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------


def _block_lanczos_runs(
    apply_A: Callable[[Tensor], Tensor],
    apply_B: Callable[[Tensor], Tensor] | None,
    Z: Tensor,
    m: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``b`` independent Lanczos runs (one per column of ``Z``), full reorthogonalization.

    Returns ``alpha (m, b)``, ``beta (m, b)`` (``beta[j]`` couples steps ``j`` and ``j+1``),
    the basis ``V (m, dim, b)``, the ``B``-norms of the start vectors ``(b,)`` and the Krylov
    dimension reached by each run ``(b,)``.
    """
    dim, b = Z.shape
    dtype, device = Z.dtype, Z.device
    BZ = Z if apply_B is None else apply_B(Z)
    znorm2 = (Z * BZ).sum(0)
    if bool((znorm2 <= 0).any()) or not bool(torch.isfinite(znorm2).all()):
        raise SingularMetricError(
            f"slq: a probe has zᵀBz <= 0 or non-finite: inner_matvec is not positive definite. "
            f"{_DAMPING_HINT}"
        )
    znorm = znorm2.sqrt()
    V = torch.zeros(m, dim, b, dtype=dtype, device=device)
    BV = V if apply_B is None else torch.zeros_like(V)
    alpha = torch.zeros(m, b, dtype=dtype, device=device)
    beta = torch.zeros(m, b, dtype=dtype, device=device)
    length = torch.full((b,), m, dtype=torch.long)
    active = torch.ones(b, dtype=torch.bool, device=device)
    eps = torch.finfo(dtype).eps
    V[0] = Z / znorm
    if apply_B is not None:
        BV[0] = BZ / znorm
    for j in range(m):
        w = apply_A(V[j])
        _check_finite(w, "slq: the output of matvec")
        Vj, BVj = V[: j + 1], BV[: j + 1]
        c = torch.zeros(j + 1, b, dtype=dtype, device=device)
        for _ in range(2):  # CGS2: "twice is enough"
            cj = torch.einsum("inb,nb->ib", BVj, w)
            w = w - torch.einsum("inb,ib->nb", Vj, cj)
            c = c + cj
        alpha[j] = c[j] * active
        if j == m - 1:
            break
        Bw = w if apply_B is None else apply_B(w)
        bj = (w * Bw).sum(0).clamp_min(0).sqrt()
        scale = alpha[: j + 1].abs().amax(0)
        if j > 0:
            scale = scale + beta[:j].abs().amax(0)
        stop = active & (bj <= 100 * eps * scale.clamp_min(1e-300))
        for col in torch.nonzero(stop).flatten().tolist():
            length[col] = j + 1
        active = active & ~stop
        if not bool(active.any()):
            break
        safe = torch.where(active, bj, torch.ones_like(bj))
        beta[j] = bj * active
        V[j + 1] = w / safe * active
        if apply_B is not None:
            BV[j + 1] = Bw / safe * active
    return alpha, beta, V, znorm, length


def slq(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int = 10,
    num_steps: int = 30,
    fn: Callable[[Tensor], Tensor] = torch.log,
    seed: int = 0,
    inner_matvec: Matvec | None = None,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    inner_matmat: Matmat | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> SLQResult:
    r"""Stochastic Lanczos quadrature for ``tr f(A)`` (Ubaru, Chen & Saad, SIMAX 2017).

    For a symmetric ``A`` and each probe ``z_l``, ``m`` Lanczos steps from ``z_l/‖z_l‖`` give
    ``T_l = Y diag(θ) Yᵀ``, and Gauss quadrature (exact for polynomials of degree ``≤ 2m−1``)

    .. math::

        z_lᵀ f(A) z_l ≈ ‖z_l‖² \sum_{j=1}^{m} τ_{lj} f(θ_{lj}),\quad τ_{lj} = Y_{1j}^2,
        \qquad \operatorname{tr} f(A) ≈ \frac{1}{N}\sum_l z_lᵀ f(A) z_l .

    With ``fn=torch.log`` this is ``log det A``.

    **Generalized problem** (``inner_matvec = B``, ``matvec = B⁻¹H``): the target is
    ``tr f(B⁻¹H) = tr f(B^{-1/2} H B^{-1/2})``. Gauss quadrature for it would need probes with
    covariance ``B⁻¹`` (``w = B^{-1/2} u``), i.e. a square root of ``B``. Instead we keep
    plain probes (``E[z zᵀ] = I``, so ``E[zᵀ f(A) z] = tr f(A)`` although ``f(A)`` is not
    symmetric) and evaluate each quadratic form with Lanczos in the ``B``-inner product: from
    ``v_1 = z/‖z‖_B`` gives ``f(A) z ≈ ‖z‖_B V f(T) e_1`` (the Lanczos
    approximation of a matrix function, exact for polynomials of degree ``≤ m−1``), hence

    .. math::

        zᵀ f(A) z ≈ \sum_j ω_j f(θ_j),\qquad ω_j = ‖z‖_B\,(zᵀ V y_j)\,(y_j)_1 .

    No ``B^{-1/2}`` is needed, the weights still sum to ``zᵀz`` and the rule reduces to Gauss
    quadrature when ``B = I``. The weights may be negative, and the rule is exact to degree
    ``m−1`` rather than ``2m−1``, so it needs about twice the steps (more for ill-conditioned
    ``B⁻¹H``; compare two values of ``num_steps``). If a whitened operator
    ``B^{-1/2} H B^{-1/2}`` is available, passing it as ``matvec`` without ``inner_matvec``
    gives plain Gauss quadrature instead. For log-determinants alone,
    ``log det(B⁻¹H) = log det H − log det B`` takes two plain SLQ runs and no solves at all.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v``; ``A`` symmetric, or ``B``-self-adjoint with ``inner_matvec``.
    dim : int
        Length of the vectors.
    num_probes : int
        Number of probes ``N``.
    num_steps : int
        Lanczos steps ``m`` per probe (capped at ``dim``).
    fn : callable
        Elementwise function on tensors of Ritz values (e.g. ``torch.log``, ``torch.exp``,
        ``lambda x: x ** 2``).
    seed : int
        Seed of the probes (the same stream as :func:`hutchinson`).
    inner_matvec : callable, optional
        ``v ↦ B v`` for an SPD ``B``: estimate ``tr f(B⁻¹H)`` as above.
    distribution : {"rademacher", "gaussian"}
        Probe distribution.
    dtype, device :
        Of the probes and Lanczos vectors.
    matmat : callable, optional
        ``V ↦ A V`` on ``(dim, b)`` blocks: runs ``batch_size`` probes' Lanczos recurrences in
        lockstep, one block product per step.
    inner_matmat : callable, optional
        ``V ↦ B V`` on blocks, used instead of ``inner_matvec`` in the batched runs.
    batch_size : int, optional
        Probes per batch with ``matmat`` (default all; memory ``num_steps · dim · batch_size``).
    progress : bool
        Show a progress bar over probes.

    Returns
    -------
    SLQResult

    Raises
    ------
    SingularMetricError
        If ``fn`` is ``torch.log`` and a Ritz value is ``<= 0`` (the operator is not positive
        definite, so the log-determinant is undefined), or if ``inner_matvec`` is not SPD.
    NonFiniteError
        If ``fn`` returns NaN or Inf at a Ritz value.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(1.0, 10.0, 50, dtype=torch.float64))
    >>> res = slq(lambda v: A @ v, 50, num_probes=5, num_steps=20)
    >>> exact = float(torch.linalg.eigvalsh(A).log().sum())
    >>> abs(res.value - exact) < 1e-8  # diagonal A and Rademacher probes: no sampling error
    True
    """
    dim = _check_dim(dim)
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    m = min(int(num_steps), dim)
    gen = _generator(seed)
    counts = {"A": 0, "B": 0}

    def apply_A(X: Tensor) -> Tensor:
        counts["A"] += X.shape[1]
        return _apply_block(matvec, matmat, X)

    apply_B: Callable[[Tensor], Tensor] | None = None
    if inner_matvec is not None or inner_matmat is not None:
        inner = inner_matvec

        def apply_B(X: Tensor) -> Tensor:
            counts["B"] += X.shape[1]
            return _apply_block(inner, inner_matmat, X)  # type: ignore[arg-type]

    bs = (batch_size or num_probes) if matmat is not None else 1
    bar = progress_bar(None, enabled=progress, total=num_probes, desc="slq")
    all_nodes, all_weights = [], []
    for start in range(0, num_probes, bs):
        b = min(bs, num_probes - start)
        Z = _probes(gen, dim, b, distribution, dtype, device)
        alpha, beta, V, znorm, length = _block_lanczos_runs(apply_A, apply_B, Z, m)
        a64 = alpha.to(device="cpu", dtype=torch.float64)
        b64 = beta.to(device="cpu", dtype=torch.float64)
        for col in range(b):
            L = int(length[col])
            T = torch.diag(a64[:L, col])
            if L > 1:
                off = b64[: L - 1, col]
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            theta, Yt = torch.linalg.eigh(T)
            if apply_B is None:
                w = float(znorm[col]) ** 2 * Yt[0] ** 2
            else:
                u = (V[:L, :, col] @ Z[:, col]).to(device="cpu", dtype=torch.float64)
                w = float(znorm[col]) * (u @ Yt) * Yt[0]
            nodes = torch.full((m,), float(theta[-1]), dtype=torch.float64)
            weights = torch.zeros(m, dtype=torch.float64)
            nodes[:L] = theta
            weights[:L] = w
            all_nodes.append(nodes)
            all_weights.append(weights)
        bar.update(b)
    bar.close()
    nodes = torch.stack(all_nodes)
    omega = torch.stack(all_weights)

    if fn is torch.log and bool((nodes <= 0).any()):
        bad = float(nodes.min())
        raise SingularMetricError(
            f"slq with fn=log met the Ritz value {bad:.3e} <= 0: the operator is not positive "
            "definite, so its log-determinant is undefined (a negative-curvature direction or a "
            "singular matrix). Use a positive-definite operator (e.g. away from saddle points), "
            f"or damp it. {_DAMPING_HINT}"
        )
    fvals = fn(nodes)
    if not isinstance(fvals, Tensor) or fvals.shape != nodes.shape:
        raise ShapeMismatchError("slq: fn must act elementwise on a tensor of Ritz values.")
    fvals = torch.where(omega != 0, fvals.to(torch.float64), torch.zeros_like(nodes))
    if not bool(torch.isfinite(fvals).all()):
        hint = (
            " Some Ritz values are <= 0: the operator is not positive definite."
            if bool((nodes <= 0).any())
            else ""
        )
        raise NonFiniteError(
            f"slq: fn returned NaN or Inf at a Ritz value in [{float(nodes.min()):.3e}, "
            f"{float(nodes.max()):.3e}]; fn must be finite on the spectrum of the operator." + hint
        )
    samples = (omega * fvals).sum(1)
    return SLQResult(
        value=float(samples.mean()),
        stderr=_stderr(samples),
        num_matvecs=counts["A"],
        nodes=nodes.to(dtype=dtype, device=device),
        weights=(omega / dim).to(dtype=dtype, device=device),
        samples=samples.to(dtype=dtype, device=device),
        num_inner_matvecs=counts["B"],
    )


# --------------------------------------------------------------------------------------------
# Spectral densities
# --------------------------------------------------------------------------------------------


def spectral_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""Gaussian-broadened spectral density from quadrature nodes and weights.

    .. math::

        ρ(t) = \frac{\sum_{l,j} w_{lj}\, φ_σ(t − θ_{lj})}{\sum_{l,j} w_{lj}},\qquad
        φ_σ(x) = \frac{e^{-x²/(2σ²)}}{σ\sqrt{2π}},

    which integrates to 1 over the real line (to ≈1 over a grid that covers the nodes by a few
    ``σ``). With SLQ nodes/weights this is the estimator of Ubaru, Chen & Saad (2017) and
    Ghorbani, Krishnan & Xiao (2019).

    Parameters
    ----------
    nodes, weights : Tensor
        Same shape, e.g. ``(num_probes, num_steps)`` from :func:`slq`.
    grid : Tensor
        1-D evaluation points; the result has its dtype and device.
    sigma : float
        Broadening width, > 0.

    Returns
    -------
    Tensor
        The density on ``grid``.

    Examples
    --------
    >>> import torch
    >>> grid = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    >>> rho = spectral_density(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), grid, 0.3)
    >>> round(float(torch.trapezoid(rho, grid)), 6)
    1.0
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if nodes.shape != weights.shape:
        raise ShapeMismatchError(
            f"nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} differ in shape."
        )
    if grid.ndim != 1:
        raise ShapeMismatchError(f"grid must be 1-D, got shape {tuple(grid.shape)}.")
    theta = nodes.reshape(-1).to(dtype=grid.dtype, device=grid.device)
    w = weights.reshape(-1).to(dtype=grid.dtype, device=grid.device)
    total = w.sum()
    if float(total) <= 0:
        raise ValueError("spectral_density: the weights must have a positive sum.")
    out = torch.empty_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    chunk = max(1, 4_000_000 // max(1, theta.numel()))
    for start in range(0, grid.numel(), chunk):
        g = grid[start : start + chunk]
        phi = torch.exp(-0.5 * ((g[:, None] - theta[None, :]) / sigma) ** 2) * norm
        out[start : start + chunk] = phi @ w
    return out / total


def dense_spectral_density(eigenvalues: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""Gaussian-broadened density of a known spectrum: ``ρ(t) = (1/n) Σ_i φ_σ(t − λ_i)``.

    The dense ground truth that :func:`spectral_density` of SLQ output approximates.

    Examples
    --------
    >>> import torch
    >>> grid = torch.linspace(-3, 4, 701, dtype=torch.float64)
    >>> rho = dense_spectral_density(torch.tensor([0.0, 1.0]), grid, 0.2)
    >>> round(float(torch.trapezoid(rho, grid)), 6)
    1.0
    """
    eig = eigenvalues.reshape(-1)
    return spectral_density(eig, torch.ones_like(eig), grid, sigma)
