r"""Numerically null eigenvalues of E = G⁻¹ Hess: one definition for every method.

A model with an exact symmetry has directions along which the loss does not change. The
softmax is the everyday case: adding one vector to the logit weights (and one number to the
logit biases) of every class changes no prediction. Hess vanishes on those directions, so
E = G⁻¹ Hess has exact zero eigenvalues and log|det E| = −∞. In floating point they come out
as ±1e-17 × the spectrum's scale, and the logarithms of that round-off add up to a finite
number that changes from chart to chart.

covariant therefore calls an eigenvalue λ of E *numerically null* when

.. math::

    |λ| \le τ = \text{null\_rtol} \cdot \max_i |λ_i| ,

with ``null_rtol`` = max(1e-10, 100·eps) unless given (1e-10 in float64, 1.2e-5 in
float32: the same default as the numerical rank of the curvature metrics), and the
"logdet" and "det" measures are the pseudo-(log-)determinant over the other eigenvalues,
``Σ_{|λ|>τ} log|λ|`` (docs/math.md §4.1). The number of null eigenvalues is reported with it
(``info["num_null"]``, ``info["pseudo"]``). The dense method counts them exactly; stochastic
Lanczos quadrature (SLQ) estimates the count from the quadrature weight on null nodes.

**A metric with a kernel.** When G itself is singular (an undamped GGN or Fisher of a softmax
model), E is defined on the quotient by ker G, provided Hess vanishes on ker G too: then both
forms descend to the quotient, and its eigenproblem is the one restricted to range(G), which
does not depend on the chart. Both methods solve that restricted problem (the stochastic one
in the coordinates of range(G), found densely), report the kernel's dimension in
``info["num_gauge_directions"]``, and raise :class:`~covariant.errors.SingularMetricError`
when Hess does not vanish on ker G (E then has infinite eigenvalues; damp the metric). The
kernel of a metric pulled back through a submersion chart is its gauge space, handled as in
docs/math.md §5.

**The spectral-gap assumption of SLQ.** A Ritz value θ with residual bound r has an eigenvalue
of E within r. A node is *resolved* when the interval ``[|θ| − r, |θ| + r]`` lies on one side
of τ: null (``|θ| + r ≤ τ``) or not (``|θ| − r > τ``). Lanczos separates the null eigenvalues
from the smallest non-null one |λ|_min only after about ``√(max|λ| / |λ|_min)`` steps, so SLQ's
value is trustworthy only when there is such a gap and ``slq_steps`` resolves it. Otherwise
some quadrature weight sits on unresolved nodes, their logarithms are neither the null
eigenvalues' 0 nor a true log|λ|, and the standard error, which measures only the spread over
probes, does not cover the error. The measure then says ``converged=False`` and gives the
unresolved weight (in eigenvalues) in ``info["unresolved_weight"]``.

Example
-------
>>> import torch
>>> evals = torch.tensor([-3e-17, 1e-16, 0.5, 2.0, 4.0], dtype=torch.float64)
>>> det = pseudo_log_determinant(evals)
>>> det.num_null, round(det.log_abs, 10), det.sign   # log(0.5 · 2 · 4) = log 4
(2, 1.3862943611, 1.0)
>>> null_threshold(4.0, torch.float64)
4e-10
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import default_tol
from ..errors import SingularMetricError
from ..space import ParameterSpace

__all__ = ["NULL_RTOL", "MetricRange", "PseudoLogDet", "SLQPseudoLogDet",
           "check_hess_vanishes_on_kernel", "check_null_rtol", "hessian_scale",
           "kernel_is_gauge", "null_threshold",
           "pseudo_log_determinant", "restrict_to_range", "round_off_floor",
           "slq_pseudo_log_determinant"]

NULL_RTOL = 1e-10
"""Default ``null_rtol`` (floored at 100·eps of the dtype): far above the round-off of a null
eigenvalue (about d·eps relative), far below the eigenvalues that carry information."""

#: unresolved quadrature weight, in eigenvalues per probe, that SLQ tolerates
_UNRESOLVED_TOL = 0.5


def check_null_rtol(null_rtol: float | None, where: str) -> float | None:
    """``null_rtol`` if it is a number in [0, 1) (or None), else ``ValueError``."""
    if null_rtol is None:
        return None
    if isinstance(null_rtol, bool) or not isinstance(null_rtol, (int, float)) \
            or not 0.0 <= float(null_rtol) < 1.0:
        raise ValueError(f"{where}: null_rtol must be a number in [0, 1), got {null_rtol!r}")
    return float(null_rtol)


def null_threshold(scale: float, dtype: torch.dtype, null_rtol: float | None = None,
                   floor: float = 0.0) -> float:
    """τ = null_rtol · max(scale, floor), with ``scale`` = max|λ| (``null_rtol`` default:
    :data:`NULL_RTOL` floored at 100·eps of ``dtype``) and ``floor`` the round-off scale of
    the eigenvalues of a range-restricted problem (:func:`round_off_floor`)."""
    return default_tol(null_rtol, dtype, NULL_RTOL) * max(scale, floor)


def round_off_floor(hess_scale: float, metric_range_eigs: Tensor) -> float:
    """‖Hess‖ / λ_min⁺(G): how large round-off in Hess can make an eigenvalue of E restricted
    to range(G). It keeps τ meaningful when E vanishes altogether (the undamped empirical
    Fisher of N < d samples is the pullback of a flat metric under which L is linear, so its
    E is exactly 0)."""
    lam_min = float(metric_range_eigs.min()) if metric_range_eigs.numel() else 0.0
    return hess_scale / lam_min if lam_min > 0 else 0.0


@dataclass(frozen=True)
class PseudoLogDet:
    """log|det| over the eigenvalues above τ, their sign, and the count below."""

    log_abs: float
    sign: float
    num_null: int
    threshold: float


def pseudo_log_determinant(evals: Tensor, null_rtol: float | None = None,
                           floor: float = 0.0) -> PseudoLogDet:
    """The pseudo-log-determinant Σ_{|λ|>τ} log|λ| of exact eigenvalues ``evals``."""
    mags = evals.abs()
    scale = float(mags.max()) if mags.numel() else 0.0
    tau = null_threshold(scale, evals.dtype, null_rtol, floor)
    keep = mags > tau
    kept = evals[keep]
    return PseudoLogDet(float(kept.abs().log().sum()), float(torch.prod(torch.sign(kept))),
                        int((~keep).sum()), tau)


@dataclass(frozen=True)
class SLQPseudoLogDet:
    """The SLQ estimate of the pseudo-log-determinant, with what the quadrature resolved."""

    value: float
    stderr: float
    num_null: float
    """Estimated count of null eigenvalues: dim × the mean quadrature weight on null nodes."""
    unresolved_weight: float
    """Mean quadrature weight per probe (in eigenvalues) on nodes not resolved against τ."""
    threshold: float

    @property
    def resolved(self) -> bool:
        """True when less than half an eigenvalue's weight per probe is unresolved."""
        return self.unresolved_weight < _UNRESOLVED_TOL


def slq_pseudo_log_determinant(nodes: Tensor, weights: Tensor, residuals: Tensor, dim: int,
                               null_rtol: float | None = None, floor: float = 0.0
                               ) -> SLQPseudoLogDet:
    """The pseudo-log-determinant from SLQ's nodes, weights (each row summing to about 1) and
    Ritz residual bounds (all of shape (num_probes, num_steps)).

    τ is set from the largest |Ritz value| (the extreme Ritz values converge first). Nodes with
    |θ| ≤ τ count as null and add nothing; the others add ``dim · w · log|θ|``.
    """
    omega = weights.to(torch.float64) * dim
    theta = nodes.to(torch.float64)
    resid = residuals.to(torch.float64)
    live = omega != 0
    mags = theta.abs()
    scale = float(mags[live].max()) if bool(live.any()) else 0.0
    tau = null_threshold(scale, nodes.dtype, null_rtol, floor)
    null = live & (mags <= tau)
    unresolved = live & (mags + resid > tau) & (mags - resid <= tau)
    logs = torch.where(live & ~null, mags.clamp_min(tau if tau > 0 else 1e-300).log(),
                       torch.zeros_like(theta))
    samples = (omega * logs).sum(1)
    n = samples.shape[0]
    stderr = float(samples.std() / math.sqrt(n)) if n > 1 else math.nan
    return SLQPseudoLogDet(
        value=float(samples.mean()), stderr=stderr,
        num_null=float((omega * null).sum(1).mean()),
        unresolved_weight=float((omega.abs() * unresolved).sum(1).mean()),
        threshold=tau)


def kernel_is_gauge(space: ParameterSpace, p: Tensor, rank: int) -> bool:
    """True when the kernel of the metric (of dimension d − ``rank``) is the gauge space of
    the space's chart: a submersion θ = h(ψ) onto a space of dimension ``rank``."""
    h = space.chart
    return h is not None and not h.is_bijection and h.forward(p).shape[0] == rank


def hessian_scale(space: ParameterSpace, p: Tensor, steps: int = 20) -> float:
    """max(‖Hess‖₂, ‖∇²L‖₂) by power iteration (``steps`` products of each), the scale of
    the round-off in Hess: the connection term can cancel ∇²L almost entirely."""
    scale = 0.0
    for riemannian in (True, False):
        hvp = space.hvp_operator(p, riemannian=riemannian)
        v = torch.ones_like(p) / p.shape[0] ** 0.5
        for _ in range(steps):
            w = hvp(v)
            norm = float(w.norm())
            if norm == 0.0 or not math.isfinite(norm):
                break
            v = w / norm
        scale = max(scale, norm)
    return scale


@dataclass(frozen=True)
class MetricRange:
    """range(G) of a singular metric whose kernel Hess annihilates: G = Q diag(lam) Qᵀ."""

    basis: Tensor
    """Q, (d, rank), orthonormal."""
    eigenvalues: Tensor
    """lam, the positive eigenvalues of G (rank,)."""
    null_floor: float
    """The round-off floor of the null threshold on this range (:func:`round_off_floor`)."""


def restrict_to_range(space: ParameterSpace, p: Tensor, G: Tensor, rank: int,
                      hess_times: Callable[[Tensor], Tensor],
                      null_rtol: float | None = None) -> MetricRange:
    """range(G) from the dense G, after checking that Hess vanishes on ker G.

    ``hess_times(K)`` returns Hess K for a (d, d − rank) block (a dense product, or one
    Hessian-vector product per column); :class:`SingularMetricError` if it is not ≈ 0.
    """
    d = p.shape[0]
    lam, evecs = torch.linalg.eigh(G)
    K = evecs[:, : d - rank]
    scale = hessian_scale(space, p)
    if K.shape[1]:
        check_hess_vanishes_on_kernel(hess_times(K), scale, "flatness", null_rtol)
    return MetricRange(evecs[:, d - rank:], lam[d - rank:],
                       round_off_floor(scale, lam[d - rank:]))


def check_hess_vanishes_on_kernel(hess_kernel: Tensor, hess_scale: float, where: str,
                                  null_rtol: float | None = None) -> None:
    """Raise :class:`SingularMetricError` unless ‖Hess k‖ ≤ τ for each column
    Hess k of ``hess_kernel`` (k in an orthonormal basis of ker G), with τ relative to
    ``hess_scale`` (:func:`hessian_scale`)."""
    if hess_kernel.numel() == 0:
        return
    worst = float(torch.linalg.vector_norm(hess_kernel, dim=0).max())
    tau = null_threshold(hess_scale, hess_kernel.dtype, null_rtol)
    if worst > tau:
        raise SingularMetricError(
            f"{where}: the metric is singular and Hess does not vanish on its kernel "
            f"(‖Hess k‖ = {worst:.3e} > {tau:.3e} for a unit kernel vector k), so G⁻¹Hess has "
            "infinite eigenvalues there. Damp the metric (--damping, or "
            "metrics.Damped(G, lam, reference=...)) (docs/math.md §4.2)."
        )
