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
  matrix-free by conjugate gradients.

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
