"""covariant: reparametrization-invariant geometry of neural-net parameter spaces.

Keep the metric explicit, transform every object by its rule, and flatness, optimizer
trajectories and MAP estimates stop depending on the chart (Kristiadi, Dangel & Hennig,
NeurIPS 2023). See ``MATH.md`` for the rules and ``API.md`` for the public names.

>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: (p**2).sum())
>>> cv.flatness(space, torch.zeros(3, dtype=torch.float64), measures=("trace",))["trace"].value
6.0
"""

from __future__ import annotations

from typing import Any

from . import connection, density, errors, metrics, reparam
from .flatness import FlatnessReport, Measure, flatness
from .invariance import InvarianceReport, check_invariance
from .space import ParameterSpace

__version__ = "0.1.0"

__all__ = [
    "FlatnessReport",
    "InvarianceReport",
    "Measure",
    "ParameterSpace",
    "__version__",
    "check_invariance",
    "connection",
    "density",
    "errors",
    "flatness",
    "metrics",
    "reparam",
]


def __getattr__(name: str) -> Any:  # lazy submodules that pull optional or heavier parts
    import importlib

    if name in {"optim", "laplace", "linalg", "zoo", "estimators", "experiments"}:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'covariant' has no attribute {name!r}")
