r"""log det G(p), three ways: closed form, dense Cholesky and stochastic Lanczos quadrature.

log det G enters the Riemannian volume dV = √det G dθ, so every Riemannian density and the
Riemannian MAP needs it (docs/math.md §7). For a degenerate metric (a pullback through a submersion
such as weight norm) it is the pseudo-log-determinant, the log of the product of the nonzero
eigenvalues (docs/math.md §5).

- :func:`logdet`: a differentiable scalar, by ``"closed"`` (metrics pulled back from a constant
  or diagonal metric through charts, via ``log_abs_det_jacobian``), ``"dense"`` (Cholesky) or
  ``"slq"`` (stochastic Lanczos quadrature for the value, with an unbiased Hutchinson + CG
  estimator of the gradient tr(G⁻¹ ∂G), so that it can be used as a loss term);
- :func:`logdet_estimate`: the SLQ value and the per-coordinate gradient with standard errors.

Example
-------
>>> import torch
>>> from covariant.metrics import Diagonal
>>> G = Diagonal(lambda p: 1 + p**2)
>>> p = torch.tensor([0.5, -2.0], dtype=torch.float64)
>>> truth = float((1 + p**2).log().sum())
>>> [abs(float(logdet(G, p, m)) - truth) < 1e-12 for m in ("closed", "dense", "auto")]
[True, True, True]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad

from .._fast import is_transformed
from ..errors import SingularMetricError
from ..linalg import cg, slq
from ..linalg.probes import probe_block
from ..metrics import MAX_DENSE_DIM, Metric
from .results import LogDetEstimate

__all__ = ["AUTO_DENSE_LIMIT", "LOGDET_METHODS", "LogDetEstimate", "logdet", "logdet_estimate"]

LOGDET_METHODS = ("auto", "closed", "dense", "slq")

#: Above this dimension ``logdet(method="auto")`` switches from dense Cholesky to SLQ when no
#: closed form applies.
AUTO_DENSE_LIMIT = 2048


def _augmented_matvec(metric: Metric, p: Tensor) -> Callable[[Tensor], Tensor]:
    """v ↦ (G + U Uᵀ) v, with U an orthonormal basis of ker G (pseudo-determinant trick).

    For a symmetric PSD G whose kernel is spanned by the orthonormal U,
    det(G + U Uᵀ) = pdet(G), the product of the nonzero eigenvalues.
    """
    U = metric.kernel_basis(p) if metric.is_degenerate(p) else None
    if metric.is_degenerate(p) and U is None:
        raise SingularMetricError(
            f"logdet: {metric!r} is degenerate at this point (rank {metric.rank(p)} < "
            f"{p.shape[0]}) and does not expose its kernel (gauge_directions), so its "
            "pseudo-log-determinant cannot be estimated matrix-free. Use method='dense'."
        )
    if U is None:
        return lambda v: metric.matvec(p, v)
    return lambda v: metric.matvec(p, v) + U @ (U.T @ v)


def _dense_logdet(metric: Metric, p: Tensor, max_dim: int | None) -> Tensor:
    G = metric.dense(p, max_dim=max_dim)
    G = 0.5 * (G + G.T)
    if metric.is_degenerate(p):
        U = metric.kernel_basis(p)
        if U is not None:
            G = G + U @ U.T
        else:
            rank = metric.rank(p)
            return torch.linalg.eigvalsh(G)[-rank:].log().sum()
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        raise SingularMetricError(
            f"logdet: the dense metric {metric!r} is not positive definite at this point. "
            "Damp it with covariant.metrics.Damped(G, lam, reference=...) or use a bijective "
            "chart."
        )
    return 2 * torch.diagonal(L).log().sum()


def _hutchinson_probes(dim: int, num: int, seed: int, like: Tensor) -> Tensor:
    """``num`` Rademacher probes as the rows of a ``(num, dim)`` block, in ``like``'s dtype and
    on its device, from a CPU generator seeded with ``seed + 7919`` (a stream apart from the
    SLQ probes of the same ``seed``).

    They are :func:`covariant.linalg.probes.probe_block` for the seed ``seed + 7919``.
    """
    return probe_block(int(seed) + 7919, dim, num, "rademacher", like.dtype, like.device).T


def _solves(
    matvec: Callable[[Tensor], Tensor], Z: Tensor, rtol: float | None
) -> tuple[Tensor, dict[str, Any]]:
    """y_i = A⁻¹ z_i by CG for every row z_i of Z; the CG diagnostics in a dict."""
    ys, iters, converged, matvecs = [], [], [], 0
    for z in Z:
        res = cg(matvec, z, rtol=rtol)
        ys.append(res.x)
        iters.append(res.num_iters)
        converged.append(bool(res.converged))
        matvecs += res.num_matvecs
    return torch.stack(ys), {"cg_iters": iters, "cg_converged": converged, "cg_matvecs": matvecs}


def _grad_surrogate(metric: Metric, p: Tensor, Y: Tensor, Z: Tensor) -> Tensor:
    """s(p) = mean_i ⟨y_i, A(p) z_i⟩ with y_i = A⁻¹z_i held fixed: ∇s = mean_i z_iᵀA⁻¹(∂A)z_i."""
    A = _augmented_matvec(metric, p)
    total = p.new_zeros(())
    for y, z in zip(Y, Z, strict=True):
        total = total + torch.dot(y, A(z))
    return total / Z.shape[0]


class _SLQLogDet(torch.autograd.Function):
    """Value: an SLQ estimate (given). Gradient: the Hutchinson + CG estimate of tr(G⁻¹∂G)."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, value: Tensor, grad_est: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad_est)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad_est,) = ctx.saved_tensors
        return grad_out * grad_est, None, None


def logdet_estimate(
    metric: Metric,
    p: Tensor,
    *,
    num_probes: int = 16,
    num_steps: int = 30,
    seed: int = 0,
    with_grad: bool = False,
    grad_probes: int | None = None,
    cg_rtol: float | None = None,
    progress: bool = False,
) -> LogDetEstimate:
    r"""Stochastic log det G(p) by SLQ, and optionally its gradient with error bars.

    Value: stochastic Lanczos quadrature, ``covariant.linalg.slq(G·, d, fn=log)``.

    Gradient: ∂_k log det G = tr(G⁻¹ ∂_k G) = E_z[zᵀ G⁻¹ (∂_k G) z] (Rademacher z). For every
    probe, y = G⁻¹ z by conjugate gradients, and the gradient sample is
    ∇_p ⟨y, G(p) z⟩ with y held fixed: one vector-Jacobian product of p ↦ G(p) z. The mean
    is unbiased (up to the CG tolerance); ``grad_stderr`` is the per-component standard error.

    For a degenerate metric with known kernel U (a submersion chart) both use G + U Uᵀ, whose
    determinant is the pseudo-determinant of G.

    Example
    -------
    >>> import torch
    >>> from covariant.metrics import Diagonal
    >>> G = Diagonal(lambda p: 1 + p**2)
    >>> p = torch.linspace(-1, 1, 50, dtype=torch.float64)
    >>> est = logdet_estimate(G, p, num_probes=4, num_steps=10)
    >>> abs(est.value - float((1 + p**2).log().sum())) < 1e-8  # diagonal: exact quadrature
    True
    """
    p = p.detach()
    d = p.shape[0]
    A = _augmented_matvec(metric, p)
    with torch.no_grad():
        res = slq(A, d, num_probes=num_probes, num_steps=num_steps, seed=seed,
                  dtype=p.dtype, device=p.device, progress=progress)
    out = LogDetEstimate(res.value, res.stderr, res.num_matvecs)
    if with_grad:
        out.grad, out.grad_stderr, out.info = _grad_estimate(
            metric, p, grad_probes or num_probes, seed, cg_rtol)
        out.converged = all(out.info["cg_converged"])
    return out


def _grad_estimate(
    metric: Metric, p: Tensor, n: int, seed: int, cg_rtol: float | None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Hutchinson + CG estimate of ∇ log det G with ``n`` probes: (mean, stderr, CG info)."""
    Z = _hutchinson_probes(p.shape[0], n, seed, p)
    with torch.no_grad():
        Y, info = _solves(_augmented_matvec(metric, p), Z, cg_rtol)
    samples = []
    for y, z in zip(Y, Z, strict=True):
        samples.append(func_grad(lambda q, y=y, z=z: _grad_surrogate(
            metric, q, y[None], z[None]))(p))
    S = torch.stack(samples)
    stderr = S.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(
        p, float("nan"))
    return S.mean(0), stderr, info


def _slq_logdet(
    metric: Metric,
    p: Tensor,
    *,
    num_probes: int,
    num_steps: int,
    seed: int,
    grad_probes: int | None,
    estimate_value: bool,
    cg_rtol: float | None,
) -> Tensor:
    """``logdet(method="slq")``: the SLQ value (or 0 without ``estimate_value``) carrying the
    Hutchinson + CG gradient estimate as its autograd gradient."""
    if is_transformed(p):
        raise ValueError(
            "logdet(method='slq'): its gradient is a custom autograd estimate, which "
            "torch.func transforms (grad, jacrev, hessian) do not see. Differentiate it with "
            "torch.autograd (loss.backward()) instead, or use method='closed' / 'dense'."
        )
    pd = p.detach()
    d = pd.shape[0]
    if estimate_value:
        est = logdet_estimate(metric, pd, num_probes=num_probes, num_steps=num_steps, seed=seed)
        value = pd.new_tensor(est.value)
    else:
        value = pd.new_zeros(())
    if not p.requires_grad:
        return value
    n = grad_probes or num_probes
    Z = _hutchinson_probes(d, n, seed, pd)
    with torch.no_grad():
        Y, _ = _solves(_augmented_matvec(metric, pd), Z, cg_rtol)
    with torch.enable_grad():
        q = pd.clone().requires_grad_(True)
        s = _grad_surrogate(metric, q, Y, Z)
        (g,) = torch.autograd.grad(s, q)
    return _SLQLogDet.apply(p, value, g.detach())


def logdet(
    metric: Metric,
    p: Tensor,
    method: str = "auto",
    *,
    num_probes: int = 16,
    num_steps: int = 30,
    seed: int = 0,
    grad_probes: int | None = None,
    estimate_value: bool = True,
    cg_rtol: float | None = None,
    max_dim: int | None = None,
) -> Tensor:
    r"""log det G(p) as a differentiable scalar tensor (a loss term).

    For a degenerate metric (a pullback through a submersion such as weight norm) this is the
    pseudo-log-determinant, the log of the product of the nonzero eigenvalues (docs/math.md §5).

    Parameters
    ----------
    metric : Metric
    p : Tensor
        The point, flat.
    method : {"auto", "closed", "dense", "slq"}
        - ``"closed"``: Euclidean/constant/diagonal metrics and their pullbacks through charts,
          log det G_Ψ = log det G_Θ + 2 log|det J| (a submersion: + log det J Jᵀ). Exact and
          twice differentiable; O(d) for the built-in charts (closed-form
          ``log_abs_det_jacobian``); charts without one use a dense Jacobian.
        - ``"dense"``: Cholesky of the dense metric, O(d³); for small d (and tests).
        - ``"slq"``: the value is a stochastic Lanczos quadrature estimate
          (``num_probes`` × ``num_steps`` metric products) and the gradient is the unbiased
          Hutchinson + CG estimator of tr(G⁻¹ ∂G) (``grad_probes`` probes, fresh for every
          ``seed``). Differentiate it with autograd (``.backward()``); it cannot be
          differentiated twice. ``estimate_value=False`` skips SLQ (the value is then 0, the
          gradient unchanged): the cheap choice inside a training loop.
        - ``"auto"``: closed form if known, else dense up to d = 2048, else SLQ.

    Returns
    -------
    Tensor
        A 0-d tensor; with ``"slq"`` its gradient w.r.t. ``p`` is the stochastic estimate.

    Example
    -------
    >>> import torch
    >>> from covariant.metrics import Pullback, Euclidean
    >>> from covariant.reparam import Exp
    >>> G = Pullback(Euclidean(), Exp())                  # G_Ψ = diag(e^{2ψ})
    >>> psi = torch.tensor([0.5, -1.0], dtype=torch.float64)
    >>> float(logdet(G, psi, "closed")), float(logdet(G, psi, "dense"))
    (-1.0, -1.0)
    """
    if method not in LOGDET_METHODS:
        raise ValueError(f"logdet: method must be one of {LOGDET_METHODS}, got {method!r}")
    pseudo = metric.is_degenerate(p)
    if method in ("auto", "closed"):
        out = metric.closed_form_logdet(p, pseudo)
        if out is not None:
            return out
        if method == "closed":
            raise ValueError(
                f"logdet: no closed form is known for {metric!r}. Closed forms exist for "
                "Euclidean, Constant and Diagonal metrics and their pullbacks through charts "
                "(bijections via log_abs_det_jacobian, submersions via jjt_logdet). Use "
                "method='dense' (small d) or 'slq'."
            )
        method = "dense" if p.shape[0] <= AUTO_DENSE_LIMIT else "slq"
    if method == "dense":
        return _dense_logdet(metric, p, max_dim or MAX_DENSE_DIM)
    return _slq_logdet(metric, p, num_probes=num_probes, num_steps=num_steps, seed=seed,
                       grad_probes=grad_probes, estimate_value=estimate_value, cg_rtol=cg_rtol)
