r"""Diagnostics for users' own losses, derivatives, charts and metrics (pymanopt style).

A derivative is checked against its function by the decay of a Taylor remainder. For a
random unit direction v and steps t on a log grid,

    e₁(t) = |f(p + t v) − f(p) − t ∇f(p)·v|                       = O(t²)
    e₂(t) = |f(p + t v) − f(p) − t ∇f(p)·v − ½ t² vᵀ∇²f(p) v|     = O(t³)
    e_h(t) = ‖h(ψ + t v) − h(ψ) − t J(ψ) v‖                        = O(t²)

when the gradient ∇f, the Hessian product ∇²f v and the chart Jacobian product J v are right.
A wrong one leaves a term of lower order (e₁ = O(t), e₂ = O(t²), e_h = O(t)). The *slope* of
log e against log t, taken where e lies above round-off (e > 10³ ε · the magnitude of the
terms) and on the small-step half of that region, tells the two apart: a check passes when
``slope ≥ expected − tol`` (a higher slope means a better model, e.g. a vanishing third
derivative along v). When the model is exact (a linear loss for ``check_gradient``, a
quadratic one for ``check_hessian``), every error is round-off: the check passes with
``slope = None`` and ``info["exact"] = True``.

Besides the slope, :func:`check_hessian` checks symmetry (u·∇²f v = v·∇²f u),
:func:`check_chart` that ``vjp`` is the adjoint of ``jvp`` (⟨w, J v⟩ = ⟨Jᵀ w, v⟩), that
``inverse_jvp`` is a right inverse (J J⁺ J v = J v) and that ``inverse`` is a section
(h(h⁻¹(θ)) = θ), and :func:`check_metric` the algebra of a metric: symmetric, positive
semidefinite, ``solve`` inverting ``matvec`` on its range (G G⁺ G u = G u), and ``inner``
consistent with ``matvec``. Use float64: in float32 the region above round-off is short.

Example
-------
>>> import torch
>>> from covariant.diagnostics import check_gradient, check_hessian
>>> loss = lambda p: (p.sin() * p).sum()
>>> p = torch.tensor([0.3, -0.5, 1.2], dtype=torch.float64)
>>> r = check_gradient(loss, p)
>>> r.passed, round(r.slope)
(True, 2)
>>> wrong = check_gradient(loss, p, grad=lambda q: q.cos())  # drops the product rule
>>> wrong.passed, round(wrong.slope)
(False, 1)
>>> round(check_hessian(loss, p).slope)
3
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import CovariantError, require
from .metrics import Metric
from .reparam import Reparametrization
from .space import ParameterSpace

__all__ = ["CheckResult", "check_chart", "check_gradient", "check_hessian", "check_metric"]

_ROUNDOFF = 1e3  # an error counts as signal above _ROUNDOFF · ε · (magnitude of the terms)
_FAILURES = (CovariantError, ValueError, FloatingPointError)  # a step outside the domain


@dataclass
class CheckResult:
    """The outcome of one diagnostic.

    Attributes
    ----------
    name : str
        Which check ran (``"gradient"``, ``"hessian"``, ``"chart"``, ``"metric"``).
    passed : bool
        Slope and every side condition (in ``info``) within tolerance.
    slope : float or None
        Fitted log-log slope of the Taylor remainder; None for an exact model (errors at
        round-off) and for :func:`check_metric`, which has no remainder.
    expected_slope : float or None
        2 for a first-order model, 3 for a second-order one.
    steps, errors : list of float
        The steps t and the remainders e(t) (NaN where the step left the domain).
    info : dict
        Side checks (relative residuals and their tolerance), ``exact``, and ``used``: the
        indices of the steps the slope was fitted on.
    """

    name: str
    passed: bool
    slope: float | None = None
    expected_slope: float | None = None
    steps: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {"name": self.name, "passed": self.passed, "slope": self.slope,
                "expected_slope": self.expected_slope, "steps": list(self.steps),
                "errors": list(self.errors), "info": dict(self.info)}

    def plot(self, ax: Any = None) -> Any:
        """Log-log plot of e(t) with a reference line of the expected slope (matplotlib)."""
        if ax is None:
            plt = require("matplotlib.pyplot", "plots")
            _, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.loglog(self.steps, self.errors, "o-", ms=3, label="Taylor remainder")
        used = self.info.get("used", [])
        if used and self.expected_slope is not None:
            t0, e0 = self.steps[used[0]], self.errors[used[0]]
            ts = [self.steps[i] for i in used]
            ax.loglog(ts, [e0 * (t / t0) ** self.expected_slope for t in ts], "--",
                      label=f"slope {self.expected_slope:g}")
        ax.set_xlabel("step t")
        ax.set_ylabel("error")
        ax.set_title(f"check_{self.name}: slope {self.slope}, passed {self.passed}")
        ax.legend()
        return ax


# ------------------------------------------------------------------ the slope of a remainder
def _steps(steps: Tensor | None, like: Tensor) -> Tensor:
    if steps is None:
        return torch.logspace(-8, 0, 33, dtype=like.dtype, device=like.device)
    return torch.as_tensor(steps, dtype=like.dtype, device=like.device).reshape(-1)


def _unit(v: Tensor | None, like: Tensor, gen: torch.Generator) -> Tensor:
    """``v`` normalized to unit length; a random direction when None."""
    if v is None:
        v = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    v = v.to(dtype=like.dtype, device=like.device)
    return v / torch.linalg.vector_norm(v)


def _remainder_slope(steps: Tensor, errors: Tensor, magnitude: Tensor
                     ) -> tuple[float | None, list[int], bool]:
    """(slope, indices used, exact): the median local log-log slope over the small-step half
    of the steps whose error lies above round-off. ``exact`` when every finite error is
    round-off."""
    eps = torch.finfo(errors.dtype).eps
    finite = torch.isfinite(errors)
    signal = finite & (errors > _ROUNDOFF * eps * magnitude)
    pairs = [i for i in range(len(steps) - 1) if signal[i] and signal[i + 1]]
    if len(pairs) < 3:
        return None, [], bool(finite.any()) and not bool(signal.any())
    pairs = pairs[: max(3, math.ceil(len(pairs) / 2))]
    logs_t, logs_e = steps.log(), errors.log()
    local = torch.stack([(logs_e[i + 1] - logs_e[i]) / (logs_t[i + 1] - logs_t[i])
                         for i in pairs])
    used = sorted({j for i in pairs for j in (i, i + 1)})
    return float(local.median()), used, False


def _result(name: str, steps: Tensor, errors: Tensor, magnitude: Tensor, expected: float,
            tol: float, side: dict[str, Any], plot: bool) -> CheckResult:
    slope, used, exact = _remainder_slope(steps, errors, magnitude)
    slope_ok = exact or (slope is not None and slope >= expected - tol)
    sides_ok = all(v["residual"] <= v["rtol"] for v in side.values())
    info = {"exact": exact, "used": used, "tol": tol, **side}
    if slope is None and not exact:
        info["reason"] = "fewer than 4 consecutive steps with an error above round-off"
    result = CheckResult(name, bool(slope_ok and sides_ok), slope, expected,
                         steps.tolist(), errors.tolist(), info)
    if plot:
        result.plot()
    return result


def _evaluate(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor | None:
    """fn(x), or None where x lies outside the domain (a typed error or a non-finite value)."""
    try:
        out = fn(x)
    except _FAILURES:
        return None
    return out if bool(torch.isfinite(out).all()) else None


def _rel(a: Tensor | float, b: Tensor | float, scale: Tensor | float) -> float:
    """|a − b| / scale (0/0 = 0)."""
    diff = float(torch.as_tensor(a - b).abs().max())
    scale = float(scale)
    return 0.0 if diff == 0.0 else diff / max(scale, torch.finfo(torch.float64).tiny)


def _loss_and_grad(space_or_loss: ParameterSpace | Callable[[Tensor], Tensor],
                   grad: Callable[[Tensor], Tensor] | None
                   ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    if isinstance(space_or_loss, ParameterSpace):
        loss = space_or_loss.loss
        default_grad = space_or_loss.grad
    elif callable(space_or_loss):
        loss = space_or_loss
        default_grad = torch.func.grad(space_or_loss)
    else:
        raise TypeError("expected a ParameterSpace or a callable loss, got "
                        f"{type(space_or_loss).__name__}")
    return loss, grad if grad is not None else default_grad


def _scalar_remainders(loss: Callable[[Tensor], Tensor], p: Tensor, v: Tensor, steps: Tensor,
                       terms: list[float]) -> tuple[Tensor, Tensor]:
    """|f(p + t v) − Σ_k tᵏ terms[k]| and the magnitude |f(p + t v)| + Σ_k |tᵏ terms[k]|."""
    errors, magnitude = [], []
    for t in steps.tolist():
        ft = _evaluate(loss, p + t * v)
        model = sum(c * t**k for k, c in enumerate(terms))
        size = sum(abs(c) * t**k for k, c in enumerate(terms))
        errors.append(math.nan if ft is None else abs(float(ft) - model))
        magnitude.append(size + (0.0 if ft is None else abs(float(ft))))
    return (torch.tensor(errors, dtype=torch.float64),
            torch.tensor(magnitude, dtype=torch.float64))


# ------------------------------------------------------------------ the public checks
def check_gradient(
    space_or_loss: ParameterSpace | Callable[[Tensor], Tensor],
    p: Tensor,
    grad: Callable[[Tensor], Tensor] | None = None,
    *,
    v: Tensor | None = None,
    steps: Tensor | None = None,
    tol: float = 0.1,
    seed: int = 0,
    plot: bool = False,
) -> CheckResult:
    r"""Check a gradient against its loss: e₁(t) = |f(p + tv) − f(p) − t ∇f(p)·v| = O(t²).

    Parameters
    ----------
    space_or_loss : ParameterSpace or callable
        A space (its ``loss`` and ``grad``) or a loss p ↦ f(p).
    p : Tensor
        The point (1-D, float64 recommended).
    grad : callable, optional
        p ↦ ∇f(p) to check; by default the space's ``grad`` (``torch.func.grad`` of a loss).
    v : Tensor, optional
        Direction (normalized); random (``seed``) by default.
    steps : Tensor, optional
        Steps t; 33 from 10⁻⁸ to 1 by default.
    tol : float
        Pass when the slope ≥ 2 − tol.
    plot : bool
        Draw :meth:`CheckResult.plot` (needs matplotlib).

    Returns
    -------
    CheckResult
        ``slope`` ≈ 2 for a right gradient, ≈ 1 for a wrong one.

    Examples
    --------
    >>> import torch, covariant as cv
    >>> space = cv.ParameterSpace(lambda p: (p**4).sum() + p[0] * p[1])
    >>> p = torch.tensor([0.3, -0.5], dtype=torch.float64)
    >>> check_gradient(space, p).passed
    True
    >>> check_gradient(space, p, grad=lambda q: 4 * q**3).passed  # misses p[0]·p[1]
    False
    """
    gen = torch.Generator().manual_seed(seed)
    loss, grad_fn = _loss_and_grad(space_or_loss, grad)
    v = _unit(v, p, gen)
    h = _steps(steps, p)
    f0, d1 = float(loss(p)), float(torch.dot(grad_fn(p), v))
    errors, magnitude = _scalar_remainders(loss, p, v, h, [f0, d1])
    return _result("gradient", h.double(), errors, magnitude, 2.0, tol, {}, plot)


def check_hessian(
    space_or_loss: ParameterSpace | Callable[[Tensor], Tensor],
    p: Tensor,
    hvp: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    grad: Callable[[Tensor], Tensor] | None = None,
    v: Tensor | None = None,
    steps: Tensor | None = None,
    tol: float = 0.1,
    rtol: float = 1e-8,
    seed: int = 0,
    plot: bool = False,
) -> CheckResult:
    r"""Check a Hessian-vector product: e₂(t) = |f(p+tv) − f − t ∇f·v − ½t² vᵀ∇²f v| = O(t³).

    The product checked is the Euclidean ∇²f(p) v (``space.hvp(p, v, riemannian=False)`` by
    default). It must also be symmetric: |u·∇²f v − v·∇²f u| ≤ rtol · (|u·∇²f v| + |v·∇²f u|)
    for a second random u (``info["symmetry"]``).

    Parameters
    ----------
    space_or_loss : ParameterSpace or callable
        A space or a loss p ↦ f(p).
    hvp : callable, optional
        (p, v) ↦ ∇²f(p) v to check; by default the space's Euclidean ``hvp`` (reverse over
        reverse autodiff of a loss).
    grad : callable, optional
        p ↦ ∇f(p) for the first-order term; the space's ``grad`` by default.
    v, steps, tol, seed, plot
        As in :func:`check_gradient`; pass when the slope ≥ 3 − tol.
    rtol : float
        Tolerance of the symmetry check.

    Examples
    --------
    >>> import torch
    >>> loss = lambda p: p.exp().sum() * p.pow(2).sum()
    >>> p = torch.tensor([0.2, -0.4, 0.6], dtype=torch.float64)
    >>> check_hessian(loss, p).passed
    True
    >>> H = torch.func.hessian(loss)(p)
    >>> bad = check_hessian(loss, p, hvp=lambda q, u: H.diag() * u)  # the diagonal only
    >>> bad.passed, round(bad.slope)
    (False, 2)
    """
    gen = torch.Generator().manual_seed(seed)
    loss, grad_fn = _loss_and_grad(space_or_loss, grad)
    if hvp is None:
        hvp = _default_hvp(space_or_loss)
    v = _unit(v, p, gen)
    u = _unit(None, p, gen)
    h = _steps(steps, p)
    f0, d1 = float(loss(p)), float(torch.dot(grad_fn(p), v))
    hv, hu = hvp(p, v), hvp(p, u)
    d2 = float(torch.dot(v, hv))
    uhv, vhu = float(torch.dot(u, hv)), float(torch.dot(v, hu))
    side = {"symmetry": {"residual": _rel(uhv, vhu, abs(uhv) + abs(vhu)), "rtol": rtol}}
    errors, magnitude = _scalar_remainders(loss, p, v, h, [f0, d1, 0.5 * d2])
    return _result("hessian", h.double(), errors, magnitude, 3.0, tol, side, plot)


def _default_hvp(space_or_loss: ParameterSpace | Callable[[Tensor], Tensor]
                 ) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(space_or_loss, ParameterSpace):
        space = space_or_loss
        return lambda q, w: space.hvp(q, w, riemannian=False)
    loss = space_or_loss
    return lambda q, w: torch.func.jvp(torch.func.grad(loss), (q,), (w,))[1]


def check_chart(
    chart: Reparametrization,
    psi: Tensor,
    *,
    v: Tensor | None = None,
    steps: Tensor | None = None,
    tol: float = 0.1,
    rtol: float = 1e-8,
    seed: int = 0,
    plot: bool = False,
) -> CheckResult:
    r"""Check a chart's Jacobian products: e_h(t) = ‖h(ψ + tv) − h(ψ) − t J(ψ) v‖ = O(t²).

    Side checks, each a relative residual against ``rtol`` in ``info``:

    - ``adjoint``: ⟨w, J v⟩ = ⟨Jᵀ w, v⟩ for a random w (``vjp`` is the transpose of ``jvp``);
    - ``right_inverse``: J J⁺ (J v) = J v (``inverse_jvp``; J⁻¹ for a bijection, the
      pseudo-inverse for a submersion);
    - ``section``: h(h⁻¹(θ)) = θ at θ = h(ψ) (``inverse``).

    Parameters
    ----------
    chart : Reparametrization
        θ = h(ψ), bound to its parameter's shape where that matters (``WeightNorm``).
    psi : Tensor
        A point of the chart's domain (e.g. ``chart.inverse(theta)``).
    v, steps, tol, seed, plot
        As in :func:`check_gradient`; steps leaving the domain are skipped.
    rtol : float
        Tolerance of the side checks.

    Examples
    --------
    >>> import torch, covariant as cv
    >>> psi = torch.tensor([0.5, -0.3, 1.0], dtype=torch.float64)
    >>> check_chart(cv.reparam.Softplus(), psi).passed
    True
    >>> class Wrong(cv.reparam.Exp):
    ...     def derivative(self, psi):
    ...         return 2 * psi.exp()
    >>> r = check_chart(Wrong(), psi)
    >>> r.passed, round(r.slope)
    (False, 1)
    """
    gen = torch.Generator().manual_seed(seed)
    v = _unit(v, psi, gen)
    h = _steps(steps, psi)
    theta = chart(psi)
    jv = chart.jvp(psi, v)
    errors, magnitude = [], []
    for t in h.tolist():
        th = _evaluate(chart, psi + t * v)
        errors.append(math.nan if th is None
                      else float(torch.linalg.vector_norm(th - theta - t * jv)))
        magnitude.append(float(theta.norm() + t * jv.norm()) + (0.0 if th is None
                                                                  else float(th.norm())))
    side = _chart_side_checks(chart, psi, v, theta, jv, gen, rtol)
    return _result("chart", h.double(), torch.tensor(errors, dtype=torch.float64),
                   torch.tensor(magnitude, dtype=torch.float64), 2.0, tol, side, plot)


def _chart_side_checks(chart: Reparametrization, psi: Tensor, v: Tensor, theta: Tensor,
                       jv: Tensor, gen: torch.Generator, rtol: float) -> dict[str, Any]:
    w = _unit(None, theta, gen)
    jtw = chart.vjp(psi, w)
    wjv, jtwv = torch.dot(w, jv), torch.dot(jtw, v)
    side = {"adjoint": {"residual": _rel(wjv, jtwv, jv.norm() + jtw.norm()), "rtol": rtol}}
    back = chart.jvp(psi, chart.inverse_jvp(psi, jv))
    side["right_inverse"] = {"residual": _rel(back, jv, jv.abs().max()), "rtol": rtol}
    try:
        again = chart(chart.inverse(theta))
    except NotImplementedError:
        return side
    side["section"] = {"residual": _rel(again, theta, theta.abs().max()), "rtol": rtol}
    return side


def check_metric(
    metric: Metric,
    p: Tensor,
    *,
    num_vectors: int = 3,
    rtol: float = 1e-8,
    seed: int = 0,
) -> CheckResult:
    r"""Check the algebra of a metric at p: symmetric, positive semidefinite, consistent.

    With random u, v (``num_vectors`` pairs), each check a relative residual in ``info``:

    - ``symmetry``: |uᵀG v − vᵀG u| ≤ rtol (|uᵀG v| + |vᵀG u|);
    - ``positivity``: min(0, uᵀG u) ≥ −rtol ‖G u‖ ‖u‖ (semidefinite: a pulled-back metric of a
      submersion chart is singular along its gauge directions);
    - ``solve``: G (G⁺ w) = w for w = G u in the range of G (``solve`` inverts ``matvec``,
      the pseudo-inverse for a singular metric);
    - ``inner``: ⟨u, v⟩_G = uᵀ (G v).

    There is no Taylor remainder here: ``slope`` is None.

    Examples
    --------
    >>> import torch, covariant as cv
    >>> p = torch.tensor([0.5, 2.0], dtype=torch.float64)
    >>> check_metric(cv.metrics.Diagonal(lambda q: q**2 + 1), p).passed
    True
    >>> skew = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)  # not symmetric
    >>> r = check_metric(cv.metrics.Dense(lambda q: skew), p)
    >>> r.passed, r.info["symmetry"]["residual"] > 0.1
    (False, True)
    """
    gen = torch.Generator().manual_seed(seed)
    worst = {"symmetry": 0.0, "positivity": 0.0, "solve": 0.0, "inner": 0.0}
    solve_error = None
    for _ in range(num_vectors):
        u, v = _unit(None, p, gen), _unit(None, p, gen)
        gu, gv = metric.matvec(p, u), metric.matvec(p, v)
        ugv, vgu = torch.dot(u, gv), torch.dot(v, gu)
        found = {
            "symmetry": _rel(ugv, vgu, ugv.abs() + vgu.abs()),
            "positivity": max(0.0, -float(torch.dot(u, gu))) / max(float(gu.norm()), 1e-300),
            "inner": _rel(metric.inner(p, u, v), ugv, ugv.abs() + gv.norm()),
        }
        try:
            found["solve"] = _rel(metric.matvec(p, metric.solve(p, gu)), gu, gu.abs().max())
        except CovariantError as err:  # e.g. a Cholesky failure on an indefinite matrix
            found["solve"], solve_error = math.inf, f"{type(err).__name__}: {err}"
        worst = {k: max(worst[k], found[k]) for k in worst}
    info: dict[str, Any] = {k: {"residual": r, "rtol": rtol} for k, r in worst.items()}
    if solve_error is not None:
        info["solve_error"] = solve_error
    return CheckResult("metric", all(r <= rtol for r in worst.values()), info=info)
