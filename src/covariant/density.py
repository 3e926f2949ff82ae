r"""Densities under reparametrization, the Riemannian volume, log det G, and MAP (MATH.md §2, §7).

A probability density with respect to Lebesgue measure is *not* a scalar: under θ = h(ψ),

    log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|,

so its mode moves. The density with respect to the Riemannian volume dV = √det G dθ,

    log q = log p − ½ log det G,

is a scalar, q_Ψ(ψ) = q_Θ(h(ψ)), and its modes are the same point in every chart.

This module provides

- :func:`pushforward_log_prob`, :func:`riemannian_log_prob` and :func:`lift_log_prob` (a
  density through a *submersion*, given a density along its fibres);
- :func:`logdet`, log det G(p) three ways: ``"closed"`` (metrics pulled back from a constant
  or diagonal metric through charts, via ``log_abs_det_jacobian``), ``"dense"`` (Cholesky) and
  ``"slq"`` (stochastic Lanczos quadrature for the value, with an unbiased Hutchinson + CG
  estimator of the gradient tr(G⁻¹ ∂G), so that it can be used as a loss term);
- :func:`logdet_estimate`, the SLQ value and the per-coordinate gradient with standard errors;
- :func:`map_estimate`: MAP (``riemannian=False``) or the mode of q = p/√det G
  (``riemannian=True``), by damped Newton, L-BFGS or Adam.

Example
-------
>>> import torch
>>> from covariant.reparam import Log
>>> from covariant.metrics import Euclidean, Pullback
>>> normal = torch.distributions.Normal(0.5, 0.8)
>>> log_p = lambda x: normal.log_prob(x).sum()
>>> log_p_y = pushforward_log_prob(log_p, Log())  # y = e^x, ψ = y
>>> log_q_y = riemannian_log_prob(log_p_y, Pullback(Euclidean(), Log()))
>>> y = torch.tensor([1.7], dtype=torch.float64)
>>> bool(torch.allclose(log_q_y(y), log_p(y.log())))   # a scalar: q_Ψ(ψ) = q_Θ(h(ψ))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import hessian as func_hessian

from ._fast import is_transformed
from ._progress import progress_bar
from .errors import CovariantError, NonFiniteError, SingularMetricError
from .metrics import MAX_DENSE_DIM, Metric
from .reparam import Reparametrization

__all__ = [
    "LOGDET_METHODS",
    "LogDetEstimate",
    "MAPResult",
    "lift_log_prob",
    "logdet",
    "logdet_estimate",
    "map_estimate",
    "map_objective",
    "pushforward_log_prob",
    "riemannian_log_prob",
]

LOGDET_METHODS = ("auto", "closed", "dense", "slq")

#: Above this dimension ``logdet(method="auto")`` switches from dense Cholesky to SLQ when no
#: closed form applies.
AUTO_DENSE_LIMIT = 2048


# --------------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------------


def pushforward_log_prob(
    log_prob: Callable[[Tensor], Tensor], reparam: Reparametrization
) -> Callable[[Tensor], Tensor]:
    """log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|: the same distribution in the chart ψ.

    Raises :class:`~covariant.errors.NotABijectionError` for a submersion, which has no
    log|det J| (see :func:`lift_log_prob` for what can be done instead).
    """
    return reparam.pushforward_log_prob(log_prob)


def riemannian_log_prob(
    log_prob: Callable[[Tensor], Tensor], metric: Metric, *, method: str | None = None,
    **logdet_kwargs: Any,
) -> Callable[[Tensor], Tensor]:
    """log q(p) = log p(p) − ½ log det G(p): the density w.r.t. the Riemannian volume.

    It transforms as a scalar when ``log_prob`` is pushed forward and ``metric`` pulled back
    through the same chart. By default log det G is the closed form where one is known (for a
    degenerate metric, a submersion chart, the pseudo-log-determinant) and ``metric.logdet``
    otherwise; ``method`` and ``logdet_kwargs`` choose a :func:`logdet` method instead.
    """

    def log_q(p: Tensor) -> Tensor:
        if method is None:
            closed = metric.closed_form_logdet(p, pseudo=metric.is_degenerate(p))
            ld = metric.logdet(p) if closed is None else closed
        else:
            ld = logdet(metric, p, method=method, **logdet_kwargs)
        return log_prob(p) - 0.5 * ld

    return log_q


def lift_log_prob(
    log_prob: Callable[[Tensor], Tensor],
    reparam: Reparametrization,
    fiber_log_prob: Callable[[Tensor], Tensor],
) -> Callable[[Tensor], Tensor]:
    r"""A density on ψ whose pushforward through a *submersion* h is p_Θ.

    A density cannot be pushed *backwards* through a submersion θ = h(ψ) (k > d): many ψ give
    the same θ. One has to choose how the mass spreads along each fibre h⁻¹(θ). By the coarea
    formula,

    .. math::

        \log p_Ψ(ψ) = \log p_Θ(h(ψ)) + ½ \log\det(J Jᵀ)(ψ) + \log ρ(ψ)

    is a probability density on Ψ with h_# p_Ψ = p_Θ whenever ρ restricted to every fibre is a
    probability density with respect to the fibre's (k−d)-dimensional volume. ``fiber_log_prob``
    is log ρ. For weight normalization w = g v/‖v‖ the fibre of one row is the two rays
    {(±‖w‖, ±s ŵ) : s > 0}, so ρ = ½ ρ_s(‖v‖) for any density ρ_s of s = ‖v‖ on (0, ∞).

    Its Riemannian density with the pulled-back metric Jᵀ G_Θ J (pseudo-determinant
    det G_Θ · det J Jᵀ) is q_Ψ = q_Θ(h(ψ)) · ρ(ψ): the θ-part of its mode is the θ-mode.

    ``log det J Jᵀ`` comes from the chart's ``jjt_logdet`` when it has one (weight norm,
    charts by parameter name), else from a dense Jacobian.

    Example
    -------
    >>> import torch, math
    >>> from covariant.reparam import WeightNorm
    >>> h = WeightNorm((1, 2))                      # one row w ∈ ℝ², ψ = (g, v₁, v₂)
    >>> log_p = lambda w: -0.5 * (w**2).sum() - math.log(2 * math.pi)
    >>> rho = lambda psi: math.log(0.5) - psi[1:].norm()   # ½ · Exp(1) density of ‖v‖
    >>> log_p_psi = lift_log_prob(log_p, h, rho)
    >>> psi = torch.tensor([1.5, 0.3, 0.4], dtype=torch.float64)
    >>> round(float(log_p_psi(psi)), 6)   # log N(h(ψ)) + log(g/‖v‖) + log ρ
    -3.057412
    """
    if reparam.is_bijection:
        base = pushforward_log_prob(log_prob, reparam)
        return lambda psi: base(psi) + fiber_log_prob(psi)

    def log_prob_psi(psi: Tensor) -> Tensor:
        return log_prob(reparam.forward(psi)) + 0.5 * reparam.jjt_logdet(psi) + fiber_log_prob(
            psi
        )

    return log_prob_psi


# --------------------------------------------------------------------------------------------
# log det G, three ways
# --------------------------------------------------------------------------------------------


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


@dataclass
class LogDetEstimate:
    """A stochastic estimate of log det G(p) (and optionally of its gradient).

    Attributes
    ----------
    value : float
        SLQ estimate of log det G (the pseudo-log-determinant for a degenerate metric).
    stderr : float
        Its standard error over probes.
    num_matvecs : int
        Metric products used by SLQ.
    grad : Tensor or None
        Hutchinson + CG estimate of ∂_k log det G = tr(G⁻¹ ∂_k G), one value per coordinate.
    grad_stderr : Tensor or None
        Standard error of each gradient component.
    info : dict
        CG iterations and convergence flags.
    """

    value: float
    stderr: float
    num_matvecs: int
    grad: Tensor | None = None
    grad_stderr: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _hutchinson_probes(dim: int, num: int, seed: int, like: Tensor) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
    Z = torch.randint(0, 2, (num, dim), generator=gen).to(torch.float64) * 2 - 1
    return Z.to(dtype=like.dtype, device=like.device)


def _solves(
    matvec: Callable[[Tensor], Tensor], Z: Tensor, rtol: float | None
) -> tuple[Tensor, list[int]]:
    from .linalg import cg

    ys, iters = [], []
    for z in Z:
        res = cg(matvec, z, rtol=rtol)
        ys.append(res.x)
        iters.append(res.num_iters)
    return torch.stack(ys), iters


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
    from .linalg import slq

    p = p.detach()
    d = p.shape[0]
    A = _augmented_matvec(metric, p)
    with torch.no_grad():
        res = slq(A, d, num_probes=num_probes, num_steps=num_steps, seed=seed,
                  dtype=p.dtype, device=p.device, progress=progress)
    out = LogDetEstimate(res.value, res.stderr, res.num_matvecs)
    if with_grad:
        n = grad_probes or num_probes
        Z = _hutchinson_probes(d, n, seed, p)
        with torch.no_grad():
            Y, iters = _solves(A, Z, cg_rtol)
        samples = []
        for y, z in zip(Y, Z, strict=True):
            samples.append(func_grad(lambda q, y=y, z=z: _grad_surrogate(
                metric, q, y[None], z[None]))(p))
        S = torch.stack(samples)
        out.grad = S.mean(0)
        out.grad_stderr = S.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(
            p, float("nan"))
        out.info = {"cg_iters": iters}
    return out


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
    pseudo-log-determinant, the log of the product of the nonzero eigenvalues (MATH.md §5).

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
    # slq
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


# --------------------------------------------------------------------------------------------
# MAP and Riemannian MAP
# --------------------------------------------------------------------------------------------


@dataclass
class MAPResult:
    """Result of :func:`map_estimate`.

    Attributes
    ----------
    point : Tensor
        The estimate, in the space's chart.
    value : float
        The objective there: −log p (``riemannian=False``) or −log q = −log p + ½ log det G.
    converged : bool
        Whether the gradient norm reached ``tol`` (for Adam: whether it did at the end).
    num_iters : int
        Iterations (Newton steps, L-BFGS iterations or Adam steps).
    grad_norm : float
        ‖∇ objective‖ at ``point`` (the Euclidean norm in the chart's coordinates).
    riemannian : bool
    method : str
    history : list of float
        Objective values along the way.
    """

    point: Tensor
    value: float
    converged: bool
    num_iters: int
    grad_norm: float
    riemannian: bool
    method: str
    history: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point.detach().cpu().tolist(), "value": self.value,
            "converged": self.converged, "num_iters": self.num_iters,
            "grad_norm": self.grad_norm, "riemannian": self.riemannian, "method": self.method,
        }


def map_objective(
    space: Any, riemannian: bool = True, *, logdet_method: str = "auto", **logdet_kwargs: Any
) -> Callable[[Tensor], Tensor]:
    """The function MAP minimizes: −log p, or −log q = −log p + ½ log det G (Riemannian).

    Unchecked (no domain checks), so it runs inside ``torch.func`` transforms; the result is
    a differentiable scalar, usable as a training loss.

    Example
    -------
    >>> import torch, covariant as cv
    >>> space = cv.ParameterSpace.from_log_prob(lambda x: -0.5 * (x**2).sum())
    >>> y = space.reparametrize(cv.reparam.Exp())            # x = e^y
    >>> f = map_objective(y, riemannian=True)
    >>> float(f(torch.tensor([0.0], dtype=torch.float64)))   # −log q = x²/2 at x = 1
    0.5
    """
    base = space._loss
    if not riemannian:
        return base
    metric = space.metric

    def objective(p: Tensor) -> Tensor:
        return base(p) + 0.5 * logdet(metric, p, logdet_method, **logdet_kwargs)

    return objective


def _default_tol(p: Tensor) -> float:
    return 1e-9 if p.dtype == torch.float64 else 1e-4


def _safe_value(space: Any, f: Callable[[Tensor], Tensor], q: Tensor) -> float:
    try:
        space._check(q, "map_estimate")
        with torch.no_grad():
            v = float(f(q))
    except (CovariantError, RuntimeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


def _escape_saddle(
    space: Any, f: Callable[[Tensor], Tensor], p: Tensor, H: Tensor, f0: float
) -> Tensor | None:
    """A point below f0 along the most negative curvature direction of H, or None."""
    evals, evecs = torch.linalg.eigh(H)
    lam, v = float(evals[0]), evecs[:, 0]
    if lam >= 0:
        return None
    t = 1.0 / math.sqrt(-lam)
    for _ in range(40):
        for sign in (1.0, -1.0):
            q = p + sign * t * v
            if _safe_value(space, f, q) < f0 - 0.25 * (-lam) * t * t * 1e-2:
                return q.detach()
        t *= 0.5
    return None


def _newton(
    space: Any, f: Callable[[Tensor], Tensor], p: Tensor, steps: int, tol: float, bar: Any
) -> tuple[Tensor, bool, int, list[float]]:
    """Damped Newton: Levenberg damping where H is indefinite, Armijo backtracking, saddle
    escapes along negative curvature; ``converged`` means a small gradient and a positive
    definite Hessian (a local minimum), or a Newton decrement below rounding."""
    history = [_safe_value(space, f, p)]
    if not math.isfinite(history[0]):
        raise NonFiniteError(
            "map_estimate: the objective is not finite at the starting point p0; start inside "
            "the chart's domain and the density's support."
        )
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    escapes = 0
    for it in range(steps):
        g = func_grad(f)(p).detach()
        H = func_hessian(f)(p).detach()
        H = 0.5 * (H + H.T)
        L, info = torch.linalg.cholesky_ex(H)
        pd = int(info) == 0
        f0 = history[-1]
        gnorm = float(g.norm())
        if gnorm <= tol:
            if pd:
                return p, True, it, history
            q = _escape_saddle(space, f, p, H, f0) if escapes < 20 else None
            if q is None:
                return p, False, it, history
            escapes += 1
            p = q
            history.append(_safe_value(space, f, p))
            continue
        if pd:
            step = -torch.cholesky_solve(g[:, None], L)[:, 0]
            if -float(g @ step) <= 1e-10 * max(1.0, abs(f0)):
                # quadratic regime, f changes below rounding: full steps while |g| shrinks
                q = (p + step).detach()
                if math.isfinite(_safe_value(space, f, q)) and float(
                        func_grad(f)(q).norm()) < gnorm:
                    p = q
                    history.append(_safe_value(space, f, p))
                    continue
                return p, True, it, history  # the gradient is at its rounding floor
        mu, scale = 0.0, float(H.abs().max()) + 1e-12
        for _ in range(60):
            if int(info) == 0:
                break
            mu = max(2 * mu, 1e-10 * scale)
            L, info = torch.linalg.cholesky_ex(H + mu * eye)
        step = -torch.cholesky_solve(g[:, None], L)[:, 0]
        slope = float(g @ step)
        if slope >= 0:  # numerically not a descent direction: take the gradient
            step, slope = -g, -float(g @ g)
        t = 1.0
        for _ in range(60):
            fn = _safe_value(space, f, p + t * step)
            if fn <= f0 + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return p, False, it, history
        p = (p + t * step).detach()
        history.append(fn)
        bar.update(1)
        bar.set_postfix(loss=fn)
    g = func_grad(f)(p).detach()
    return p, bool(float(g.norm()) <= tol), steps, history


def map_estimate(
    space: Any,
    p0: Tensor,
    riemannian: bool = True,
    method: str = "newton",
    *,
    steps: int | None = None,
    lr: float | None = None,
    tol: float | None = None,
    logdet_method: str = "auto",
    logdet_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> MAPResult:
    r"""MAP estimate, or the Riemannian MAP (the mode of q = p/√det G), on a density space.

    ``riemannian=False`` minimizes the space's loss, −log p_Ψ: the ordinary MAP, which moves
    under a reparametrization because log p_Ψ gains log|det J|. ``riemannian=True`` minimizes

    .. math::

        −\log q(ψ) = −\log p_Ψ(ψ) + ½ \log\det G_Ψ(ψ),

    a scalar, so its minimizer is the same point in every chart: ψ* = h⁻¹(θ*). With G = I in
    the original chart it is the ordinary MAP there, in every chart (MATH.md §7).

    Parameters
    ----------
    space : ParameterSpace
        A density space (``ParameterSpace.from_log_prob``); its metric enters for
        ``riemannian=True``.
    p0 : Tensor
        Starting point (flat).
    method : {"newton", "lbfgs", "adam"}
        ``"newton"``: damped Newton with a dense Hessian (``torch.func``), Levenberg damping
        where the Hessian is indefinite and a backtracking (Armijo) line search that also
        rejects points outside the chart's domain; small d. ``"lbfgs"``: ``torch.optim.LBFGS``
        with a strong-Wolfe line search; medium d. ``"adam"``: a ``torch.optim.Adam`` loop, for
        networks and stochastic (``"slq"``) log-determinants.
    steps : int, optional
        Iteration budget (default 100 Newton steps, 500 L-BFGS iterations, 2000 Adam steps).
    lr : float, optional
        Step size for L-BFGS (default 1) and Adam (default 1e-2).
    tol : float, optional
        Stop when ‖∇ objective‖ <= tol (default 1e-9 in float64, 1e-4 in float32).
    logdet_method : str
        How log det G is computed (:func:`logdet`): "auto", "closed", "dense" or "slq".
    logdet_kwargs : dict, optional
        Passed to :func:`logdet` (e.g. ``num_probes``). With ``"slq"`` each Adam step draws
        fresh probes (``seed`` = step), so the gradient is unbiased and independent per step.
    progress : bool
        A progress bar.

    Returns
    -------
    MAPResult

    Example
    -------
    >>> import torch, covariant as cv
    >>> normal = torch.distributions.Normal(0.5, 0.8)
    >>> x_space = cv.ParameterSpace.from_log_prob(lambda x: normal.log_prob(x).sum())
    >>> y_space = x_space.reparametrize(cv.reparam.Log())     # x = log y
    >>> y0 = torch.tensor([1.0], dtype=torch.float64)
    >>> round(float(map_estimate(y_space, y0, riemannian=False).point), 6)  # e^{μ−σ²}
    0.869358
    >>> round(float(map_estimate(y_space, y0, riemannian=True).point), 6)   # e^{μ}
    1.648721
    """
    if method not in ("newton", "lbfgs", "adam"):
        raise ValueError(
            f"map_estimate: method must be 'newton', 'lbfgs' or 'adam', got {method!r}"
        )
    if not getattr(space, "is_density", False):
        raise ValueError(
            "map_estimate: needs a density space (ParameterSpace.from_log_prob(...)): the MAP of "
            "a plain loss is its minimizer, and the Riemannian volume correction needs a density."
        )
    space._check(p0, "map_estimate")
    p = p0.detach().clone()
    tol_ = _default_tol(p) if tol is None else float(tol)
    lk = dict(logdet_kwargs or {})
    stochastic = logdet_method == "slq" and riemannian
    if stochastic and method != "adam":
        raise ValueError(
            "map_estimate: logdet_method='slq' gives a stochastic gradient; use method='adam'"
        )
    f = map_objective(space, riemannian, logdet_method=logdet_method, **lk)
    n_steps = steps if steps is not None else {"newton": 100, "lbfgs": 500, "adam": 2000}[method]
    bar = progress_bar(None, enabled=progress, total=n_steps, desc=f"map ({method})")
    try:
        if method == "newton":
            p, converged, iters, history = _newton(space, f, p, n_steps, tol_, bar)
        elif method == "lbfgs":
            x = p.clone().requires_grad_(True)
            opt = torch.optim.LBFGS(
                [x], lr=1.0 if lr is None else lr, max_iter=n_steps, tolerance_grad=tol_,
                tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe",
            )
            history = []

            def closure() -> Tensor:
                opt.zero_grad()
                loss = f(x)
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        "map_estimate (lbfgs): the objective became NaN or Inf; the line search "
                        "left the chart's domain. Use method='newton' (it rejects such points) "
                        "or a better p0."
                    )
                loss.backward()
                history.append(float(loss.detach()))
                bar.update(1)
                return loss

            opt.step(closure)
            p = x.detach()
            iters = int(opt.state[opt._params[0]].get("n_iter", 0))
            gn = float(func_grad(f)(p).norm())
            converged = gn <= tol_
        else:
            x = p.clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=1e-2 if lr is None else lr)
            history = []
            converged, iters = False, 0
            for it in range(n_steps):
                opt.zero_grad()
                if stochastic:
                    kw = {**lk, "seed": lk.get("seed", 0) * 100003 + it,
                          "estimate_value": False}
                    loss = space._loss(x) + 0.5 * logdet(space.metric, x, "slq", **kw)
                else:
                    loss = f(x)
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"map_estimate (adam): the objective became NaN or Inf at step {it}; "
                        "lower lr."
                    )
                loss.backward()
                gn = float(x.grad.norm())
                history.append(float(loss.detach()))
                iters = it + 1
                if gn <= tol_:
                    converged = True
                    break
                opt.step()
                bar.update(1)
            p = x.detach()
    finally:
        bar.close()
    space._check(p, "map_estimate (result)")
    if stochastic:
        value = float(space._loss(p)) + 0.5 * logdet_estimate(
            space.metric, p, **{k: v for k, v in lk.items()
                                if k in ("num_probes", "num_steps", "seed")}).value
        g = None
        with torch.enable_grad():
            q = p.clone().requires_grad_(True)
            loss = space._loss(q) + 0.5 * logdet(space.metric, q, "slq", **{
                **lk, "estimate_value": False})
            (g,) = torch.autograd.grad(loss, q)
        gn = float(g.norm())
    else:
        value = float(f(p))
        gn = float(func_grad(f)(p).norm())
    if not math.isfinite(value):
        raise NonFiniteError("map_estimate: the objective is not finite at the result")
    return MAPResult(p, value, bool(converged), int(iters), gn, riemannian, method, history)
