r"""Invariant optimization: Riemannian and natural gradient descent, geodesic updates and
gradient flow (MATH.md §6).

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
- :class:`RiemannianGD`: a drop-in ``torch.optim.Optimizer`` (the keyword arguments of
  ``torch.optim.SGD``) with a metric: any :class:`~covariant.metrics.Metric`, or the natural
  gradient of a model ("ggn", "fisher", "empirical_fisher"), solved matrix-free by conjugate
  gradients.
- :func:`riemannian_gd`, :func:`gradient_flow`: the functional updates on a
  :class:`~covariant.ParameterSpace`, returning whole trajectories.
- :func:`map_trajectory`, :func:`trajectory_discrepancy`, :func:`step_size_sweep`,
  :func:`fit_loglog_slope`: tools to compare trajectories across charts.

Example
-------
>>> import torch, covariant as cv
>>> from covariant.optim import riemannian_gd, map_trajectory
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
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from ._progress import progress_bar
from .errors import (
    CovariantError,
    NonFiniteError,
    NotConvergedError,
    ShapeMismatchError,
    SingularMetricError,
)
from .layout import ParameterLayout
from .metrics import Euclidean, Metric
from .reparam import Reparametrization
from .space import ParameterSpace

__all__ = [
    "METRIC_NAMES",
    "UPDATES",
    "RiemannianGD",
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

#: Metric names accepted by :class:`RiemannianGD`.
METRIC_NAMES = ("euclidean", "weights", "ggn", "fisher", "empirical_fisher")

_MODEL_METRICS = ("ggn", "fisher", "empirical_fisher")


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
            space.chart.check_psi(out)
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
    from scipy.integrate import solve_ivp

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
    s = space
    while s.parent is not None:
        s = s.parent
    return s


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


# ============================================================================================
# The optimizer
# ============================================================================================

_ORIGINAL = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(original\d*)$")


def _is_batch(data: Any) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    )


class _ModelView:
    """How the optimizer's flat vector p sits inside a module.

    The module's *effective* tensors w are what its forward pass computes with: the
    parametrized weight for a tensor registered with ``torch.nn.utils.parametrize`` (computed
    from its ``original*`` tensors), the parameter itself otherwise. The map E: p ↦ w is the
    chart from the optimizer's coordinates to the weights; metrics of the module live on w and
    are pulled back, G_p = J_Eᵀ G_w J_E (MATH.md §2). For a module without parametrizations E
    is the identity.
    """

    def __init__(self, model: nn.Module, params: list[Tensor]) -> None:
        self.model = model
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.names: list[str] = []
        for i, p in enumerate(params):
            name = name_of.get(id(p))
            if name is None:
                raise ValueError(
                    f"RiemannianGD: parameter {i} (shape {tuple(p.shape)}) is not a parameter "
                    "of `model`. Pass the parameters of the model the metric is built from, "
                    "e.g. RiemannianGD(model.parameters(), ..., model=model)."
                )
            if not p.requires_grad:
                raise ValueError(f"RiemannianGD: parameter {name!r} does not require grad")
            self.names.append(name)
        self.layout = ParameterLayout(
            tuple(self.names), tuple(torch.Size(p.shape) for p in params)
        )
        # parametrized tensors that contain at least one of the optimizer's parameters
        self.chart_blocks: list[tuple[str, str, list[str]]] = []  # (module, tensor, originals)
        seen: set[tuple[str, str]] = set()
        for name in self.names:
            m = _ORIGINAL.match(name)
            if m is None:
                continue
            key = (m.group(1) or "", m.group(2))
            if key in seen:
                continue
            seen.add(key)
            plist = model.get_submodule(key[0]).parametrizations[key[1]]
            originals = ["original"] if plist.is_tensor else [
                f"original{i}" for i in range(plist.ntensors)
            ]
            self.chart_blocks.append((key[0], key[1], originals))
        self.plain = [n for n in self.names if _ORIGINAL.match(n) is None]
        # names and shapes of the effective tensors, in the order of ``effective``
        named = dict(model.named_parameters())
        self.eff_names = list(self.plain) + [
            f"{mod}.{t}" if mod else t for mod, t, _ in self.chart_blocks
        ]
        self.eff_shapes = [named[n].shape for n in self.plain] + [
            getattr(model.get_submodule(mod), t).shape for mod, t, _ in self.chart_blocks
        ]
        self._forward_ad = True
        self._twin: nn.Module | None = None

    @property
    def has_chart(self) -> bool:
        return bool(self.chart_blocks)

    # ------------------------------------------------------------- the chart p ↦ w
    def effective(self, p: Tensor) -> Tensor:
        """Flat vector of the module's effective tensors w = E(p)."""
        if not self.has_chart:
            return p
        vals = self.layout.unflatten(p)
        parts = [vals[n].reshape(-1) for n in self.plain]
        for mod_name, tensor, originals in self.chart_blocks:
            plist = self.model.get_submodule(mod_name).parametrizations[tensor]
            prefix = f"{mod_name}.parametrizations.{tensor}" if mod_name else (
                f"parametrizations.{tensor}"
            )
            state = {}
            for o in originals:
                full = f"{prefix}.{o}"
                state[o] = vals[full] if full in vals else getattr(plist, o).detach()
            parts.append(functional_call(plist, state, ()).reshape(-1))
        return torch.cat(parts)

    def push(self, p: Tensor, v: Tensor) -> Tensor:
        """J_E v (a tangent vector to the weights). Forward-mode AD, or, for parametrizations
        without a forward-AD formula (``torch._weight_norm``), the transpose of a vjp."""
        if not self.has_chart:
            return v
        if self._forward_ad:
            try:
                return jvp(self.effective, (p,), (v,))[1]
            except NotImplementedError:
                self._forward_ad = False

        def transpose(u: Tensor) -> Tensor:
            return vjp(self.effective, p)[1](u)[0]

        zero = p.new_zeros(sum(math.prod(s) for s in self.eff_shapes))
        return vjp(transpose, zero)[1](v)[0]

    def pull(self, p: Tensor, w: Tensor) -> Tensor:
        """J_Eᵀ w (a covector on the weights, pulled back to p)."""
        if not self.has_chart:
            return w
        return vjp(self.effective, p)[1](w)[0]

    # ------------------------------------------------------------- a module on the weights
    def weight_module(self) -> nn.Module:
        """A module computing with w directly, for the curvature metrics.

        The model itself, unless it has ``parametrize`` charts or batch norm. Then a twin:
        without the charts (curvature products then never differentiate through a
        parametrization, some of which lack forward-mode AD), and with batch norm that does
        not update its running statistics (a ``torch.func`` transform may not mutate them; in
        training mode the curvature uses the batch statistics, as the loss does). The twin is
        synced to the model's current parameters, buffers and train/eval modes.
        """
        from torch.nn.utils import parametrize

        if not any(
            parametrize.is_parametrized(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)
            for m in self.model.modules()
        ):
            return self.model
        if self._twin is None:
            import copy

            twin = copy.deepcopy(self.model)
            # Strip the charts by hand: parametrize.remove_parametrizations would edit the
            # parametrized *class*, which the deep copy shares with the live model.
            for _, module in list(twin.named_modules()):
                if parametrize.is_parametrized(module):
                    values = {
                        t: getattr(module, t).detach().clone()
                        for t in module.parametrizations.keys()
                    }
                    del module._modules["parametrizations"]
                    module.__class__ = module.__class__.__bases__[0]
                    for t, value in values.items():
                        module.register_parameter(t, nn.Parameter(value))
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.track_running_stats = False
            self._twin = twin
        twin = self._twin
        live = dict(self.model.named_modules())
        for mod_name, module in twin.named_modules():
            if mod_name in live:
                module.training = live[mod_name].training
        with torch.no_grad():
            for name, t in twin.named_parameters():
                src = _effective_tensor(self.model, name)
                t.copy_(src)
                t.requires_grad_(_requires_grad(self.model, name))
            live_buffers = dict(self.model.named_buffers())
            for name, t in twin.named_buffers():
                if name in live_buffers:
                    t.copy_(live_buffers[name])
        return twin


def _effective_tensor(model: nn.Module, name: str) -> Tensor:
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name), attr).detach()


def _requires_grad(model: nn.Module, name: str) -> bool:
    from torch.nn.utils import parametrize

    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        return any(t.requires_grad for t in plist.parameters(recurse=False))
    return getattr(module, attr).requires_grad


class _WeightsEuclidean(Metric):
    """J_Eᵀ J_E: the Euclidean metric of the module's weights, pulled back to its parameters
    (the originals of its ``torch.nn.utils.parametrize`` charts; I without charts). Singular
    along the gauge direction of a submersion chart such as weight norm."""

    def __init__(self, view: _ModelView) -> None:
        self.view = view
        self.is_constant = not view.has_chart

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self.view.pull(p, self.view.push(p, v))

    def __repr__(self) -> str:
        return "Pullback(Euclidean(), <module parametrizations>)"


class _PulledBackModelMetric(Metric):
    """J_Eᵀ (G_w + λ I) J_E: a curvature metric G_w of the module's weights (one batch),
    restricted to the weights the optimizer moves, damped in the weights, and pulled back to
    the optimizer's parameters. With ``lam = 0`` it is the plain pullback."""

    def __init__(
        self, view: _ModelView, base: Metric, w_point: Tensor, index: Tensor, lam: float = 0.0
    ) -> None:
        self.view, self.base, self.w_point, self.index, self.lam = view, base, w_point, index, lam
        self._identity = index.numel() == w_point.numel() and bool(
            (index == torch.arange(w_point.numel(), device=index.device)).all()
        )

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        u = self.view.push(p, v)
        full = u if self._identity else torch.zeros_like(self.w_point).index_copy(
            0, self.index, u
        )
        Gu = self.base.matvec(self.w_point, full)
        Gu = Gu if self._identity else Gu[self.index]
        if self.lam:
            Gu = Gu + self.lam * u
        return self.view.pull(p, Gu)


def _curvature_metric(name: str, space: ParameterSpace, **kwargs: Any) -> Metric:
    from .metrics import metric_from_name

    return metric_from_name(name, space, **kwargs)


class RiemannianGD(torch.optim.Optimizer):
    r"""Riemannian (natural) gradient descent as a drop-in ``torch.optim.Optimizer``.

    With g the gradient of the step's loss (``loss.backward()`` before ``step()``), p the flat
    vector of all parameters in all groups, and G the metric at p:

    .. math::

        g ← g + \lambda_{wd}\, p, \qquad
        r = (G(p) + \lambda\, G_{ref}(p))^{-1} g, \qquad
        b ← \mu b + (1 - \tau) r, \qquad p ← p - \alpha\, b

    (momentum μ, dampening τ, Nesterov and ``maximize`` exactly as ``torch.optim.SGD``, which
    this is for ``metric="euclidean"``). The solve is matrix-free conjugate gradients on
    products with G, unless the metric has its own ``solve`` and no damping is asked for.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups, as for any optimizer. The metric acts on the flat
        vector of all of them, in group order.
    lr : float
        Step size α (per group, like SGD).
    metric : Metric or str
        - a :class:`~covariant.metrics.Metric` acting on that flat vector;
        - ``"euclidean"``: G = I on the parameters (plain SGD);
        - ``"weights"``: the Euclidean metric of the module's weights pulled back to its
          parameters. For a module with ``torch.nn.utils.parametrize`` charts, the parameters
          are the charts' ``original*`` tensors and this is Jᵀ J; without charts it is I.
          Needs ``model``;
        - ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``: natural gradient with the model's
          curvature metric (:mod:`covariant.metrics`) on one batch per step. Need ``model``,
          ``loss_fn`` and ``data``.
    model : nn.Module, optional
        The module the parameters belong to.
    loss_fn : callable, optional
        ``loss_fn(model(X), y)``, e.g. ``nn.CrossEntropyLoss()``.
    data : (X, y) or iterable of (X, y)
        The batch the curvature is taken on, or batches that each step draws the next one from
        (a re-iterable such as a list or ``DataLoader`` starts over when exhausted).
    damping : float
        λ >= 0. Needed when G is singular (an over-parametrized GGN, a weight-norm chart).
    damping_reference : {"weights", "identity"} or Metric
        G_ref. ``"weights"`` (default) is the ``"weights"`` metric above: since it is itself a
        pulled-back metric, G + λ G_ref transforms correctly and **damping keeps invariance
        under every ``torch.nn.utils.parametrize`` chart** (weight norm, per-layer scaling,
        NTK parametrization, ...) (MATH.md §5). It is still λI in the module's own weight
        coordinates, so it does *not* make the step invariant under a change of those (e.g.
        rewriting the model with rescaled layers without ``parametrize``). Without ``model``
        it is I. ``"identity"`` is λI on the raw parameters: not invariant.
    momentum, dampening, weight_decay, nesterov, maximize
        As ``torch.optim.SGD``. Weight decay is added to the gradient (a covector) before
        the solve; momentum accumulates the solved direction.
    cg_tol : float
        Relative residual tolerance of conjugate gradients.
    cg_maxiter : int
        CG iterations per step. If CG has not converged by then, an undamped metric raises
        :class:`~covariant.errors.SingularMetricError`; a damped one uses the truncated
        solution (still a descent direction) and warns once. ``last_solve`` reports the
        iterations and residual of the latest step.
    cg_preconditioner : {"auto", "none"}
        ``"auto"``: for a module with ``parametrize`` charts and the ``"weights"`` damping
        reference, precondition CG with the mean diagonal of J_Eᵀ J_E per parameter tensor,
        so that a chart that rescales tensors (NTK parametrization, per-layer scaling) changes
        neither the conditioning nor the CG iterates. ``"none"``: plain CG.
    metric_kwargs : dict, optional
        Options of the named curvature metric (e.g. ``{"mc_samples": 1}`` for a Monte-Carlo
        Fisher), passed to :func:`covariant.metrics.metric_from_name`.

    Raises
    ------
    ValueError
        A metric name without the ``model`` / ``loss_fn`` / ``data`` it needs.
    SingularMetricError
        In ``step``: the metric is singular (or too badly conditioned for CG) and not damped.
    NonFiniteError
        In ``step``: a gradient contains NaN or Inf.

    Notes
    -----
    *Invariance.* With the exact natural gradient (converged CG) the step transforms as a
    vector: training the same network through any ``parametrize`` chart gives, mapped to the
    weights, the same trajectory to first order in α (exactly, for a linear chart), where
    ``torch.optim.SGD`` and Adam give a different one (MATH.md §6). A parameter without
    ``.grad`` counts as gradient 0 for a non-Euclidean metric (the metric may still move it).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> opt = RiemannianGD(model.parameters(), lr=0.5, metric="ggn", model=model,
    ...                    loss_fn=loss_fn, data=(X, y), damping=1e-2)
    >>> first = loss_fn(model(X), y).item()
    >>> for _ in range(10):
    ...     opt.zero_grad()
    ...     loss_fn(model(X), y).backward()
    ...     opt.step()
    >>> loss_fn(model(X), y).item() < 0.9 * first
    True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        metric: Metric | str = "euclidean",
        *,
        model: nn.Module | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        data: Any = None,
        damping: float = 0.0,
        damping_reference: str | Metric = "weights",
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        cg_tol: float = 1e-6,
        cg_maxiter: int = 200,
        cg_preconditioner: str = "auto",
        metric_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(lr, Tensor):
            lr = float(lr)
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"RiemannianGD: damping must be a finite number >= 0, got {damping}")
        if not (cg_tol > 0):
            raise ValueError(f"RiemannianGD: cg_tol must be > 0, got {cg_tol}")
        if int(cg_maxiter) < 1:
            raise ValueError(f"RiemannianGD: cg_maxiter must be >= 1, got {cg_maxiter}")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        )
        super().__init__(params, defaults)

        self.damping = float(damping)
        self.cg_tol = float(cg_tol)
        self.cg_maxiter = int(cg_maxiter)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.metric_kwargs = dict(metric_kwargs or {})
        if cg_preconditioner not in ("auto", "none"):
            raise ValueError(
                f"RiemannianGD: cg_preconditioner must be 'auto' or 'none', got "
                f"{cg_preconditioner!r}"
            )
        self.cg_preconditioner = cg_preconditioner
        self.metric_name, self.metric = self._resolve_metric(metric)
        self._view = _ModelView(model, self._params()) if model is not None else None
        self._damping_reference = damping_reference
        self._reference = self._resolve_reference(damping_reference)
        self._batches_drawn = 0
        self._data_iter: Iterator[Any] | None = None
        self._warned_truncated = False
        self.last_solve: dict[str, Any] = {}

    # ----------------------------------------------------------------- setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the metric then covers it too."""
        super().add_param_group(param_group)
        if getattr(self, "_view", None) is not None:
            self._view = _ModelView(self.model, self._params())  # type: ignore[arg-type]
            self._reference = self._resolve_reference(self._damping_reference)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _resolve_metric(self, metric: Metric | str) -> tuple[str, Metric | None]:
        if isinstance(metric, Metric):
            return type(metric).__name__, metric
        if not isinstance(metric, str):
            raise TypeError(
                f"RiemannianGD: metric must be a covariant.metrics.Metric or one of "
                f"{METRIC_NAMES}, got {type(metric).__name__}"
            )
        name = metric.lower()
        if name not in METRIC_NAMES:
            raise ValueError(f"RiemannianGD: unknown metric {metric!r}; choose from {METRIC_NAMES}")
        need = {"weights": ("model",)}.get(name, ("model", "loss_fn", "data"))
        if name in _MODEL_METRICS or name == "weights":
            given = {"model": self.model, "loss_fn": self.loss_fn, "data": self.data}
            missing = [k for k in need if given[k] is None]
            if missing:
                raise ValueError(
                    f"RiemannianGD(metric={name!r}) needs {', '.join(need)}; missing: "
                    f"{', '.join(missing)}. Pass e.g. RiemannianGD(model.parameters(), lr, "
                    f"metric={name!r}, model=model, loss_fn=nn.CrossEntropyLoss(), "
                    "data=(X, y))."
                )
        if name in _MODEL_METRICS:
            self._check_data(self.data)
        return name, None

    @staticmethod
    def _check_data(data: Any) -> None:
        if _is_batch(data):
            return
        if isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise ValueError(
                "RiemannianGD: data must be an (X, y) pair of tensors or an iterable of such "
                f"batches, got {type(data).__name__}"
            )

    def _resolve_reference(self, ref: str | Metric) -> Metric:
        self._reference_is_weights = False
        if isinstance(ref, Metric):
            return ref
        if ref == "identity":
            return Euclidean()
        if ref == "weights":
            self._reference_is_weights = True
            if self._view is None or not self._view.has_chart:
                return Euclidean()
            return _WeightsEuclidean(self._view)
        raise ValueError(
            f"RiemannianGD: damping_reference must be 'weights', 'identity' or a Metric, "
            f"got {ref!r}"
        )

    # ----------------------------------------------------------------- data
    def _next_batch(self) -> tuple[Tensor, Tensor]:
        data = self.data
        if _is_batch(data):
            self._batches_drawn += 1
            return data[0], data[1]
        if self._data_iter is None:
            self._data_iter = iter(data)
        for attempt in range(2):
            try:
                batch = next(self._data_iter)
                break
            except StopIteration:
                fresh = iter(data)
                if attempt == 1 or fresh is data or fresh is self._data_iter:
                    raise ValueError(
                        "RiemannianGD: the data iterator is exhausted (or empty). Pass a "
                        "re-iterable (a list of batches, a DataLoader) to cycle through it."
                    ) from None
                self._data_iter = fresh
        self._batches_drawn += 1
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise ValueError("RiemannianGD: each batch in data must be an (X, y) pair")
        return batch[0], batch[1]

    def _skip_batches(self, n: int) -> None:
        """Position a fresh data iterator after ``n`` draws (used by ``load_state_dict``)."""
        self._batches_drawn = 0
        self._data_iter = None
        if _is_batch(self.data) or self.data is None:
            self._batches_drawn = n
            return
        for _ in range(n):
            self._next_batch()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["covariant"] = {"batches_drawn": self._batches_drawn, "metric": self.metric_name,
                           "damping": self.damping}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("covariant", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            if self.metric_name in _MODEL_METRICS:
                self._skip_batches(int(extra.get("batches_drawn", 0)))
            else:
                self._batches_drawn = int(extra.get("batches_drawn", 0))

    # ----------------------------------------------------------------- the metric
    def _current_metric(self) -> tuple[Metric, bool]:
        """The metric at this step, and whether the damping is already folded into it."""
        if self.metric is not None:
            return self.metric, False
        if self.metric_name == "euclidean":
            return Euclidean(), False
        view = self._view
        assert view is not None
        if self.metric_name == "weights":
            return (_WeightsEuclidean(view) if view.has_chart else Euclidean()), False
        X, y = self._next_batch()
        module = view.weight_module()
        space, w_point = ParameterSpace.from_module(module, self.loss_fn, (X, y))  # type: ignore[arg-type]
        base = _curvature_metric(self.metric_name, space, **self.metric_kwargs)
        slices = space.layout.slices  # type: ignore[union-attr]
        missing = [n for n in view.eff_names if n not in slices]
        if missing:  # pragma: no cover - defensive: the twin mirrors the model
            raise ValueError(f"RiemannianGD: weights {missing} not found in the module")
        index = torch.cat(
            [torch.arange(slices[n].start, slices[n].stop) for n in view.eff_names]
        ).to(w_point.device)
        fold = self._reference_is_weights
        metric = _PulledBackModelMetric(
            view, base, w_point, index, self.damping if fold else 0.0
        )
        return metric, fold

    def _solve(self, p: Tensor, g: Tensor) -> Tensor:
        from .linalg import cg

        G, folded = self._current_metric()
        lam = self.damping
        if lam == 0.0 and isinstance(G, Euclidean):
            self.last_solve = {"method": "identity"}
            return g
        own_solve = type(G).solve is not Metric.solve
        if lam == 0.0 and own_solve:
            try:
                r = G.solve(p, g)
            except NotConvergedError as err:
                raise SingularMetricError(
                    f"RiemannianGD: solving with the metric {self.metric_name} failed ({err}); "
                    "it is singular or badly conditioned. Pass damping=... > 0."
                ) from err
            self.last_solve = {"method": "solve"}
            return r
        ref = self._reference

        def matvec(v: Tensor) -> Tensor:
            out = G.matvec(p, v)
            return out + lam * ref.matvec(p, v) if lam > 0 and not folded else out

        precond = self._preconditioner(p) if self.cg_preconditioner == "auto" else None
        try:
            res = cg(matvec, g, rtol=self.cg_tol, maxiter=self.cg_maxiter,
                     preconditioner=precond, raise_on_failure=False)
        except (SingularMetricError, NonFiniteError) as err:
            # CG breaks down (pᵀGp <= 0, or iterates blowing up along a null direction the
            # right-hand side has a component in) exactly when the metric is singular or
            # indefinite, or not finite at this point.
            raise SingularMetricError(
                f"RiemannianGD: conjugate gradients broke down on the metric {self.metric_name}"
                f"{'' if lam == 0 else f' + {lam:g}·reference'} at the current parameters "
                f"({err}): it is singular, indefinite or not finite here. "
                + ("Pass damping=... > 0 (the default reference 'weights' keeps invariance)."
                   if lam == 0 else "Increase damping.")
            ) from err
        self.last_solve = {"method": "cg", "iterations": res.num_iters,
                           "residual": res.residual_norm, "converged": res.converged}
        if not res.converged:
            if lam == 0.0:
                raise SingularMetricError(
                    f"RiemannianGD: conjugate gradients on the metric {self.metric_name} did "
                    f"not converge in cg_maxiter={self.cg_maxiter} iterations (residual "
                    f"{res.residual_norm:.3e}): the metric is singular or badly conditioned. "
                    "Pass damping=... > 0, or raise cg_maxiter / cg_tol."
                )
            if not self._warned_truncated:
                warnings.warn(
                    f"RiemannianGD: CG stopped after cg_maxiter={self.cg_maxiter} iterations "
                    f"at residual {res.residual_norm:.3e} (rtol {self.cg_tol:g}); using the "
                    "truncated solution. Raise cg_maxiter or damping for the exact natural "
                    "gradient (reported once; see opt.last_solve).",
                    RuntimeWarning,
                    stacklevel=5,  # the caller of opt.step()
                )
                self._warned_truncated = True
        return res.x

    def _preconditioner(self, p: Tensor) -> Callable[[Tensor], Tensor] | None:
        """Block-scalar Jacobi preconditioner from the reference metric J_Eᵀ J_E.

        Per parameter tensor b, s_b = ‖J_E z_b‖² / n_b with a fixed Rademacher probe z_b on
        that block: the mean diagonal of J_Eᵀ J_E there (exact when the chart scales the block
        uniformly, e.g. NTK or per-layer rescaling). Conjugate gradients preconditioned by
        M = diag(s) then runs the same iterations in every chart that rescales tensors, so
        even a truncated solve stays invariant, and the chart does not worsen conditioning.
        None when the module has no ``parametrize`` charts (M = I).
        """
        view = self._view
        if view is None or not view.has_chart or not self._reference_is_weights:
            return None
        scales, start = [], 0
        gen = torch.Generator().manual_seed(0)
        for shape in view.layout.shapes:
            n = math.prod(shape)
            z = p.new_zeros(p.shape[0])
            probe = torch.randint(0, 2, (n,), generator=gen).to(p) * 2 - 1
            z[start : start + n] = probe
            with torch.enable_grad():
                jz = view.push(p, z).detach()
            s = float(torch.dot(jz, jz)) / n
            scales.append(p.new_full((n,), s if s > 0 and math.isfinite(s) else 1.0))
            start += n
        inv = torch.cat(scales).reciprocal()
        return lambda r: inv * r

    # ----------------------------------------------------------------- step
    def _name(self, i: int, p: Tensor) -> str:
        if self._view is not None:
            return repr(self._view.names[i])
        return f"#{i} (shape {tuple(p.shape)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; ``closure`` (optional) re-evaluates the loss and calls ``backward``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        params = self._params()
        euclid = self.metric_name == "euclidean" and self.damping == 0.0
        i = 0
        covectors: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    g = None if euclid else torch.zeros_like(p)
                else:
                    if p.grad.is_sparse:
                        raise RuntimeError("RiemannianGD does not support sparse gradients")
                    if not bool(torch.isfinite(p.grad).all()):
                        raise NonFiniteError(
                            f"RiemannianGD.step: the gradient of parameter {self._name(i, p)} "
                            "contains NaN or Inf. Check the loss (log of 0, overflow) and lower "
                            "the learning rate."
                        )
                    g = -p.grad if group["maximize"] else p.grad
                    if group["weight_decay"] != 0:
                        g = g.add(p, alpha=group["weight_decay"])
                covectors.append(g)  # type: ignore[arg-type]
                i += 1

        if euclid:
            directions = covectors
        else:
            if not params:
                return loss
            gflat = torch.cat([g.reshape(-1) for g in covectors])
            pflat = torch.cat([p.detach().reshape(-1) for p in params])
            with torch.enable_grad():
                r = self._solve(pflat, gflat).detach()
            if not bool(torch.isfinite(r).all()):
                raise NonFiniteError(
                    f"RiemannianGD.step: the metric solve ({self.metric_name}) returned NaN or "
                    "Inf; the metric is singular or not finite here. Pass damping=... > 0."
                )
            directions, start = [], 0
            for p in params:
                directions.append(r[start : start + p.numel()].view_as(p))
                start += p.numel()

        i = 0
        for group in self.param_groups:
            mu, tau = group["momentum"], group["dampening"]
            for p in group["params"]:
                d = directions[i]
                i += 1
                if d is None:
                    continue
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = torch.clone(d).detach()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(mu).add_(d, alpha=1 - tau)
                    d = d.add(buf, alpha=mu) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss
