r"""What every generalization measure shares: its settings (:class:`MeasureContext`), its result
(:class:`MeasureValue`), the model's space in float64, a chart to evaluate in, and the
function metric pinned at the trained point.

Example
-------
>>> v = MeasureValue(2.5, 0.1, 0.02, {"method": "dense"})
>>> v.to_dict()["value"], MeasureContext().method
(2.5, 'auto')
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from ...errors import DomainError
from ...linalg import cg
from ...metrics import GGN, Fisher, OperatorMetric
from ...metrics.base import DENSE_SOLVE_DIM
from ...space import ParameterSpace
from .attacks import ModelChart

__all__ = [
    "MeasureContext",
    "MeasureValue",
    "cached",
    "chart_point",
    "digest",
    "model_space",
    "pinned_function_metric",
    "scale_reference",
    "use_dense",
]

Data = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class MeasureValue:
    """One measure at one model: ``value``, ``stderr`` (0.0 when exact), ``seconds`` (wall
    time; measures that share one computation, e.g. a spectrum, each report the shared
    time, and ``info["shared"]`` names it), ``info`` (method, dimension, settings)."""

    value: float
    stderr: float = 0.0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "seconds": self.seconds,
                "info": dict(self.info)}


@dataclass(frozen=True)
class MeasureContext:
    r"""Settings of the measures (one value for a whole population).

    Attributes
    ----------
    init : mapping of str to Tensor, optional
        The model's initial parameters (``state_dict`` names), for "distance_to_init".
    seed : int
        Seed of every random draw (probes, perturbations).
    chart : ModelChart, optional
        Evaluate in this chart (None: the plain weights w).
    eps : float
        ε of the log-determinants log det(E + εI).
    damping : float
        λ of the function metrics G = F + λ·diag(1/w²) (F = GGN or Fisher).
    prior_precision : float
        α of the effective dimension tr(GGN (GGN + α·diag(1/w²))⁻¹).
    method : {"auto", "dense", "stochastic"}
        Spectral measures: dense float64 eigenproblems, or ``cv.flatness(method=
        "stochastic")``; "auto" is dense up to ``dense_max_dim`` coordinates.
    dense_max_dim : int
    num_probes : int
        Probes of the stochastic traces (and perturbation draws of the sharpness measures).
    rho_avg, rho_worst : float
        Radii of adaptive sharpness (Gaussian σ = ρ|w|; ℓ∞ box |δ| ≤ ρ|w|).
    worst_steps : int
        Projected sign-gradient ascent steps of the worst-case sharpness.
    sigma_target, sigma_eps : float
        σ′_mag: the largest σ with E[train error(w + u)] − train error(w) ≤ target, where
        u_i ~ N(0, σ² w_i² + eps²).
    loss_fn : nn.Module
        The training loss (default ``nn.CrossEntropyLoss()``).
    cache : dict
        Shared work between the measures of one model (spectra), filled as they run.
    """

    init: Mapping[str, Tensor] | None = None
    seed: int = 0
    chart: ModelChart | None = None
    eps: float = 1e-3
    damping: float = 1e-3
    prior_precision: float = 1e-2
    method: str = "auto"
    dense_max_dim: int = 1500
    num_probes: int = 20
    rho_avg: float = 0.05
    rho_worst: float = 0.01
    worst_steps: int = 10
    sigma_target: float = 0.1
    sigma_eps: float = 1e-3
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


def model_space(model: nn.Module, data: Data, ctx: MeasureContext) -> tuple[ParameterSpace, Tensor]:
    """The float64 space of a copy of ``model`` (Euclidean metric in w) and its point w."""
    net = copy.deepcopy(model).double()
    X, y = data
    X = X.to(torch.float64)
    if y.is_floating_point():
        y = y.to(torch.float64)
    return ParameterSpace.from_module(net, ctx.loss_fn, (X, y))


def chart_point(space: ParameterSpace, theta: Tensor,
                ctx: MeasureContext) -> tuple[ParameterSpace, Tensor]:
    """``space`` in ``ctx.chart`` and the point representing ``theta`` (unchanged without)."""
    if ctx.chart is None:
        return space, theta
    return ctx.chart.apply(space, theta)


def use_dense(dim: int, ctx: MeasureContext) -> bool:
    """Whether the spectral measures run dense (``ctx.method``, ``ctx.dense_max_dim``)."""
    if ctx.method not in ("auto", "dense", "stochastic"):
        raise ValueError(f"MeasureContext.method must be 'auto', 'dense' or 'stochastic', "
                         f"got {ctx.method!r}")
    return ctx.method == "dense" or (ctx.method == "auto" and dim <= ctx.dense_max_dim)


def scale_reference(theta: Tensor) -> Tensor:
    """diag(1/w²): the metric of log|w| (invariant under every positive diagonal rescaling)."""
    if bool((theta == 0).any()):
        raise DomainError("the scale-invariant reference diag(1/w²) needs every weight "
                          f"nonzero; {int((theta == 0).sum())} are exactly 0")
    return theta.pow(-2)


def _jacobi_solve(matmat: Callable[[Tensor], Tensor], matvec: Callable[[Tensor], Tensor],
                  theta: Tensor, floor: Tensor, probes: int = 10) -> Callable[[Tensor], Tensor]:
    """W ↦ G⁻¹ W by conjugate gradients with a Jacobi preconditioner: diag(G) estimated from
    ``probes`` Rademacher products (E[z ⊙ G z] = diag G), never below ``floor`` = λ/w² (the
    damping's exact diagonal, a lower bound of diag G)."""
    gen = torch.Generator().manual_seed(0)
    Z = (torch.randint(0, 2, (theta.numel(), probes), generator=gen) * 2 - 1).to(theta)
    inv = 1.0 / torch.maximum((Z * matmat(Z)).mean(dim=1), floor)

    def solve(W: Tensor) -> Tensor:
        cols = [cg(matvec, w, preconditioner=lambda r: inv * r, maxiter=10 * w.numel()).x
                for w in W.T]
        return torch.stack(cols, dim=1)

    return solve


def pinned_function_metric(space: ParameterSpace, theta: Tensor, which: str,
                           damping: float, *, cg_above: int = DENSE_SOLVE_DIM) -> OperatorMetric:
    r"""G = F(w) + λ·diag(1/w²) at the point w, as a constant metric of the weights' chart.

    ``which`` is "ggn", "fisher" (:class:`~covariant.metrics.GGN`, exact
    :class:`~covariant.metrics.Fisher`) or "none" (only the reference: G = diag(1/w²)).
    Pinned (``OperatorMetric``): pulled back through a chart it is JᵀG(w)J at the point, and
    the Hessian it is paired with is the one carried along from w (no connection term).
    Solves: dense Cholesky up to ``cg_above`` coordinates (default ``DENSE_SOLVE_DIM``),
    Jacobi-preconditioned conjugate gradients above (diag(1/w²) makes G badly scaled).
    """
    d = scale_reference(theta)
    if which == "none":
        def matmat(X: Tensor) -> Tensor:
            return d[:, None] * X
        return OperatorMetric(matmat, theta, name="diag(1/w²) at w")
    base = {"ggn": GGN, "fisher": Fisher}[which].from_space(space)

    def product(v: Tensor) -> Tensor:
        return base.matvec(theta, v)

    def matmat(X: Tensor) -> Tensor:
        cols = vmap(product, in_dims=1, out_dims=1, chunk_size=64)(X)
        return cols + damping * d[:, None] * X

    def matvec(v: Tensor) -> Tensor:
        return product(v) + damping * d * v

    big = theta.numel() > cg_above and damping > 0
    solve = _jacobi_solve(matmat, matvec, theta, damping * d) if big else None
    return OperatorMetric(matmat, theta, solve_matmat=solve,
                          name=f"{which}+{damping:g}·diag(1/w²) at w")


def digest(theta: Tensor, data: Data) -> str:
    """A key of the point and the data (for caches)."""
    h = hashlib.sha1(theta.detach().cpu().numpy().tobytes())
    h.update(str((id(data[0]), id(data[1]), tuple(data[0].shape))).encode())
    return h.hexdigest()


def cached(ctx: MeasureContext, key: tuple[Any, ...], theta: Tensor, data: Data,
           compute: Callable[[], Any]) -> Any:
    """``compute()`` once per (key, point, data, chart) in ``ctx.cache``.

    The chart is matched by identity: the entry keeps the chart object, so a chart that was
    freed and whose ``id`` was reused by another never hits a stale entry."""
    full = (*key, None if ctx.chart is None else id(ctx.chart), digest(theta, data))
    hit = ctx.cache.get(full)
    if hit is None or hit[0] is not ctx.chart:
        hit = (ctx.chart, compute())
        ctx.cache[full] = hit
    return hit[1]
