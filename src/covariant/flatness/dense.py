r"""Dense flatness measures: the generalized eigenproblem Hess x = λ G x, solved exactly.

The eigenvalues of the shape operator E = G⁻¹ Hess are those of Hess x = λ G x. With the
Cholesky factor G = L Lᵀ the problem becomes the symmetric one L⁻¹ Hess L⁻ᵀ y = λ y, x = L⁻ᵀ y.
Every measure (trace, log-determinant, extreme eigenvalues, spectrum) is read off its
eigenvalues. For small d only: it builds the d × d Hessian and metric; the dense path is the
ground truth the stochastic one is tested against.

For a submersion chart (weight norm) G is singular along the gauge directions, and the problem
is solved on the horizontal space span(Q) (Q orthonormal, ``space.horizontal_basis``):
QᵀHess Q y = λ QᵀG Q y, x = Q y. That drops one zero eigenvalue per gauge direction and gives
the pseudo-log-determinant (docs/math.md §5).

Example
-------
>>> import torch
>>> H = torch.tensor([[2.0, 1.0], [1.0, 6.0]], dtype=torch.float64)
>>> G = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
>>> evals, X = generalized_eigh(H, G)
>>> torch.allclose(evals.sum(), torch.trace(torch.linalg.solve(G, H)))   # tr G⁻¹H = 4
True
>>> torch.allclose(H @ X, G @ X * evals)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import SingularMetricError
from ..metrics.base import cholesky_or_raise
from ..space import ParameterSpace
from .nulls import kernel_is_gauge, pseudo_log_determinant, restrict_to_range
from .report import Measure

__all__ = ["DENSE_MEASURES", "dense_flatness", "generalized_eigh"]

DENSE_MEASURES = ("trace", "logdet", "det", "max_eig", "min_eig", "top_eigs", "spectrum")


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


def _determinant_measure(name: str, evals: Tensor, info: dict[str, Any],
                         num_gauge: int, null_rtol: float | None, floor: float) -> Measure:
    """"det" (sign · exp log|det E|) or "logdet" (log|det E|, the sign in ``info``), both
    over the eigenvalues that are not numerically null (:mod:`~covariant.flatness.nulls`).

    ``info`` gets ``num_null`` (null eigenvalues dropped), ``null_threshold`` and ``pseudo``
    (True when gauge directions or null eigenvalues were dropped). "det" is formed from the
    log-determinant, so it never raises: beyond the float range it is ±inf with
    ``info["overflow"]``, below it 0 with ``info["underflow"]``, and ``info["log_abs_det"]``
    keeps the exact value.
    """
    pld = pseudo_log_determinant(evals, null_rtol, floor)
    logabs = pld.log_abs
    info = {**info, "sign": pld.sign, "pseudo": num_gauge > 0 or pld.num_null > 0,
            "num_null": pld.num_null, "null_threshold": pld.threshold, "log_abs_det": logabs,
            "of": "log|pdet E|" if pld.num_null else "log|det E|"}
    if name == "det":
        try:
            det = pld.sign * math.exp(logabs)
        except OverflowError:
            det = pld.sign * math.inf
        info.update(overflow=math.isinf(det), underflow=det == 0.0 and math.isfinite(logabs))
        return Measure(name, det, info=info)
    return Measure(name, logabs, info=info)


def _spectral_measure(name: str, evals: Tensor, evecs: Tensor, k: int,
                      info: dict[str, Any]) -> Measure:
    """A measure read off the ascending eigenvalues ``evals`` (and eigenvectors ``evecs``)."""
    desc = torch.flip(evals, [0])
    if name == "trace":
        return Measure(name, float(evals.sum()), info=info)
    if name == "max_eig":
        return Measure(name, float(desc[0]), info=info)
    if name == "min_eig":
        return Measure(name, float(evals[0]), info=info)
    if name == "top_eigs":
        kk = min(k, desc.shape[0])
        if kk < k:  # capped at the number of eigenvalues of the problem
            info = {**info, "k_requested": k, "k": kk}
        return Measure(name, desc[:kk].tolist(), info=info,
                       vectors=torch.flip(evecs, [1])[:, :kk])
    if name == "spectrum":
        return Measure(name, desc.tolist(), info=info)
    raise ValueError(f"flatness: unknown measure {name!r}; dense measures are {DENSE_MEASURES}")


def _restriction_basis(space: ParameterSpace, p: Tensor, H: Tensor, G: Tensor,
                       null_rtol: float | None) -> tuple[Tensor | None, str | None, float]:
    """The basis of range(G) on which E is solved (None for a nondegenerate metric), what the
    dropped kernel is, and the round-off floor of the null threshold (0 if none).

    A submersion chart's kernel is its gauge space; any other kernel must be annihilated by
    Hess too (:func:`~covariant.flatness.nulls.check_hess_vanishes_on_kernel`).
    """
    metric = space.metric
    if not metric.is_degenerate(p):
        return None, None, 0.0
    rank = metric.rank(p)
    if kernel_is_gauge(space, p, rank):
        return torch.linalg.eigh(G)[1][:, -rank:], "gauge directions of the chart", 0.0
    rng = restrict_to_range(space, p, G, rank, lambda K: H @ K, null_rtol)
    return rng.basis, "null directions of Hess and G", rng.null_floor


def dense_flatness(
    space: ParameterSpace, p: Tensor, measures: Sequence[str], k: int,
    null_rtol: float | None = None,
) -> dict[str, Measure]:
    """The measures of E = G⁻¹ Hess at ``p`` from the dense generalized eigenproblem.

    Every measure's ``info`` holds ``dim`` (coordinates of ``p``), ``rank`` (eigenvalues of
    the problem: d, or d minus the kernel of a singular metric) and
    ``num_gauge_directions`` (that kernel's dimension). "logdet" and "det" drop numerically
    null eigenvalues (:mod:`~covariant.flatness.nulls`, threshold ``null_rtol``).
    """
    H = space.hessian(p, riemannian=True)
    G = space.metric.dense(p, max_dim=space.max_dense_dim)
    basis, kernel, floor = _restriction_basis(space, p, H, G, null_rtol)
    try:
        evals, evecs = generalized_eigh(H, G, basis)
    except SingularMetricError as err:
        raise SingularMetricError(
            f"flatness: the metric is singular at this point. {err}"
        ) from err
    rank = int(evals.shape[0])
    info: dict[str, Any] = {"dim": p.shape[0], "rank": rank,
                            "num_gauge_directions": int(p.shape[0]) - rank}
    if kernel is not None:
        info["metric_kernel"] = kernel
    out: dict[str, Measure] = {}
    for name in measures:
        if name in ("logdet", "det"):
            out[name] = _determinant_measure(name, evals, info, int(p.shape[0]) - rank,
                                             null_rtol, floor)
        else:
            out[name] = _spectral_measure(name, evals, evecs, k, info)
    return out
