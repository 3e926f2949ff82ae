r"""Curvature ("flatness") measures of a minimum, invariant and classic (docs/math.md §4).

Every measure is spectral and taken on the shape operator E = G⁻¹ Hess, i.e. on the
generalized eigenproblem Hess x = λ G x. Its eigenvalues do not depend on the chart, so
neither do trace, log-determinant, λ_max or the spectrum. With
``space.with_metric(Euclidean())`` the same code gives the classic numbers of ∇²L, which do
depend on the chart.

For a submersion chart (weight norm) the problem is solved on the horizontal space, the range
of G: that drops one zero eigenvalue per gauge direction and gives the pseudo-log-determinant
(docs/math.md §5).

Parts:

- :mod:`~covariant.flatness.report`: :class:`Measure` and :class:`FlatnessReport`, the results;
- :mod:`~covariant.flatness.dense`: the exact generalized eigenproblem (small d);
- :mod:`~covariant.flatness.stochastic`: matrix-free estimates with error bars;
- :mod:`~covariant.flatness.options`: :class:`StochasticOptions`, the stochastic settings;
- :mod:`~covariant.flatness.nulls`: numerically null eigenvalues and singular metrics, one
  definition for both methods.

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
>>> opts = StochasticOptions(num_probes=50, seed=1)
>>> est = cv.flatness(space, p, measures=("trace",), method="stochastic", options=opts)
>>> est["trace"].num_matvecs, est.info["num_probes"]
(50, 50)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_k, check_loss_value
from .._fast import is_plain
from ..space import ParameterSpace
from .dense import DENSE_MEASURES, dense_flatness, generalized_eigh
from .nulls import check_null_rtol
from .options import StochasticOptions, resolve_options
from .report import FlatnessReport, Measure, format_value
from .stochastic import STOCHASTIC_MEASURES, shape_operator_matvecs, stochastic_flatness

__all__ = [
    "DENSE_MEASURES",
    "STOCHASTIC_MEASURES",
    "FlatnessReport",
    "Measure",
    "StochasticOptions",
    "flatness",
    "format_value",
    "generalized_eigh",
    "shape_operator_matvecs",
    "stochastic_flatness",
]

# settings that method="dense" accepts and ignores, so that one call can switch methods
_IGNORED_BY_DENSE = ("num_probes", "seed", "progress")


def flatness(
    space: ParameterSpace,
    p: Tensor,
    measures: Sequence[str] = ("trace", "logdet", "max_eig", "top_eigs"),
    method: str = "dense",
    *,
    k: int = 5,
    options: StochasticOptions | None = None,
    null_rtol: float | None = None,
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
        Any of "trace" (tr E), "logdet" (log|det E| over the eigenvalues that are not
        numerically null, see ``null_rtol``; a pseudo-log-determinant on the horizontal space
        of a submersion; the sign is in ``info``), "det", "max_eig", "min_eig",
        "top_eigs" (the ``k`` largest), "spectrum", and, stochastic only, "spectral_density".
    method : {"dense", "stochastic"}
        "dense" solves the generalized eigenproblem exactly (small d); "stochastic" uses
        matrix-free estimators with error bars (Hutchinson / Hutch++, Lanczos, SLQ).
    k : int
        Number of eigenvalues for "top_eigs", at least 1 (``ValueError`` otherwise). It is
        capped at the number of eigenvalues of the problem (d, or the rank of a submersion's
        metric); the measure's ``info`` then holds ``k_requested`` and the ``k`` used.
    options : StochasticOptions, optional
        Settings of the stochastic method (default ``StochasticOptions()``).
    null_rtol : float, optional
        Both methods treat eigenvalues with ``|λ| ≤ null_rtol · max|λ|`` as numerically null
        (exact symmetries of the loss, such as the softmax's logit shift) and leave them out
        of "logdet" and "det"; ``info["num_null"]`` counts them (estimates, for SLQ) and
        ``info["pseudo"]`` says the determinant is a pseudo-determinant. Default
        ``max(1e-10, 100·eps)`` (:mod:`~covariant.flatness.nulls`). A singular metric is
        restricted to its range when Hess vanishes on its kernel; otherwise both methods raise
        ``SingularMetricError``.
    **kwargs
        Fields of :class:`StochasticOptions` as keywords, set on top of ``options``:
        ``num_probes`` (random probe vectors), ``seed``, ``progress`` (a tqdm bar),
        ``trace_method``, ``num_matvecs`` (the Hutch++ / XTrace budget), ``quadratic_forms``
        (Taylor mode for Euclidean traces), ``in_chart`` (compute a pulled-back space in its
        own chart instead of its parent's), Lanczos and SLQ settings. Any other name raises
        ``TypeError``. ``method="dense"`` accepts ``num_probes``, ``seed`` and ``progress``
        and ignores them.

    Returns
    -------
    FlatnessReport
        The measures by name; ``report.info`` holds the method, the metric, the dimension
        and, for the stochastic method, ``seed`` and ``num_probes``; on CUDA also
        ``cuda_peak_memory_bytes``, ``torch.cuda.max_memory_allocated`` over the call (the
        device's peak counter is reset when the call starts). A NaN or infinite loss at
        ``p`` raises :class:`~covariant.errors.NonFiniteError` before any curvature is
        computed.
    """
    if method not in ("dense", "stochastic"):
        raise ValueError(f"flatness: method must be 'dense' or 'stochastic', got {method!r}")
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    k = check_k(k, "flatness")
    null_rtol = check_null_rtol(null_rtol, "flatness")
    space.check_point(p, "flatness")
    if is_plain(p):  # the value itself: a NaN loss can have finite derivatives
        check_loss_value(space.loss_function, p, "flatness")
    info = {"method": method, "metric": repr(space.metric), "dim": int(p.shape[0])}
    if method == "dense":
        unexpected = [name for name in kwargs if name not in _IGNORED_BY_DENSE]
        if unexpected or options is not None:
            raise TypeError(f"flatness: unexpected arguments for method='dense': "
                            f"{unexpected or ['options']}")
        return FlatnessReport(dense_flatness(space, p, measures, k, null_rtol), info)
    opts = resolve_options(options, kwargs)
    cuda = p.device.type == "cuda"
    if cuda:  # the peak of this call alone (resets the device's peak counter)
        torch.cuda.reset_peak_memory_stats(p.device)
    result = stochastic_flatness(space, p, measures, k=k, options=opts, null_rtol=null_rtol)
    info.update(seed=opts.seed, num_probes=opts.num_probes)
    if cuda:
        info["cuda_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(p.device))
    return FlatnessReport(result, info)
