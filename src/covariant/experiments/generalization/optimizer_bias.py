r"""The optimizer-bias study (issue 14, part 5): are Adam's minima sharper than SGD's, and does
the answer survive a change of metric?

At each trained point w of the population, sharpness is measured as the spectrum of
E = G⁻¹ ∇²L (docs/math.md §4) on the float64 training subset, for three metrics G:

- ``"euclidean"``: G = I, the classic λ_max(∇²L) and tr ∇²L;
- ``"own"``: each optimizer's own metric: G = I for SGD and SGD with momentum (their update is
  lr·∇L), G = diag(√v̂ + ε) for Adam, :class:`covariant.metrics.AdamMetric` built from the
  model's final Adam state (its update is lr·G⁻¹m̂). ``lr_max_eig`` = lr·λ_max(E) is the
  stability number of each (a quadratic is stable under full-batch GD when it is < 2);
- ``"ggn"``: the metric of the function: the function-metric measures of :mod:`.measures`
  (computed once per model there): tr and λ_max of E = (GGN + λ·diag(1/w²))⁻¹∇²L with the
  metric pinned at w, and the effective dimension tr(GGN (GGN + α·diag(1/w²))⁻¹), which
  counts the directions of curvature above the scale-invariant prior rather than the rank.

:func:`compare` reduces per-model values to per-optimizer medians with percentile-bootstrap
intervals over models, and the ratio Adam / SGD of the medians with its interval; the ordering
*survives* a change of metric when the ratio's interval lies on the same side of 1 in both.

Example
-------
>>> r = compare(["sgd", "sgd", "adam", "adam"], [1.0, 2.0, 4.0, 6.0], n_boot=200)
>>> r["median"]["sgd"], r["median"]["adam"], round(r["ratio_adam_over_sgd"], 6)
(1.5, 5.0, 3.333333)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ...flatness import flatness
from ...metrics import AdamMetric, Euclidean, Metric
from ...space import ParameterSpace

__all__ = ["METRICS", "compare", "model_sharpness", "sharpness"]

#: The metrics of the study, in table order ("ggn" from :mod:`.measures`).
METRICS = ("euclidean", "own", "ggn")


def _adam_metric(adam_state: Mapping[str, Any]) -> AdamMetric:
    """AdamMetric from a saved ``state_dict()``, its moments cast to float64."""
    state = {i: {k: (v.double() if k != "step" and torch.is_tensor(v) else v)
                 for k, v in st.items()} for i, st in adam_state["state"].items()}
    return AdamMetric({"state": state, "param_groups": adam_state["param_groups"]})


def sharpness(space: ParameterSpace, theta: torch.Tensor, metric: Metric, *,
              method: str = "stochastic", num_probes: int = 40, seed: int = 0
              ) -> dict[str, float]:
    """``{"trace", "trace_stderr", "max_eig"}`` of E = G⁻¹∇²L at ``theta`` (``stderr`` is 0
    for ``method="dense"``)."""
    kw: dict[str, Any] = {"num_probes": num_probes, "seed": seed} if method != "dense" else {}
    rep = flatness(space.with_metric(metric), theta, measures=("trace", "max_eig"),
                   method=method, **kw)
    stderr = rep["trace"].stderr
    return {"trace": float(rep["trace"].value),
            "trace_stderr": 0.0 if stderr is None else float(stderr),
            "max_eig": float(rep["max_eig"].value)}


def model_sharpness(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                    optimizer: str, lr: float, adam_state: Mapping[str, Any] | None, *,
                    method: str = "stochastic", num_probes: int = 40,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Sharpness of one float64 model in the Euclidean metric and its optimizer's own metric
    (both constant metrics, so E = G⁻¹∇²L with no connection term).

    ``optimizer`` is ``"sgd"``, ``"momentum"`` or ``"adam"``; ``adam_state`` its saved state
    (required for Adam); ``lr`` its learning rate, for ``own.lr_max_eig``. The GGN column
    of the study comes from the function-metric measures of :mod:`.measures`."""
    space, theta = ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data)
    kw = {"method": method, "num_probes": num_probes, "seed": seed}
    out = {"euclidean": sharpness(space, theta, Euclidean(), **kw)}
    if optimizer == "adam":
        if adam_state is None:
            raise ValueError("an Adam model needs its saved Adam state for its own metric")
        out["own"] = sharpness(space, theta, _adam_metric(adam_state), **kw)
    else:
        out["own"] = dict(out["euclidean"])
    out["own"]["lr_max_eig"] = float(lr) * out["own"]["max_eig"]
    return out


def _percentile_ci(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def compare(optimizers: Sequence[str], values: Sequence[float], *, n_boot: int = 1000,
            level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Per-optimizer medians of ``values`` with percentile-bootstrap intervals (models
    resampled within each optimizer), and the ratio of the Adam median to the SGD median
    (``"sgd"`` and ``"momentum"`` pooled as SGD) with its interval."""
    opt = np.asarray(optimizers)
    val = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    groups = {name: val[opt == name] for name in ("sgd", "momentum", "adam")
              if (opt == name).any()}
    pooled = {"sgd_all": val[np.isin(opt, ["sgd", "momentum"])], "adam": val[opt == "adam"]}
    boot = {k: np.array([np.median(rng.choice(v, v.size)) for _ in range(n_boot)])
            for k, v in pooled.items() if v.size}
    out: dict[str, Any] = {
        "n": {k: int(v.size) for k, v in groups.items()},
        "median": {k: float(np.median(v)) for k, v in groups.items()},
        "ci": {k: _percentile_ci(np.array([np.median(rng.choice(v, v.size))
                                           for _ in range(n_boot)]), level)
               for k, v in groups.items()},
        "level": level,
    }
    if len(boot) == 2:
        ratio = float(np.median(pooled["adam"]) / np.median(pooled["sgd_all"]))
        out["ratio_adam_over_sgd"] = ratio
        out["ratio_ci"] = _percentile_ci(boot["adam"] / boot["sgd_all"], level)
        lo, hi = out["ratio_ci"]
        out["adam_sharper"] = True if lo > 1 else False if hi < 1 else None
    return out
