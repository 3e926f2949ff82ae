"""covariant: reparametrization-invariant geometry of neural-net parameter spaces.

Keep the metric explicit, transform every object by its rule, and flatness, optimizer
trajectories and MAP estimates stop depending on the chart (Kristiadi, Dangel & Hennig,
NeurIPS 2023). The rules are in ``docs/math.md`` and the public names in ``docs/api.md``.

The top level holds the central object, the measures and the checks; everything else lives in
a subpackage that mirrors the mathematics: ``reparam`` (charts), ``metrics``, ``connection``,
``linalg``, ``density``, ``optim``, ``laplace`` and ``zoo`` (problems, models, data).

The public names are loaded lazily (Scientific Python SPEC 1): :data:`_NAMES` states where
each one is defined, and the first access imports that module. ``import covariant`` alone
therefore imports neither torch nor NumPy, which keeps ``covariant --help`` fast; type
checkers read the explicit imports under ``TYPE_CHECKING``.

>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: (p**2).sum())
>>> cv.flatness(space, torch.zeros(3, dtype=torch.float64), measures=("trace",))["trace"].value
6.0
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The subpackages and modules reachable as attributes (``covariant.metrics``).
_SUBMODULES = (
    "autodiff",
    "connection",
    "density",
    "distributed",
    "errors",
    "experiments",
    "laplace",
    "linalg",
    "metrics",
    "optim",
    "reparam",
    "zoo",
)

#: Public name → the module that defines it (one path per name).
_NAMES = {
    "CheckResult": "invariance",
    "FlatnessReport": "flatness",
    "InvarianceReport": "invariance",
    "Measure": "flatness",
    "ModelBinding": "layout",
    "ParameterLayout": "layout",
    "ParameterSpace": "space",
    "check_chart": "invariance",
    "check_gradient": "invariance",
    "check_hessian": "invariance",
    "check_invariance": "invariance",
    "check_metric": "invariance",
    "flatness": "flatness",
}

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
    "distributed",
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

if TYPE_CHECKING:
    from . import (
        autodiff,
        connection,
        density,
        distributed,
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


def __getattr__(name: str) -> Any:
    """Import a public name (or subpackage) on first access and keep it."""
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"{__name__}.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names (loaded or not) and the module's dunder attributes."""
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})


class _Package(types.ModuleType):
    """The type of this package's module object.

    Importing the subpackage ``covariant.flatness`` makes Python bind it as an attribute of
    ``covariant``, which would hide the public function :func:`covariant.flatness`. A public
    name that is not a subpackage therefore keeps its value: a module is not bound over it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _NAMES and name not in _SUBMODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
