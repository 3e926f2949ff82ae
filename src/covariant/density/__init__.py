r"""Densities under reparametrization, the Riemannian volume, log det G, and MAP
(docs/math.md §2, §7).

A probability density with respect to Lebesgue measure is *not* a scalar: under θ = h(ψ),

    log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|,

so its mode moves. The density with respect to the Riemannian volume dV = √det G dθ,

    log q = log p − ½ log det G,

is a scalar, q_Ψ(ψ) = q_Θ(h(ψ)), and its modes are the same point in every chart.

Contents, one concept per module:

- :mod:`~covariant.density.rules`: :func:`pushforward_log_prob`, :func:`riemannian_log_prob`
  and :func:`lift_log_prob` (a density through a *submersion*, given a density along its
  fibres);
- :mod:`~covariant.density.logdet`: :func:`logdet`, log det G(p) three ways (``"closed"``,
  ``"dense"``, ``"slq"``, the last with an unbiased Hutchinson + CG gradient so that it can be
  used as a loss term), and :func:`logdet_estimate`, the SLQ value and the per-coordinate
  gradient with standard errors;
- :mod:`~covariant.density.map`: :func:`map_objective` and :func:`map_estimate`, MAP
  (``riemannian=False``) or the mode of q = p/√det G (``riemannian=True``), by damped Newton
  (:mod:`~covariant.density.newton`), L-BFGS or Adam;
- :mod:`~covariant.density.results`: :class:`LogDetEstimate` and :class:`MAPResult`, each
  with ``to_dict()``.

Example
-------
>>> import math, torch
>>> from covariant.density import pushforward_log_prob
>>> from covariant.reparam import Log
>>> log_p = lambda x: torch.distributions.Normal(0.0, 1.0).log_prob(x).sum()
>>> log_q = pushforward_log_prob(log_p, Log())     # x = log y: the log-normal density of y
>>> abs(float(log_q(torch.tensor([1.0]))) + 0.5 * math.log(2 * math.pi)) < 1e-6
True
"""

from __future__ import annotations

from .logdet import AUTO_DENSE_LIMIT, LOGDET_METHODS, logdet, logdet_estimate
from .map import map_estimate, map_objective
from .results import LogDetEstimate, MAPResult
from .rules import lift_log_prob, pushforward_log_prob, riemannian_log_prob

__all__ = [
    "AUTO_DENSE_LIMIT",
    "LOGDET_METHODS",
    "LogDetEstimate",
    "MAPResult",
    "lift_log_prob",
    "logdet",
    "logdet_estimate",
    "map_estimate",
    "map_objective",
    "pushforward_log_prob",
    "riemannian_log_prob",
]
