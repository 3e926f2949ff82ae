"""covariant: reparametrization-invariant geometry of neural-net parameter spaces.

Keep the metric explicit, transform every object by its rule, and flatness, optimizer
trajectories and MAP estimates stop depending on the chart (Kristiadi, Dangel & Hennig,
NeurIPS 2023). The rules are in ``docs/math.md`` and the public names in ``docs/api.md``.

The top level holds the central object, the measures and the checks; everything else lives in
a subpackage that mirrors the mathematics: ``reparam`` (charts), ``metrics``, ``connection``,
``linalg``, ``density``, ``optim``, ``laplace`` and ``zoo`` (problems, models, data).

>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: (p**2).sum())
>>> cv.flatness(space, torch.zeros(3, dtype=torch.float64), measures=("trace",))["trace"].value
6.0
"""

from __future__ import annotations

from . import (
    autodiff,
    connection,
    density,
    errors,
    experiments,
    laplace,
    linalg,
    metrics,
    optim,
    reparam,
    zoo,
)
from .flatness import FlatnessReport, Measure, flatness
from .invariance import (
    CheckResult,
    InvarianceReport,
    check_chart,
    check_gradient,
    check_hessian,
    check_invariance,
    check_metric,
)
from .layout import ModelBinding, ParameterLayout
from .space import ParameterSpace

__version__ = "0.1.0"

__all__ = [
    "CheckResult",
    "FlatnessReport",
    "InvarianceReport",
    "Measure",
    "ModelBinding",
    "ParameterLayout",
    "ParameterSpace",
    "__version__",
    "autodiff",
    "check_chart",
    "check_gradient",
    "check_hessian",
    "check_invariance",
    "check_metric",
    "connection",
    "density",
    "errors",
    "experiments",
    "flatness",
    "laplace",
    "linalg",
    "metrics",
    "optim",
    "reparam",
    "zoo",
]
