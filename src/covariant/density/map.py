r"""MAP and Riemannian MAP on a density space (docs/math.md §7).

The ordinary MAP minimizes −log p_Ψ; it moves under a reparametrization, because log p_Ψ
gains log|det J|. The Riemannian MAP minimizes

    −log q(ψ) = −log p_Ψ(ψ) + ½ log det G_Ψ(ψ),

a scalar, so its minimizer is the same point in every chart. :func:`map_objective` is that
objective (a differentiable training loss); :func:`map_estimate` minimizes it by damped Newton
(:mod:`~covariant.density.newton`), L-BFGS or Adam.

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace.from_log_prob(lambda x: -0.5 * ((x - 2.0)**2).sum())
>>> psi_space = space.reparametrize(cv.reparam.Exp())     # x = e^ψ
>>> res = map_estimate(psi_space, torch.tensor([0.3], dtype=torch.float64))
>>> res.converged, round(float(res.point.exp()), 9)      # x* = e^{ψ*} = 2, as in the chart x
(True, 2.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad as func_grad

from .._progress import progress_bar
from ..errors import CovariantError, NonFiniteError
from .logdet import logdet, logdet_estimate
from .newton import _newton
from .results import MAPResult

if TYPE_CHECKING:
    from ..space import ParameterSpace

__all__ = ["MAPResult", "map_estimate", "map_objective"]

MAP_METHODS = ("newton", "lbfgs", "adam")

#: Default iteration budget of each method.
DEFAULT_STEPS = {"newton": 100, "lbfgs": 500, "adam": 2000}

#: A step-dependent loss for Adam: (x, step) ↦ objective.
StepLoss = Callable[[Tensor, int], Tensor]


def map_objective(
    space: ParameterSpace, riemannian: bool = True, *, logdet_method: str = "auto",
    **logdet_kwargs: Any,
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
    base = space.loss_function
    if not riemannian:
        return base
    metric = space.metric

    def objective(p: Tensor) -> Tensor:
        return base(p) + 0.5 * logdet(metric, p, logdet_method, **logdet_kwargs)

    return objective


def _default_tol(p: Tensor) -> float:
    return 1e-9 if p.dtype == torch.float64 else 1e-4


def _safe_value(space: ParameterSpace, f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], float]:
    """q ↦ float(f(q)), or +∞ where q is outside the chart's domain or f is not finite."""

    def value(q: Tensor) -> float:
        try:
            space.check_point(q, "map_estimate")
            with torch.no_grad():
                v = float(f(q))
        except (CovariantError, RuntimeError, ValueError):
            return math.inf
        return v if math.isfinite(v) else math.inf

    return value


def _lbfgs(
    f: Callable[[Tensor], Tensor], p: Tensor, steps: int, lr: float | None, tol: float, bar: Any
) -> tuple[Tensor, bool, int, list[float]]:
    """``torch.optim.LBFGS`` with a strong-Wolfe line search: (point, converged, iters, history)."""
    x = p.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x], lr=1.0 if lr is None else lr, max_iter=steps, tolerance_grad=tol,
        tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe",
    )
    history: list[float] = []

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
    iters = int(opt.state[x].get("n_iter", 0))
    converged = float(func_grad(f)(p).norm()) <= tol
    return p, converged, iters, history


def _adam(
    loss_at: StepLoss, p: Tensor, steps: int, lr: float | None, tol: float, bar: Any
) -> tuple[Tensor, bool, int, list[float]]:
    """A ``torch.optim.Adam`` loop on ``loss_at(x, step)``: (point, converged, iters, history)."""
    x = p.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-2 if lr is None else lr)
    history: list[float] = []
    converged, iters = False, 0
    for it in range(steps):
        opt.zero_grad()
        loss = loss_at(x, it)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"map_estimate (adam): the objective became NaN or Inf at step {it}; lower lr."
            )
        loss.backward()
        gn = float(x.grad.norm())
        history.append(float(loss.detach()))
        iters = it + 1
        if gn <= tol:
            converged = True
            break
        opt.step()
        bar.update(1)
    return x.detach(), converged, iters, history


def _stochastic_loss(space: ParameterSpace, lk: dict[str, Any]) -> StepLoss:
    """−log p + ½ log det G with the SLQ gradient, fresh probes every step, no SLQ value."""

    def loss_at(x: Tensor, it: int) -> Tensor:
        kw = {**lk, "seed": lk.get("seed", 0) * 100003 + it, "estimate_value": False}
        return space.loss_function(x) + 0.5 * logdet(space.metric, x, "slq", **kw)

    return loss_at


def _stochastic_result(space: ParameterSpace, p: Tensor, lk: dict[str, Any]) -> tuple[float, float]:
    """(objective, gradient norm) at p with the SLQ log-determinant: the value by SLQ, the
    gradient by its Hutchinson + CG estimate."""
    slq_kw = {k: v for k, v in lk.items() if k in ("num_probes", "num_steps", "seed")}
    value = float(space.loss_function(p)) + 0.5 * logdet_estimate(space.metric, p, **slq_kw).value
    with torch.enable_grad():
        q = p.clone().requires_grad_(True)
        loss = space.loss_function(q) + 0.5 * logdet(
            space.metric, q, "slq", **{**lk, "estimate_value": False})
        (g,) = torch.autograd.grad(loss, q)
    _check_finite_result(value)
    return value, float(g.norm())


def _minimize(
    space: ParameterSpace, f: Callable[[Tensor], Tensor], loss_at: StepLoss | None, p: Tensor,
    method: str, steps: int, lr: float | None, tol: float, progress: bool,
) -> tuple[Tensor, bool, int, list[float]]:
    """Run ``method`` from ``p`` (Adam on ``loss_at`` when given, else on ``f``)."""
    bar = progress_bar(None, enabled=progress, total=steps, desc=f"map ({method})")
    try:
        if method == "newton":
            return _newton(f, _safe_value(space, f), p, steps, tol, bar)
        if method == "lbfgs":
            return _lbfgs(f, p, steps, lr, tol, bar)
        return _adam(loss_at or (lambda x, it: f(x)), p, steps, lr, tol, bar)
    finally:
        bar.close()


def _exact_result(f: Callable[[Tensor], Tensor], p: Tensor) -> tuple[float, float]:
    """(objective, gradient norm) at p; raises unless the objective is finite."""
    value, gn = float(f(p)), float(func_grad(f)(p).norm())
    _check_finite_result(value)
    return value, gn


def _check_finite_result(value: float) -> None:
    if not math.isfinite(value):
        raise NonFiniteError("map_estimate: the objective is not finite at the result")


def _check_arguments(
    space: ParameterSpace, p0: Tensor, method: str, stochastic: bool
) -> None:
    if method not in MAP_METHODS:
        raise ValueError(
            f"map_estimate: method must be 'newton', 'lbfgs' or 'adam', got {method!r}"
        )
    if not getattr(space, "is_density", False):
        raise ValueError(
            "map_estimate: needs a density space (ParameterSpace.from_log_prob(...)): the MAP of "
            "a plain loss is its minimizer, and the Riemannian volume correction needs a density."
        )
    space.check_point(p0, "map_estimate")
    if stochastic and method != "adam":
        raise ValueError(
            "map_estimate: logdet_method='slq' gives a stochastic gradient; use method='adam'"
        )


def map_estimate(
    space: ParameterSpace,
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
    −log q(ψ) = −log p_Ψ(ψ) + ½ log det G_Ψ(ψ) (:func:`map_objective`), a scalar, so its
    minimizer is the same point in every chart: ψ* = h⁻¹(θ*). With G = I in the original chart
    it is the ordinary MAP there, in every chart (docs/math.md §7).

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
        How log det G is computed (:func:`~covariant.density.logdet`): "auto", "closed",
        "dense" or "slq".
    logdet_kwargs : dict, optional
        Passed to :func:`~covariant.density.logdet` (e.g. ``num_probes``). With ``"slq"`` each
        Adam step draws fresh probes (``seed`` = 100003·seed + step), so the gradient is
        unbiased and independent per step.
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
    stochastic = logdet_method == "slq" and riemannian
    _check_arguments(space, p0, method, stochastic)
    lk = dict(logdet_kwargs or {})
    tol_ = _default_tol(p0) if tol is None else float(tol)
    f = map_objective(space, riemannian, logdet_method=logdet_method, **lk)
    n_steps = steps if steps is not None else DEFAULT_STEPS[method]
    loss_at = _stochastic_loss(space, lk) if stochastic else None
    p, converged, iters, history = _minimize(
        space, f, loss_at, p0.detach().clone(), method, n_steps, lr, tol_, progress)
    space.check_point(p, "map_estimate (result)")
    value, gn = _stochastic_result(space, p, lk) if stochastic else _exact_result(f, p)
    info = {"tol": tol_, "steps": n_steps, "logdet_method": logdet_method}
    return MAPResult(p, value, bool(converged), int(iters), gn, riemannian, method, history, info)
