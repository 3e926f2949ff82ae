r"""Prior selection: the prior precision λ of a model posterior that maximizes the Laplace
evidence (type-II maximum likelihood).

The classic evidence is a different function of λ in every chart (the MAP moves and the
Hessian is not a tensor), so it can choose a different λ in a different chart; the invariant
evidence is the same function in every chart, hence the same λ.

Example
-------
>>> import json, torch
>>> from torch import nn
>>> from covariant.laplace import posterior_space
>>> g = torch.Generator().manual_seed(0)
>>> X = torch.randn(30, 1, generator=g, dtype=torch.float64)
>>> y = 2 * X + 0.3 * torch.randn(30, 1, generator=g, dtype=torch.float64)
>>> space, theta = posterior_space(nn.Linear(1, 1, bias=False).double(), (X, y),
...                                likelihood="regression", sigma_noise=0.3)
>>> res = optimize_prior_precision(space, theta, riemannian=False, method="posthoc",
...                                grid=[0.01, 0.1, 1.0], refine=False)
>>> res.prior_precision in (0.01, 0.1, 1.0)
True
>>> json.loads(json.dumps(res.to_dict()))["method"]
'posthoc'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._progress import progress_bar
from ..density import map_estimate
from ..errors import NotAModeError
from ..metrics.kronecker import KroneckerFactored
from ..space import ParameterSpace
from .evidence import laplace
from .kron import KronEvidence
from .posterior import (
    gaussian_prior_nll,
    posterior_binding,
    prior_precision_of,
    with_prior_precision,
)

__all__ = ["PriorPrecisionResult", "optimize_prior_precision"]

PRIOR_METHODS = ("refit", "posthoc")


@dataclass
class PriorPrecisionResult:
    """Result of :func:`optimize_prior_precision`.

    Attributes
    ----------
    prior_precision : float
        The λ with the largest Laplace evidence.
    log_evidence : float
        That evidence.
    grid, log_evidences : list of float
        The evidence curve over the grid.
    point : Tensor
        The mode at the chosen λ (refit) or the fixed point (posthoc).
    method : str
    riemannian : bool
    interior : bool
        Whether the best grid point has finite neighbours on both sides. False means the
        maximum sits at the end of the grid, or next to a λ where the precision is not
        positive definite (evidence −inf), where the Laplace evidence diverges as
        −½ log det → +∞: then the chosen λ is not a genuine optimum.
    info : dict
        ``num_evaluations`` (Laplace evaluations, grid and refinement) and ``refined``
        (whether the bounded search improved on the grid).
    """

    prior_precision: float
    log_evidence: float
    grid: list[float]
    log_evidences: list[float]
    point: Tensor
    method: str
    riemannian: bool
    interior: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, the point as a list. A λ where the precision is not positive
        definite keeps its evidence −inf, so that the curve stays a list of floats; the one
        JSON writer (``covariant._io.dumps_json``) stores it as ``null`` with a flag."""
        return {
            "prior_precision": self.prior_precision, "log_evidence": self.log_evidence,
            "grid": self.grid, "log_evidences": self.log_evidences,
            "method": self.method, "riemannian": self.riemannian, "interior": self.interior,
            "point": self.point.detach().cpu().tolist(), "info": dict(self.info),
        }


class _EvidenceCurve:
    """λ ↦ (Laplace evidence, expansion point), cached; refits warm-start at the nearest λ
    already done (a continuation from ``p0``, so every chart follows one branch of modes)."""

    def __init__(self, space: ParameterSpace, p0: Tensor, riemannian: bool, method: str,
                 map_method: str, map_kwargs: dict[str, Any],
                 laplace_kwargs: dict[str, Any]) -> None:
        self.space, self.p0, self.riemannian, self.method = space, p0, riemannian, method
        self.map_method, self.map_kwargs = map_method, map_kwargs
        self.laplace_kwargs = laplace_kwargs
        self.cache: dict[float, tuple[float, Tensor]] = {}

    def _start_for(self, lam: float) -> Tensor:
        if not self.cache:
            return self.p0.detach().clone()
        near = min(self.cache, key=lambda k: abs(math.log(k) - math.log(lam)))
        return self.cache[near][1]

    def __call__(self, lam: float) -> tuple[float, Tensor]:
        if lam in self.cache:
            return self.cache[lam]
        s = with_prior_precision(self.space, lam)
        if self.method == "refit":
            point = map_estimate(s, self._start_for(lam), riemannian=self.riemannian,
                                 method=self.map_method, **self.map_kwargs).point
        else:
            point = self.p0.detach()
        try:
            ev = laplace(s, point, riemannian=self.riemannian,
                         **self.laplace_kwargs).log_evidence
        except NotAModeError:
            ev = -math.inf
        self.cache[lam] = (ev, point)
        return self.cache[lam]


class _KronCurve:
    """The post hoc evidence of ``structure="kron"``: one K-FAC at ``p0``, then λ ↦ log Z in
    closed form from its eigenvalues (:class:`~covariant.laplace.kron.KronEvidence`); the same
    numbers as :func:`laplace` at each λ (up to round-off)."""

    def __init__(self, space: ParameterSpace, p0: Tensor, riemannian: bool,
                 laplace_kwargs: dict[str, Any]) -> None:
        self.p0 = p0.detach()
        res = laplace(space, self.p0, riemannian=riemannian, **laplace_kwargs)
        theta = space.to_root(self.p0).detach()
        lam0 = prior_precision_of(space)
        assert lam0 is not None
        log_lik = res.log_joint + float(gaussian_prior_nll(theta, lam0))
        self.evidence = KronEvidence(res.covariance_operator, theta, log_lik)
        self.cache: dict[float, tuple[float, Tensor]] = {}

    def __call__(self, lam: float) -> tuple[float, Tensor]:
        if lam not in self.cache:
            try:
                ev = self.evidence(lam)
            except NotAModeError:
                ev = -math.inf
            self.cache[lam] = (ev, self.p0)
        return self.cache[lam]


def _curve(space: ParameterSpace, p0: Tensor, riemannian: bool, method: str, map_method: str,
           map_kwargs: dict[str, Any] | None, laplace_kwargs: dict[str, Any]
           ) -> _EvidenceCurve | _KronCurve:
    if laplace_kwargs.get("structure") == "kron":
        if method == "posthoc":
            return _KronCurve(space, p0, riemannian, laplace_kwargs)
        if isinstance(laplace_kwargs.get("kfac"), KroneckerFactored):
            raise ValueError(
                "optimize_prior_precision: method='refit' moves the mode, so K-FAC factors "
                "computed at one point (kfac=KroneckerFactored) do not apply; pass KFAC "
                "options (a dict) or None, or use method='posthoc'")
    return _EvidenceCurve(space, p0, riemannian, method, map_method, dict(map_kwargs or {}),
                          laplace_kwargs)


def _refine(curve: _EvidenceCurve | _KronCurve, grid: list[float], i: int,
            best: tuple[float, float], xatol: float) -> tuple[float, float]:
    """A bounded scalar search in log λ over the grid cell around index i."""
    from scipy.optimize import minimize_scalar

    lo = math.log(grid[max(i - 1, 0)])
    hi = math.log(grid[min(i + 1, len(grid) - 1)])

    def obj(t: float) -> float:
        v = curve(float(math.exp(t)))[0]
        return -v if math.isfinite(v) else 1e300

    r = minimize_scalar(obj, bounds=(lo, hi), method="bounded", options={"xatol": xatol})
    if -float(r.fun) > best[1]:
        return float(math.exp(r.x)), -float(r.fun)
    return best


def _grid(grid: Sequence[float] | None) -> list[float]:
    grid_ = sorted(float(x) for x in (np.logspace(-3, 3, 25) if grid is None else grid))
    if not grid_ or min(grid_) <= 0:
        raise ValueError("optimize_prior_precision: the grid must hold positive precisions")
    return grid_


def optimize_prior_precision(
    space: ParameterSpace,
    p0: Tensor,
    *,
    riemannian: bool = True,
    method: str = "refit",
    grid: Sequence[float] | None = None,
    refine: bool = True,
    map_method: str = "newton",
    map_kwargs: dict[str, Any] | None = None,
    xatol: float = 1e-3,
    progress: bool = False,
    **laplace_kwargs: Any,
) -> PriorPrecisionResult:
    r"""Choose the prior precision λ of a model posterior by maximizing the Laplace evidence.

    ``method="refit"`` (type-II maximum likelihood): for every λ the mode is recomputed
    (:func:`covariant.density.map_estimate`) and the evidence evaluated there. The grid is
    walked outwards from the space's current λ, each refit warm-started at the mode of the
    nearest λ already done, starting from ``p0`` (a mode at the current λ): a continuation,
    so that every chart follows the same branch of modes of a multimodal posterior.
    ``method="posthoc"`` keeps ``p0`` fixed and varies only λ, as laplace-torch does after
    training. ``laplace_kwargs`` go to :func:`~covariant.laplace.laplace`. With
    ``structure="kron"`` and ``"posthoc"`` the K-FAC is computed once and the evidence is a
    closed-form function of λ (:class:`~covariant.laplace.kron.KronEvidence`).

    The evidence curve is evaluated on ``grid`` (default 10^-3 … 10^3, 25 points); with
    ``refine`` the best grid cell is refined by a bounded scalar search in log λ (to
    ``xatol``).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from covariant.laplace import posterior_space
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(30, 1, generator=g, dtype=torch.float64)
    >>> y = 2 * X + 0.3 * torch.randn(30, 1, generator=g, dtype=torch.float64)
    >>> model = nn.Linear(1, 1, bias=False).double()
    >>> space, theta = posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.3)
    >>> res = optimize_prior_precision(space, theta, riemannian=False, grid=[0.01, 0.1, 1.0])
    >>> 0.01 <= res.prior_precision <= 1.0
    True
    """
    if method not in PRIOR_METHODS:
        raise ValueError(f"optimize_prior_precision: method must be 'refit' or 'posthoc', got "
                         f"{method!r}")
    lam_now = posterior_binding(space, "optimize_prior_precision").prior_precision
    grid_ = _grid(grid)
    curve = _curve(space, p0, riemannian, method, map_method, map_kwargs, laplace_kwargs)
    log0 = math.log(float(lam_now)) if torch.as_tensor(lam_now).ndim == 0 else 0.0  # type: ignore[arg-type]
    # walk the grid outwards from the space's own λ, so that every refit starts at a neighbour
    order = sorted(grid_, key=lambda lam: abs(math.log(lam) - log0))
    for lam in progress_bar(order, enabled=progress, desc="prior grid"):
        curve(lam)
    evs = [curve.cache[lam][0] for lam in grid_]
    i = int(np.argmax(evs))
    best = (grid_[i], evs[i])
    interior = 0 < i < len(grid_) - 1 and all(math.isfinite(evs[j]) for j in (i - 1, i + 1))
    if refine and len(grid_) >= 3:
        best = _refine(curve, grid_, i, best, xatol)
    point = curve(best[0])[1]
    info = {"num_evaluations": len(curve.cache), "refined": best[0] not in grid_}
    return PriorPrecisionResult(
        float(best[0]), float(best[1]), grid_, [float(e) for e in evs], point, method,
        riemannian, interior, info,
    )
