r"""Curvature ("flatness") measures of a minimum, invariant and classic (MATH.md §4).

Every measure is spectral and taken on the shape operator E = G⁻¹ Hess, i.e. on the
generalized eigenproblem Hess x = λ G x. Its eigenvalues do not depend on the chart, so
neither do trace, log-determinant, λ_max or the spectrum. With
``space.with_metric(Euclidean())`` the same code gives the classic numbers of ∇²L, which do
depend on the chart.

For a submersion chart (weight norm) the problem is solved on the horizontal space, the range
of G: that drops one zero eigenvalue per gauge direction and gives the pseudo-log-determinant
(MATH.md §5).

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: p[0]**2 + 3 * p[1]**2)
>>> p = torch.zeros(2, dtype=torch.float64)
>>> report = cv.flatness(space, p, measures=("trace", "max_eig"))
>>> report["trace"].value, report["max_eig"].value
(8.0, 6.0)
>>> squeezed = space.reparametrize(cv.reparam.Scale(0.1))
>>> round(cv.flatness(squeezed, p, measures=("trace",))["trace"].value, 10)   # invariant
8.0
>>> naive = squeezed.with_metric(cv.metrics.Euclidean())
>>> round(cv.flatness(naive, p, measures=("trace",))["trace"].value, 10)  # not invariant
0.08
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import SingularMetricError
from .metrics.base import cholesky_or_raise
from .space import ParameterSpace

__all__ = ["DENSE_MEASURES", "FlatnessReport", "Measure", "flatness", "generalized_eigh"]

DENSE_MEASURES = ("trace", "logdet", "det", "max_eig", "min_eig", "top_eigs", "spectrum")


@dataclass
class Measure:
    """One curvature measure with its diagnostics.

    Attributes
    ----------
    name : str
    value : float or list of float
    stderr : float or None
        Standard error of a stochastic estimate (``None`` for exact values).
    num_matvecs : int or None
        Hessian-vector products used.
    converged : bool
        False if an iterative method stopped before its tolerance.
    method : str
        "dense" or "stochastic".
    extras : dict
        Method-specific diagnostics (residuals, sign of the determinant, …).
    """

    name: str
    value: float | list[float]
    stderr: float | None = None
    num_matvecs: int | None = None
    converged: bool = True
    method: str = "dense"
    extras: dict[str, Any] = field(default_factory=dict)
    vectors: Tensor | None = field(default=None, repr=False, compare=False)
    """Eigenvectors (tangent vectors, one per column) for "top_eigs"; not serialized."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("vectors")
        return _jsonable(d)

    def __float__(self) -> float:
        if isinstance(self.value, list):
            raise TypeError(f"measure {self.name!r} is a list; index it")
        return float(self.value)


class FlatnessReport(Mapping[str, Measure]):
    """Measures by name: ``report["trace"].value``, ``report.to_dict()``, ``print(report)``."""

    def __init__(self, measures: dict[str, Measure], info: dict[str, Any] | None = None) -> None:
        self._measures = measures
        self.info = info or {}

    def __getitem__(self, key: str) -> Measure:
        return self._measures[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._measures)

    def __len__(self) -> int:
        return len(self._measures)

    def to_dict(self) -> dict[str, Any]:
        return {"info": _jsonable(self.info), **{k: m.to_dict() for k, m in self.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __repr__(self) -> str:
        lines = [f"FlatnessReport({self.info.get('metric', '')})"]
        for k, m in self.items():
            lines.append(f"  {k:10s} {format_value(m.value)}"
                         + ("" if m.stderr is None else f" ± {m.stderr:.3g}"))
        return "\n".join(lines)


def format_value(value: float | list[float], digits: int = 5) -> str:
    """Short text of a value or a list of values."""
    if isinstance(value, list):
        shown = ", ".join(f"{v:.{digits}g}" for v in value[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}]"
    return f"{value:.{digits}g}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def generalized_eigh(H: Tensor, G: Tensor, basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of Hess x = λ G x (ascending), optionally restricted to span(basis).

    Solved as the symmetric problem L⁻¹ H L⁻ᵀ y = λ y with G = L Lᵀ (Cholesky), x = L⁻ᵀ y.
    With ``basis`` Q (d × r, orthonormal) it solves QᵀHQ y = λ QᵀGQ y and returns x = Q y:
    the horizontal-space problem of a submersion chart.
    """
    if basis is not None:
        H, G = basis.T @ H @ basis, basis.T @ G @ basis
    L = cholesky_or_raise(G, "flatness: metric")
    A = torch.linalg.solve_triangular(L, H, upper=False)
    A = torch.linalg.solve_triangular(L, A.T, upper=False)
    evals, Y = torch.linalg.eigh(0.5 * (A + A.T))
    X = torch.linalg.solve_triangular(L.T, Y, upper=True)
    if basis is not None:
        X = basis @ X
    return evals, X


def _dense_measures(
    space: ParameterSpace, p: Tensor, measures: Sequence[str], k: int
) -> dict[str, Measure]:
    H = space.hessian(p, riemannian=True)
    G = space.metric.dense(p, max_dim=space.max_dense_dim)
    basis = space.horizontal_basis(p) if space.metric.is_degenerate(p) else None
    try:
        evals, evecs = generalized_eigh(H, G, basis)
    except SingularMetricError as err:
        raise SingularMetricError(
            f"flatness: the metric is singular at this point. {err}"
        ) from err
    desc = torch.flip(evals, [0])
    out: dict[str, Measure] = {}
    extras_common = {"dim": p.shape[0], "rank": int(evals.shape[0])}
    for name in measures:
        if name == "trace":
            out[name] = Measure(name, float(evals.sum()), extras=extras_common)
        elif name in ("logdet", "det"):
            sign = float(torch.prod(torch.sign(evals)))
            logabs = float(evals.abs().log().sum())
            extra = {**extras_common, "sign": sign,
                     "pseudo": basis is not None, "log_abs_det": logabs}
            if name == "det":
                out[name] = Measure(name, sign * math.exp(logabs), extras=extra)
            else:
                # log det E (log|det E| with the sign in extras when E is not positive definite)
                out[name] = Measure(name, logabs, extras=extra)
        elif name == "max_eig":
            out[name] = Measure(name, float(desc[0]), extras=extras_common)
        elif name == "min_eig":
            out[name] = Measure(name, float(evals[0]), extras=extras_common)
        elif name == "top_eigs":
            kk = min(k, desc.shape[0])
            out[name] = Measure(name, desc[:kk].tolist(), extras=extras_common,
                                vectors=torch.flip(evecs, [1])[:, :kk])
        elif name == "spectrum":
            out[name] = Measure(name, desc.tolist(), extras=extras_common)
        else:
            raise ValueError(
                f"flatness: unknown measure {name!r}; dense measures are {DENSE_MEASURES}"
            )
    return out


def flatness(
    space: ParameterSpace,
    p: Tensor,
    measures: Sequence[str] = ("trace", "logdet", "max_eig", "top_eigs"),
    method: str = "dense",
    *,
    k: int = 5,
    num_probes: int = 100,
    seed: int = 0,
    progress: bool = False,
    **kwargs: Any,
) -> FlatnessReport:
    r"""Spectral curvature measures of E = G⁻¹ Hess at ``p``.

    Parameters
    ----------
    space : ParameterSpace
        The loss and its metric. ``space.with_metric(Euclidean())`` gives the classic measures.
    p : Tensor
        The point (typically a minimum).
    measures : sequence of str
        Any of "trace" (tr E), "logdet" (log|det E|, a pseudo-log-determinant on the horizontal
        space of a submersion; the sign is in ``extras``), "det", "max_eig", "min_eig",
        "top_eigs" (the ``k`` largest), "spectrum", and, stochastic only, "spectral_density".
    method : {"dense", "stochastic"}
        "dense" solves the generalized eigenproblem exactly (small d); "stochastic" uses
        matrix-free estimators with error bars (Hutchinson / Hutch++, Lanczos, SLQ).
    k : int
        Number of eigenvalues for "top_eigs".
    num_probes, seed, progress
        Stochastic settings: probe count, seed for reproducibility, a tqdm progress bar.
    **kwargs
        Further options of the stochastic method
        (:func:`covariant.estimators.stochastic_flatness`): ``trace_method``,
        ``quadratic_forms`` (Taylor mode for Euclidean traces), ``in_chart`` (compute a
        pulled-back space in its own chart instead of its parent's), Lanczos and SLQ settings.

    Returns
    -------
    FlatnessReport
    """
    if method not in ("dense", "stochastic"):
        raise ValueError(f"flatness: method must be 'dense' or 'stochastic', got {method!r}")
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    space._check(p, "flatness")
    info = {"method": method, "metric": repr(space.metric), "dim": int(p.shape[0])}
    if method == "dense":
        if kwargs:
            raise TypeError(f"flatness: unexpected arguments for method='dense': {list(kwargs)}")
        return FlatnessReport(_dense_measures(space, p, measures, k), info)
    from .estimators import stochastic_flatness

    result = stochastic_flatness(
        space, p, measures, k=k, num_probes=num_probes, seed=seed, progress=progress, **kwargs
    )
    return FlatnessReport(result, {**info, "seed": seed, "num_probes": num_probes})
