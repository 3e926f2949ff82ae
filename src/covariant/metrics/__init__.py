r"""Riemannian metrics as explicit objects.

A :class:`Metric` is a field of symmetric positive-(semi)definite matrices G(p) on one chart,
used only through products, so nothing d×d is built unless ``dense`` is asked for:
``matvec(p, v) = G(p) v``, ``solve(p, w) = G(p)⁻¹ w``, ``inner``, ``logdet``, ``dense``.

========================== =================================================================
module                     what
========================== =================================================================
:mod:`.base`               ``Metric``, ``Euclidean``, ``Constant``,
                           ``Pullback`` (G_Ψ = Jᵀ G_Θ J, the one home of that rule), ``Damped``
:mod:`.explicit`           ``Diagonal``, ``Dense``: metrics given as a field of the point
:mod:`.losses`             output-space curvature of the common losses
:mod:`.curvature_base`     ``CurvatureMetric``: G = Σ_b w_b J_bᵀ Λ_b J_b of a model space
:mod:`.model`              ``GGN``, ``Fisher``, ``EmpiricalFisher``
:mod:`.kronecker`          ``KroneckerFactored``: block-diagonal Kronecker-factored operators
:mod:`.kfac_factors`       K-FAC factors of a model at a point (hooks on Linear / Conv layers)
:mod:`.kfac`               ``KFAC``, ``EKFAC``: Kronecker-factored GGN / Fisher metrics
:mod:`.adam`               ``AdamMetric``: the geometry of an Adam/RMSprop/Adagrad state
:mod:`.registry`           metrics by name (``METRIC_NAMES``, ``metric_from_name``)
:mod:`.external`           ``from_curvlinops``: a curvlinops operator as G(θ₀), pinned to θ₀
========================== =================================================================

Example
-------
>>> import torch
>>> from covariant.metrics import Damped, Euclidean
>>> from covariant.reparam import Scale
>>> p = torch.ones(2, dtype=torch.float64)
>>> G = Damped(Euclidean(), 0.5).pullback(Scale(2.0))    # (1 + 0.5) · 2 · 2
>>> G.matvec(p, torch.ones(2, dtype=torch.float64))
tensor([6., 6.], dtype=torch.float64)
"""

from __future__ import annotations

from .adam import AdamMetric
from .base import (
    MAX_DENSE_DIM,
    Constant,
    Damped,
    Euclidean,
    Metric,
    Pullback,
    check_dense_size,
)
from .curvature_base import CurvatureMetric
from .explicit import Dense, Diagonal
from .external import OperatorMetric, from_curvlinops
from .kfac import EKFAC, KFAC
from .model import GGN, EmpiricalFisher, Fisher
from .registry import METRIC_NAMES, metric_from_name, resolve_metric

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "MAX_DENSE_DIM",
    "METRIC_NAMES",
    "AdamMetric",
    "Constant",
    "CurvatureMetric",
    "Damped",
    "Dense",
    "Diagonal",
    "EmpiricalFisher",
    "Euclidean",
    "Fisher",
    "Metric",
    "OperatorMetric",
    "Pullback",
    "check_dense_size",
    "from_curvlinops",
    "metric_from_name",
    "resolve_metric",
]
