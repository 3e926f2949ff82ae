r"""Damped Newton with saddle escapes: the ``"newton"`` method of MAP.

Minimizes a smooth objective f with its dense gradient and Hessian (``torch.func``):

- where H is positive definite, the Newton step −H⁻¹∇f; where it is not, the Levenberg step
  −(H + μI)⁻¹∇f with the smallest μ (doubling from 10⁻¹⁰·max|H|) that makes H + μI positive
  definite;
- an Armijo backtracking line search on ``value``, a *safe* objective that returns +∞ outside
  the chart's domain or the density's support, so steps never leave it;
- at a stationary point with an indefinite Hessian, a step along the most negative curvature
  direction (a saddle escape);
- ``converged`` means a small gradient and a positive definite Hessian (a local minimum), or
  a Newton decrement below rounding.

Example
-------
>>> import torch
>>> from covariant._progress import progress_bar
>>> f = lambda x: (x**4).sum() / 4 - (x**2).sum() / 2 + 0.1 * x.sum()   # a maximum near 0.1
>>> value = lambda x: float(f(x))
>>> p, converged, iters, history = _newton(f, value, torch.tensor([0.1], dtype=torch.float64),
...                                        50, 1e-10, progress_bar(None))
>>> converged, round(float(p), 6), history[-1] < history[0]   # a minimum: x³ − x = −0.1
(True, -1.046681, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import hessian as func_hessian

from ..errors import NonFiniteError

__all__: list[str] = []

Objective = Callable[[Tensor], Tensor]
SafeValue = Callable[[Tensor], float]


def _escape_saddle(value: SafeValue, p: Tensor, H: Tensor, f0: float) -> Tensor | None:
    """A point below f0 along the most negative curvature direction of H, or None."""
    evals, evecs = torch.linalg.eigh(H)
    lam, v = float(evals[0]), evecs[:, 0]
    if lam >= 0:
        return None
    t = 1.0 / math.sqrt(-lam)
    for _ in range(40):
        for sign in (1.0, -1.0):
            q = p + sign * t * v
            if value(q) < f0 - 0.25 * (-lam) * t * t * 1e-2:
                return q.detach()
        t *= 0.5
    return None


def _damped_direction(g: Tensor, H: Tensor, L: Tensor, info: Tensor) -> tuple[Tensor, float]:
    """The Levenberg step −(H + μI)⁻¹ g (μ = 0 when ``info`` says L is H's Cholesky factor)
    and its slope gᵀ step; the steepest-descent step −g if that is not a descent direction."""
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
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
    return step, slope


def _armijo(
    value: SafeValue, p: Tensor, step: Tensor, slope: float, f0: float
) -> tuple[float, float] | None:
    """(t, f(p + t step)) for the first t = 1, ½, ¼, ... with sufficient decrease, or None."""
    t = 1.0
    for _ in range(60):
        fn = value(p + t * step)
        if fn <= f0 + 1e-4 * t * slope:
            return t, fn
        t *= 0.5
    return None


def _newton(
    f: Objective, value: SafeValue, p: Tensor, steps: int, tol: float, bar: Any
) -> tuple[Tensor, bool, int, list[float]]:
    """Minimize ``f`` from ``p``: (point, converged, iterations, objective history).

    ``value(q)`` is ``float(f(q))``, or +∞ where q is outside the domain; ``bar`` a progress
    bar (``update``, ``set_postfix``).
    """
    history = [value(p)]
    if not math.isfinite(history[0]):
        raise NonFiniteError(
            "map_estimate: the objective is not finite at the starting point p0; start inside "
            "the chart's domain and the density's support."
        )
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
            q = _escape_saddle(value, p, H, f0) if escapes < 20 else None
            if q is None:
                return p, False, it, history
            escapes += 1
            p = q
            history.append(value(p))
            continue
        if pd:
            step = -torch.cholesky_solve(g[:, None], L)[:, 0]
            if -float(g @ step) <= 1e-10 * max(1.0, abs(f0)):
                # quadratic regime, f changes below rounding: full steps while |g| shrinks
                q = (p + step).detach()
                if math.isfinite(value(q)) and float(func_grad(f)(q).norm()) < gnorm:
                    p = q
                    history.append(value(p))
                    continue
                return p, True, it, history  # the gradient is at its rounding floor
        step, slope = _damped_direction(g, H, L, info)
        accepted = _armijo(value, p, step, slope, f0)
        if accepted is None:
            return p, False, it, history
        t, fn = accepted
        p = (p + t * step).detach()
        history.append(fn)
        bar.update(1)
        bar.set_postfix(loss=fn)
    g = func_grad(f)(p).detach()
    return p, bool(float(g.norm()) <= tol), steps, history
