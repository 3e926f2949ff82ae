r"""Metrics by name: the one list of names that ``from_module``, ``with_metric``, the CLI and
the optimizers understand.

Example
-------
>>> metric_from_name("Euclidean", None)       # needs no model
Euclidean()
>>> METRIC_NAMES
('euclidean', 'ggn', 'fisher', 'empirical_fisher', 'kfac', 'ekfac')
"""

from __future__ import annotations

from typing import Any

from .._constants import METRIC_NAMES
from .base import Euclidean, Metric
from .kfac import EKFAC, KFAC
from .model import GGN, EmpiricalFisher, Fisher

__all__ = ["METRIC_NAMES", "metric_from_name", "resolve_metric"]

_ALIASES = {
    "gauss_newton": "ggn",
    "generalized_gauss_newton": "ggn",
    "ef": "empirical_fisher",
    "empiricalfisher": "empirical_fisher",
    "k_fac": "kfac",
    "ek_fac": "ekfac",
}


def metric_from_name(name: str, space: Any, **kwargs: Any) -> Metric:
    """A metric of a model space by name, built in that space's chart.

    Parameters
    ----------
    name : {"ggn", "fisher", "empirical_fisher", "kfac", "ekfac", "euclidean"}
        Also accepted: "gauss_newton", "ef", "k_fac", "ek_fac"; case and ``-``/``_`` do not
        matter. "kfac" / "ekfac" are metrics of the weights: on a reparametrized space they
        are pulled back (:meth:`covariant.metrics.KFAC.from_space`).
    space : ParameterSpace
        A model space (``from_module``) or any reparametrization of one; for the latter the
        metric is that of ψ ↦ f(h(ψ)), to compare with the pulled-back metric.
    **kwargs
        Passed to the constructor (``solve_mode``, ``mc_samples``, ``seed``; for K-FAC also
        ``fisher_type``, ``kfac_approx``, ``separate_bias``, ``damping``, ...).

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(2, 2).double()
    >>> data = (torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,)))
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data)
    >>> metric_from_name("fisher", space, mc_samples=8)
    Fisher(CrossEntropyLoss, 1 batches, solve_mode='raise', mc_samples=8, seed=0)
    """
    if not isinstance(name, str):
        raise TypeError(f"metric_from_name: name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key == "euclidean":
        if kwargs:
            raise TypeError(f"metric 'euclidean' takes no options, got {sorted(kwargs)}")
        return Euclidean()
    classes: dict[str, Any] = {
        "ggn": GGN,
        "fisher": Fisher,
        "empirical_fisher": EmpiricalFisher,
        "kfac": KFAC,
        "ekfac": EKFAC,
    }
    if key not in classes:
        raise ValueError(
            f"unknown metric {name!r}; choose one of {', '.join(repr(n) for n in METRIC_NAMES)} "
            "or pass a covariant.metrics.Metric (e.g. AdamMetric(optimizer))"
        )
    return classes[key].from_space(space, **kwargs)


def resolve_metric(metric: Metric | str, space: Any, **kwargs: Any) -> Metric:
    """``metric`` itself if it is a Metric, else the named metric of ``space``
    (:func:`metric_from_name`); what ``from_module`` and ``with_metric`` accept.

    >>> resolve_metric("euclidean", None)
    Euclidean()
    """
    if isinstance(metric, Metric):
        return metric
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a Metric or a name, got {type(metric).__name__}")
    return metric_from_name(metric, space, **kwargs)

