r"""Riemannian gradient descent and gradient flow on a :class:`~covariant.ParameterSpace`, and
tools to compare trajectories across charts (docs/math.md §6).

Preconditioned gradient descent θ ← θ − α G(θ)⁻¹ ∇L(θ) is Riemannian gradient descent with
metric G. How invariant it is depends on how it moves:

=====================  ===============================================  ======================
update                 step, with r = G⁻¹∇L                             chart dependence
=====================  ===============================================  ======================
gradient flow          dθ/dt = −r (an ODE)                              none (exact)
``"geodesic"``         θ⁺ = exp_θ(−α r)                                 none (exact)
``"second_order"``     θ⁺ = θ − α r − (α²/2) Γ(r, r)                    O(α²) at a fixed time
``"linear"``           θ⁺ = θ − α r                                     O(α) at a fixed time
plain GD in ψ          ψ⁺ = ψ − α ∇_ψ L  (G = I in *every* chart)       O(1): never vanishes
=====================  ===============================================  ======================

"At a fixed time" means: run to the horizon T = α·steps in two charts, map both end points to a
common chart and compare. :func:`step_size_sweep` measures this discrepancy over step sizes and
fits its log-log slope (about 0, 1 and 2 for the last three rows).

Contents
--------
- :func:`riemannian_step`, :func:`riemannian_gd`, :func:`gradient_flow`: the updates, as pure
  functions of a space and a point, returning whole trajectories.
- :func:`map_trajectory`, :func:`trajectory_discrepancy`, :func:`step_size_sweep`,
  :func:`fit_loglog_slope`, :class:`SweepResult`: compare trajectories across charts.

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: ((p - 2.0) ** 2).sum())      # minimum at θ = (2, 2)
>>> log_space = space.reparametrize(cv.reparam.Exp())                # θ = exp(ψ)
>>> psi0 = log_space.chart.inverse(torch.ones(2, dtype=torch.float64))
>>> traj = riemannian_gd(log_space, psi0, lr=0.1, steps=50)          # pulled-back metric
>>> theta = map_trajectory(traj, log_space)                          # back to θ
>>> torch.allclose(theta[-1], torch.full((2,), 2.0, dtype=torch.float64))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .._progress import progress_bar
from ..errors import CovariantError, NonFiniteError, NotConvergedError, ShapeMismatchError
from ..reparam import Reparametrization
from ..space import ParameterSpace

__all__ = [
    "UPDATES",
    "SweepResult",
    "fit_loglog_slope",
    "gradient_flow",
    "map_trajectory",
    "riemannian_gd",
    "riemannian_step",
    "step_size_sweep",
    "trajectory_discrepancy",
]

#: The update rules of :func:`riemannian_gd`.
UPDATES = ("linear", "second_order", "geodesic")


# ============================================================================================
# Functional updates on a ParameterSpace
# ============================================================================================


def _check_lr(lr: float, owner: str) -> float:
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{owner}: the step size lr must be a finite number > 0, got {lr}")
    return lr


def _check_update(update: str, owner: str) -> str:
    if update not in UPDATES:
        raise ValueError(f"{owner}: update must be one of {UPDATES}, got {update!r}")
    return update


def riemannian_step(
    space: ParameterSpace,
    p: Tensor,
    lr: float,
    update: str = "linear",
    **exp_kwargs: Any,
) -> Tensor:
    r"""One Riemannian gradient step from ``p``.

    With r = G(p)⁻¹ ∇L(p) (``space.riemannian_grad``):

    - ``"linear"``: p − α r, a straight step in the chart (the Euclidean retraction);
    - ``"second_order"``: p − α r − (α²/2) Γ(r, r), the second-order Taylor expansion of the
      geodesic (Song, Song & Ermon 2018);
    - ``"geodesic"``: exp_p(−α r), by ``space.exp`` (``exp_kwargs`` go to the ODE solver).

    Example
    -------
    >>> import torch, covariant as cv
    >>> space = cv.ParameterSpace(lambda p: (p ** 2).sum())
    >>> riemannian_step(space, torch.tensor([1.0, -2.0], dtype=torch.float64), 0.25)
    tensor([ 0.5000, -1.0000], dtype=torch.float64)
    """
    lr = _check_lr(lr, "riemannian_step")
    _check_update(update, "riemannian_step")
    r = space.riemannian_grad(p)
    if update == "linear" or space.metric.is_constant:  # constant G: geodesics are lines
        out = p - lr * r
    elif update == "second_order":
        out = p - lr * r - 0.5 * lr**2 * space.christoffel(p, r, r)
    else:
        out = space.exp(p, -r, t=lr, **exp_kwargs)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            f"riemannian_step: the {update} update produced NaN or Inf; lower the step size lr "
            f"(now {lr:g}) or check the chart's domain"
        )
    if space.chart is not None:
        try:
            space.check_point(out, "riemannian_step")
        except CovariantError as err:
            raise type(err)(
                f"the {update} step of size {lr:g} left the chart's domain ({err}); lower lr"
            ) from err
    return out.detach()


def riemannian_gd(
    space: ParameterSpace,
    p0: Tensor,
    lr: float,
    steps: int,
    update: str = "linear",
    *,
    progress: bool = False,
    **exp_kwargs: Any,
) -> Tensor:
    r"""Riemannian gradient descent in the chart of ``space``; returns the whole trajectory.

    p_{k+1} = step(p_k) with r_k = G(p_k)⁻¹ ∇L(p_k) and one of (see :func:`riemannian_step`)

    - ``"linear"``:        p − α r                            (first-order invariant)
    - ``"second_order"``:  p − α r − (α²/2) Γ(r, r)           (second-order invariant)
    - ``"geodesic"``:      exp_p(−α r)                        (exactly invariant)

    Run in a reparametrized space (``space.reparametrize(h)``, metric Jᵀ G J) and mapped back
    with :func:`map_trajectory`, the trajectory matches the one in the original chart to the
    stated order in α. With ``space.with_metric(Euclidean())`` this is plain gradient descent
    in the new chart, which does not.

    Parameters
    ----------
    space : ParameterSpace
    p0 : Tensor, shape (d,)
        Starting point, in the coordinates of ``space``.
    lr : float
        Step size α > 0.
    steps : int
        Number of steps, >= 0.
    update : {"linear", "second_order", "geodesic"}
    progress : bool
        Show a progress bar (needs tqdm).
    **exp_kwargs
        Passed to ``space.exp`` for ``update="geodesic"`` (``rtol``, ``atol``, ``method``).

    Returns
    -------
    Tensor, shape (steps + 1, d)
        Row k is p_k; row 0 is ``p0``.

    Raises
    ------
    NonFiniteError, DomainError, SingularMetricError
        With the step at which it happened.

    Example
    -------
    >>> import torch, covariant as cv
    >>> space = cv.ParameterSpace(lambda p: 0.5 * (p ** 2).sum())
    >>> riemannian_gd(space, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.5, 2)
    tensor([[1.0000, 2.0000],
            [0.5000, 1.0000],
            [0.2500, 0.5000]], dtype=torch.float64)
    """
    lr = _check_lr(lr, "riemannian_gd")
    _check_update(update, "riemannian_gd")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"riemannian_gd: steps must be an integer >= 0, got {steps}")
    p = p0.detach()
    traj = [p]
    bar = progress_bar(range(int(steps)), enabled=progress, desc=f"riemannian_gd[{update}]")
    for k in bar:
        try:
            p = riemannian_step(space, p, lr, update, **exp_kwargs)
        except CovariantError as err:
            raise type(err)(f"riemannian_gd, step {k + 1} of {steps}: {err}") from err
        traj.append(p)
    return torch.stack(traj)


def gradient_flow(
    space: ParameterSpace,
    p0: Tensor,
    t: float | Sequence[float] | Tensor | np.ndarray,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
) -> Tensor:
    r"""The Riemannian gradient flow dp/dt = −G(p)⁻¹ ∇L(p), p(0) = p0, at the times ``t``.

    The flow is exactly invariant: solved in a chart ψ and mapped back, it is the flow in θ,
    ψ(t) = h⁻¹(θ(t)) (up to the solver tolerance). It is integrated with
    ``scipy.integrate.solve_ivp`` (an adaptive Runge–Kutta method, DOP853 by default) in
    float64; every right-hand side is one ``space.riemannian_grad``.

    Parameters
    ----------
    space : ParameterSpace
    p0 : Tensor, shape (d,)
    t : float or 1-D array
        Times >= 0 in nondecreasing order; the solution starts at time 0.
    rtol, atol : float
        Solver tolerances.
    method : str
        Any ``solve_ivp`` method; use an implicit one ("Radau", "BDF") for stiff losses.

    Returns
    -------
    Tensor, shape (len(t), d)

    Raises
    ------
    NotConvergedError
        If the solver fails.

    Example
    -------
    >>> import math, torch, covariant as cv
    >>> space = cv.ParameterSpace(lambda p: 0.5 * (p ** 2).sum())    # flow: p(t) = p0 e^{-t}
    >>> out = gradient_flow(space, torch.ones(2, dtype=torch.float64), [0.0, 1.0])
    >>> abs(float(out[1, 0]) - math.exp(-1.0)) < 1e-9
    True
    """
    times = np.asarray(torch.as_tensor(t, dtype=torch.float64).reshape(-1).numpy())
    if times.size == 0:
        raise ValueError("gradient_flow: t is empty")
    if not np.all(np.isfinite(times)) or times.min() < 0 or np.any(np.diff(times) < 0):
        raise ValueError("gradient_flow: t must be finite, >= 0 and nondecreasing")
    if p0.ndim != 1:
        raise ShapeMismatchError(
            f"gradient_flow: p0 must be a flat 1-D tensor, got shape {tuple(p0.shape)}"
        )
    dtype, device = p0.dtype, p0.device
    y0 = p0.detach().to("cpu", torch.float64).numpy()

    def rhs(_: float, y: np.ndarray) -> np.ndarray:
        p = torch.as_tensor(y).to(device=device, dtype=dtype)
        out = -space.riemannian_grad(p).detach().to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(out)):  # pragma: no cover - riemannian_grad checks already
            raise NonFiniteError("gradient_flow: the vector field is NaN or Inf")
        return out

    t_end = float(times[-1])
    if t_end == 0.0:
        return p0.detach()[None, :].expand(times.size, -1).clone()
    sol = solve_ivp(rhs, (0.0, t_end), y0, method=method, t_eval=times, rtol=rtol, atol=atol)
    if not sol.success:
        raise NotConvergedError(
            f"gradient_flow: the ODE solver failed ({sol.message}). Try method='Radau' for a "
            "stiff loss, or looser rtol/atol."
        )
    return torch.as_tensor(sol.y.T).to(device=device, dtype=dtype)


# ============================================================================================
# Comparing trajectories across charts
# ============================================================================================


def map_trajectory(
    traj: Tensor, chart: Reparametrization | ParameterSpace | Callable[[Tensor], Tensor]
) -> Tensor:
    """Apply a chart row by row: each ψ_k of ``traj`` becomes θ_k = h(ψ_k).

    ``chart`` is a :class:`~covariant.reparam.Reparametrization` (θ = h(ψ)), a callable, or a
    :class:`ParameterSpace`, which maps to the coordinates of its original (root) space.
    Use ``chart.inverse`` to go the other way.

    Example
    -------
    >>> import torch, covariant as cv
    >>> traj = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    >>> map_trajectory(traj, cv.reparam.Exp())
    tensor([[1.0000, 1.0000],
            [2.7183, 1.0000]], dtype=torch.float64)
    """
    if traj.ndim != 2:
        raise ShapeMismatchError(
            f"map_trajectory: expected a trajectory of shape (steps, d), got {tuple(traj.shape)}"
        )
    fn = chart.to_root if isinstance(chart, ParameterSpace) else chart
    if not callable(fn):
        raise TypeError(f"map_trajectory: chart must be callable, got {type(chart).__name__}")
    return torch.stack([fn(row) for row in traj])


def trajectory_discrepancy(a: Tensor, b: Tensor, *, at: str = "final") -> float:
    """Euclidean distance between two trajectories given in the same chart.

    ``at="final"`` compares the last rows (the discrepancy at the horizon); ``at="max"`` the
    largest distance over all rows. Map both to one chart first (:func:`map_trajectory`).

    Example
    -------
    >>> import torch
    >>> a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    >>> trajectory_discrepancy(a, torch.zeros(2, 2))
    5.0
    """
    if a.shape != b.shape:
        raise ShapeMismatchError(
            f"trajectory_discrepancy: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; "
            "map both trajectories to the same chart first"
        )
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    dist = torch.linalg.vector_norm(a2 - b2, dim=-1)
    if at == "final":
        return float(dist[-1])
    if at == "max":
        return float(dist.max())
    raise ValueError(f"trajectory_discrepancy: at must be 'final' or 'max', got {at!r}")


def fit_loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit log y = slope · log x + intercept; returns ``(slope, intercept)``.

    Pairs with y <= 0 (an exact match) are left out; fewer than two points left give NaN.

    Example
    -------
    >>> fit_loglog_slope([1.0, 2.0, 4.0], [3.0, 12.0, 48.0])[0]   # y = 3 x²
    2.0
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (xs > 0) & (ys > 0) & np.isfinite(ys)
    if keep.sum() < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(xs[keep]), np.log(ys[keep]), 1)
    return round(float(slope), 12), float(intercept)


@dataclass
class SweepResult:
    """Discrepancy between two charts' trajectories at a fixed horizon, over step sizes.

    Attributes
    ----------
    update : str
        The update rule swept.
    horizon : float
        The time T = lr · steps at which the trajectories are compared.
    lrs, discrepancies : list of float
        Step sizes and the distance of the end points, in the common (root) chart.
    slope, intercept : float
        Fit of log discrepancy = slope · log lr + intercept.
    """

    update: str
    horizon: float
    lrs: list[float]
    discrepancies: list[float]
    slope: float
    intercept: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _root_space(space: ParameterSpace) -> ParameterSpace:
    """The space that ``space`` was (repeatedly) reparametrized from."""
    return space.lineage()[-1]


def step_size_sweep(
    space: ParameterSpace,
    p0: Tensor,
    lrs: Sequence[float],
    horizon: float,
    *,
    update: str = "linear",
    reference_space: ParameterSpace | None = None,
    reference_p0: Tensor | None = None,
    reference_update: str | None = None,
    progress: bool = False,
    **exp_kwargs: Any,
) -> SweepResult:
    r"""How far a chart's trajectory lands from the reference chart's, as the step shrinks.

    For each α in ``lrs``, run ``steps = T/α`` steps of :func:`riemannian_gd` in ``space`` and
    in ``reference_space`` (by default the original space ``space`` was reparametrized from,
    started at the image of ``p0``), map both end points to the root chart and record their
    distance. A fitted log-log slope s means discrepancy ∝ α^s: about 0 for plain GD in a new
    chart, 1 for ``"linear"``, 2 for ``"second_order"``; ``"geodesic"`` is exact up to the
    ODE tolerance.

    Parameters
    ----------
    space : ParameterSpace
        The chart under test (e.g. ``theta_space.reparametrize(h)``).
    p0 : Tensor
        Start, in the coordinates of ``space``.
    lrs : sequence of float
        Step sizes; ``horizon / lr`` must be an integer.
    horizon : float
        The time T at which end points are compared.
    update : str
        Update rule in ``space``; ``reference_update`` (default: the same) in the reference.
    reference_space, reference_p0 : optional
        The chart to compare against and its start; default the root space and
        ``space.to_root(p0)``.

    Returns
    -------
    SweepResult

    Example
    -------
    >>> import torch, covariant as cv
    >>> theta = cv.ParameterSpace(lambda p: ((p - 2.0) ** 2).sum())
    >>> psi = theta.reparametrize(cv.reparam.Exp())
    >>> p0 = psi.chart.inverse(torch.tensor([1.0, 3.0], dtype=torch.float64))
    >>> res = step_size_sweep(psi, p0, [0.02, 0.01, 0.005], horizon=0.2)
    >>> 0.8 < res.slope < 1.2                                    # linear: first order
    True
    """
    _check_update(update, "step_size_sweep")
    ref_update = update if reference_update is None else _check_update(
        reference_update, "step_size_sweep"
    )
    ref_space = _root_space(space) if reference_space is None else reference_space
    ref_p0 = space.to_root(p0) if reference_p0 is None else reference_p0
    horizon = float(horizon)
    if not (math.isfinite(horizon) and horizon > 0):
        raise ValueError(f"step_size_sweep: horizon must be > 0, got {horizon}")
    lrs_out, disc = [], []
    for lr in lrs:
        lr = _check_lr(lr, "step_size_sweep")
        n = horizon / lr
        steps = round(n)
        if steps < 1 or abs(n - steps) > 1e-6 * max(1.0, n):
            raise ValueError(
                f"step_size_sweep: horizon / lr must be a positive integer, got "
                f"{horizon:g} / {lr:g} = {n:g}"
            )
        end = riemannian_gd(space, p0, lr, steps, update, progress=progress, **exp_kwargs)[-1]
        ref = riemannian_gd(
            ref_space, ref_p0, lr, steps, ref_update, progress=progress, **exp_kwargs
        )[-1]
        d = float(torch.linalg.vector_norm(space.to_root(end) - ref_space.to_root(ref)))
        lrs_out.append(lr)
        disc.append(d)
    slope, intercept = fit_loglog_slope(lrs_out, disc)
    return SweepResult(update, horizon, lrs_out, disc, slope, intercept)
