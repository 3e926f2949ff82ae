r"""Invariant optimization: Riemannian and natural gradient descent, geodesic updates and
gradient flow (docs/math.md §6).

Preconditioned gradient descent θ ← θ − α G(θ)⁻¹ ∇L(θ) is Riemannian gradient descent with
metric G. Run in a new chart with the pulled-back metric, it moves the same way to first order
in α ("linear"), second order ("second_order") or exactly ("geodesic", gradient flow); plain
gradient descent in the new chart does not (the table in :mod:`covariant.optim.functional`).

Modules
-------
- :mod:`~covariant.optim.functional`: :func:`riemannian_gd`, :func:`riemannian_step`,
  :func:`gradient_flow` on a :class:`~covariant.ParameterSpace`, and the tools to compare
  trajectories across charts (:func:`map_trajectory`, :func:`trajectory_discrepancy`,
  :func:`step_size_sweep`, :func:`fit_loglog_slope`, :class:`SweepResult`).
- :mod:`~covariant.optim.optimizer`: :class:`RiemannianGD`, a drop-in
  ``torch.optim.Optimizer`` (the keyword arguments of ``torch.optim.SGD``) with a metric: any
  :class:`~covariant.metrics.Metric`, or the natural gradient of a model ("ggn", "fisher",
  "empirical_fisher") pulled back through the model's ``parametrize`` charts, solved
  matrix-free by conjugate gradients, or K-FAC natural gradient ("kfac", "ekfac"): the
  Kronecker-factored metric, refreshed every T steps and averaged, solved in closed form.

Example
-------
>>> import torch
>>> from covariant.optim import RiemannianGD
>>> w = torch.nn.Parameter(torch.tensor([3.0]))
>>> opt = RiemannianGD([w], lr=0.5)          # G = I: plain gradient descent, as torch.optim.SGD
>>> for _ in range(3):
...     opt.zero_grad(); ((w - 1.0) ** 2).sum().backward(); opt.step()
>>> float(w.detach())                        # w ← w − 0.5 · 2 (w − 1) lands on 1 at once
1.0
"""

from __future__ import annotations

from .functional import (
    UPDATES,
    SweepResult,
    fit_loglog_slope,
    gradient_flow,
    map_trajectory,
    riemannian_gd,
    riemannian_step,
    step_size_sweep,
    trajectory_discrepancy,
)
from .optimizer import METRIC_NAMES, RiemannianGD

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
