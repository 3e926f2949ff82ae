r"""Rank statistics of a generalization measure against the generalization gap.

Pure functions on 1-D arrays (one entry per trained model); no torch.

- :func:`kendall_tau`: Kendall's τ-b, with ties handled as ``scipy.stats.kendalltau``.
- :func:`granulated_tau`: Jiang et al. 2020 (*Fantastic generalization measures*), eq. 4:
  ψ_i per hyperparameter axis, and their mean Ψ.
- :func:`pgdl_score`: the conditional-mutual-information criterion of the PGDL competition
  (Jiang et al. 2020, NeurIPS competition track): the minimum over pairs of hyperparameter
  axes of mean conditional MI / mean entropy of the gap sign.
- :func:`bootstrap_ci`: percentile bootstrap over models.

Example
-------
>>> kendall_tau([1, 2, 3, 4], [10, 20, 40, 30])          # 5 concordant pairs, 1 discordant
0.6666666666666666
>>> hp = [{"lr": a, "wd": b} for a in (1, 2) for b in (1, 2)]
>>> granulated_tau([1, 2, 3, 4], [1, 2, 4, 3], hp, ["lr", "wd"])
{'lr': 1.0, 'wd': 0.0, 'Psi': 0.5}
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "granulated_tau", "kendall_tau", "pgdl_score"]


def _vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    r"""Kendall's τ-b of two equally long sequences.

    τ_b = Σ_{i<j} s_ij t_ij / √(Σ_{i<j} s_ij² · Σ_{i<j} t_ij²) with s_ij = sign(x_i − x_j),
    t_ij = sign(y_i − y_j): (concordant − discordant) / √((n₀ − n₁)(n₀ − n₂)), where n₁, n₂
    count the pairs tied in x, in y. Equals ``scipy.stats.kendalltau(x, y).statistic``; NaN
    when x or y is constant (or has fewer than 2 entries), or holds a NaN.
    """
    a, b = _vector(x, "x"), _vector(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau: x and y differ in length ({a.size} vs {b.size})")
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    i, j = np.triu_indices(a.size, k=1)
    s, t = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    denom = math.sqrt(float(np.sum(s * s)) * float(np.sum(t * t)))
    if denom == 0.0:
        return math.nan
    return float(np.sum(s * t)) / denom


def _groups(hyperparams: Sequence[Mapping[str, Any]], axes: Sequence[str],
            axis: str) -> list[list[int]]:
    """Indices of models grouped by their values on every axis but ``axis``."""
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for idx, hp in enumerate(hyperparams):
        groups[tuple(repr(hp[a]) for a in axes if a != axis)].append(idx)
    return list(groups.values())


def granulated_tau(
    measure: Sequence[float],
    gap: Sequence[float],
    hyperparams: Sequence[Mapping[str, Any]],
    axes: Sequence[str],
) -> dict[str, float]:
    r"""Jiang et al.'s granulated Kendall coefficients ψ_i and their mean Ψ.

    For axis i, models are grouped by their values on all the *other* axes; within each group
    of ≥ 2 models (only axis i varies) τ_b(measure, gap) is computed, and ψ_i is the mean over
    those groups. A group whose τ_b is undefined (measure or gap constant in it) is left out
    of the mean; ψ_i is NaN when no group is left. Ψ is the mean of the finite ψ_i (NaN if
    none). Jiang et al. average over every cell of a full grid; on a full grid the two agree.

    Parameters
    ----------
    measure, gap : sequence of float
        One value per model.
    hyperparams : sequence of mapping
        One dict per model; each must hold every name in ``axes``.
    axes : sequence of str
        The hyperparameter axes.

    Returns
    -------
    dict
        ``{axis: ψ_axis for axis in axes}`` and ``"Psi"``.
    """
    m, g = _vector(measure, "measure"), _vector(gap, "gap")
    if not (m.size == g.size == len(hyperparams)):
        raise ValueError("granulated_tau: measure, gap and hyperparams differ in length")
    if not axes:
        raise ValueError("granulated_tau: axes must name at least one hyperparameter")
    out: dict[str, float] = {}
    for axis in axes:
        taus = [kendall_tau(m[grp], g[grp]) for grp in _groups(hyperparams, axes, axis)
                if len(grp) >= 2]
        finite = [t for t in taus if math.isfinite(t)]
        out[axis] = float(np.mean(finite)) if finite else math.nan
    psis = [out[a] for a in axes if math.isfinite(out[a])]
    out["Psi"] = float(np.mean(psis)) if psis else math.nan
    return out


def _plogp(p: np.ndarray) -> np.ndarray:
    """p·log2 p elementwise, with 0·log 0 = 0."""
    out = np.zeros_like(p)
    pos = p > 0
    out[pos] = p[pos] * np.log2(p[pos])
    return out


def _conditional_ratio(pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                       keys: list[tuple[Any, ...]]) -> float:
    """mean_u I(V_μ; V_g | U=u) / mean_u H(V_g | U=u) over the non-empty cells u.

    ``pairs`` = (i, j, 2·V_g + V_μ) over all ordered pairs; each pair's cell is (code of model
    i, code of model j), and one ``bincount`` fills every cell's 2 × 2 table of (V_g, V_μ)."""
    i, j, v = pairs
    codes_of: dict[tuple[Any, ...], int] = {}
    codes = np.array([codes_of.setdefault(k, len(codes_of)) for k in keys])
    k = len(codes_of)
    cell = codes[i] * k + codes[j]
    counts = np.bincount(cell * 4 + v, minlength=k * k * 4).reshape(k * k, 2, 2)
    tables = counts[counts.sum(axis=(1, 2)) > 0].astype(np.float64)
    if tables.shape[0] == 0:
        return math.nan
    joint = tables / tables.sum(axis=(1, 2), keepdims=True)
    pg, pm = joint.sum(axis=2), joint.sum(axis=1)  # marginals of V_g, V_μ per cell
    # I = H(V_g) + H(V_μ) − H(V_g, V_μ), in bits
    h_g = -_plogp(pg).sum(axis=1)
    mi = h_g - _plogp(pm).sum(axis=1) + _plogp(joint).sum(axis=(1, 2))
    mean_h = float(h_g.mean())
    if mean_h == 0.0:
        return math.nan
    return float(mi.mean()) / mean_h


def pgdl_score(
    measure: Sequence[float],
    gap: Sequence[float],
    hyperparams: Sequence[Mapping[str, Any]],
    axes: Sequence[str],
) -> dict[str, Any]:
    r"""The PGDL conditional-mutual-information score of a measure.

    Definition (Jiang et al. 2020; the PGDL competition's scoring program):

    - Every ordered pair of distinct models (i, j) is one observation, with the binary
      variables V_g = [gap_i > gap_j] and V_μ = [μ_i > μ_j] (ties count as "not greater").
    - For a set S of hyperparameter axes, U_S = (values of S for model i, for model j): each
      value of U_S is a cell, and each cell holds a 2 × 2 table of (V_g, V_μ) counts.
    - For each non-empty cell u: I_u = I(V_μ; V_g | U_S = u) and H_u = H(V_g | U_S = u) of
      that table (bits).
    - ratio(S) = mean_u I_u / mean_u H_u (unweighted means over the non-empty cells, as in
      the competition's program); NaN when every H_u is 0.
    - score = min over the unordered pairs S = {a, b} of axes of ratio(S) (over single axes
      when only one axis is given), ignoring NaN ratios.

    A measure that orders every pair like the gap scores 1; one independent of the gap scores
    near 0. The competition's program also counts each model paired with itself (always
    (0, 0)); here self-pairs are left out.

    Returns
    -------
    dict
        ``"score"`` and ``"pairs"``: ``{"a|b": ratio}`` for each pair of axes.
    """
    m, g = _vector(measure, "measure"), _vector(gap, "gap")
    if not (m.size == g.size == len(hyperparams)):
        raise ValueError("pgdl_score: measure, gap and hyperparams differ in length")
    if not axes:
        raise ValueError("pgdl_score: axes must name at least one hyperparameter")
    subsets = list(itertools.combinations(axes, 2)) if len(axes) > 1 else [(axes[0],)]
    i, j = np.nonzero(~np.eye(m.size, dtype=bool))
    ordered = (i, j, 2 * (g[i] > g[j]).astype(np.int64) + (m[i] > m[j]).astype(np.int64))
    pairs: dict[str, float] = {}
    for subset in subsets:
        keys = [tuple(repr(hp[a]) for a in subset) for hp in hyperparams]
        pairs["|".join(subset)] = _conditional_ratio(ordered, keys)
    finite = [v for v in pairs.values() if math.isfinite(v)]
    return {"score": min(finite) if finite else math.nan, "pairs": pairs}


def _take(a: Any, idx: np.ndarray) -> Any:
    if isinstance(a, np.ndarray):
        return a[idx]
    return [a[int(i)] for i in idx]


def bootstrap_ci(
    stat: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    r"""Percentile bootstrap interval of ``stat(*arrays)`` over models.

    Each replicate draws n row indices with replacement (``numpy.random.default_rng(seed)``)
    and applies the same indices to every array (rows resampled jointly: a model keeps its
    measure, gap and hyperparameters). The interval is the (1 − level)/2 and (1 + level)/2
    percentiles of the finite replicates (NaN, NaN if fewer than 2 are finite).

    Parameters
    ----------
    stat : callable
        ``stat(*resampled_arrays) -> float``, e.g. :func:`kendall_tau`.
    *arrays : array or list
        Equally long, one row per model (numpy arrays or lists, e.g. of hyperparameter dicts).
    """
    if not arrays:
        raise ValueError("bootstrap_ci: give at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: arrays differ in length")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot))
    for b in range(int(n_boot)):
        idx = rng.integers(0, n, size=n)
        reps[b] = float(stat(*(_take(a, idx) for a in arrays)))
    reps = reps[np.isfinite(reps)]
    if reps.size < 2:
        return math.nan, math.nan
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
