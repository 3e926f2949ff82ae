r"""Densities under reparametrization and the Riemannian volume (MATH.md §2, §7).

A probability density with respect to Lebesgue measure is *not* a scalar: under θ = h(ψ),

    log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|,

so its mode moves. The density with respect to the Riemannian volume dV = √det G dθ,

    log q = log p − ½ log det G,

is a scalar, q_Ψ(ψ) = q_Θ(h(ψ)), and its modes are the same point in every chart.

Example
-------
>>> import torch
>>> from covariant.reparam import Log
>>> from covariant.metrics import Euclidean, Pullback
>>> normal = torch.distributions.Normal(0.5, 0.8)
>>> log_p = lambda x: normal.log_prob(x).sum()
>>> log_p_y = pushforward_log_prob(log_p, Log())  # y = e^x, ψ = y
>>> log_q_y = riemannian_log_prob(log_p_y, Pullback(Euclidean(), Log()))
>>> y = torch.tensor([1.7], dtype=torch.float64)
>>> bool(torch.allclose(log_q_y(y), log_p(y.log())))   # a scalar: q_Ψ(ψ) = q_Θ(h(ψ))
True
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .metrics import Metric
from .reparam import Reparametrization

__all__ = ["pushforward_log_prob", "riemannian_log_prob"]


def pushforward_log_prob(
    log_prob: Callable[[Tensor], Tensor], reparam: Reparametrization
) -> Callable[[Tensor], Tensor]:
    """log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|: the same distribution in the chart ψ.

    Raises :class:`~covariant.errors.NotABijectionError` for a submersion, which has no
    log|det J|.
    """
    reparam._require_bijection("pushforward_log_prob")

    def log_prob_psi(psi: Tensor) -> Tensor:
        return log_prob(reparam.forward(psi)) + reparam.log_abs_det_jacobian(psi)

    return log_prob_psi


def riemannian_log_prob(
    log_prob: Callable[[Tensor], Tensor], metric: Metric
) -> Callable[[Tensor], Tensor]:
    """log q(p) = log p(p) − ½ log det G(p): the density w.r.t. the Riemannian volume.

    It transforms as a scalar when ``log_prob`` is pushed forward and ``metric`` pulled back
    through the same chart.
    """

    def log_q(p: Tensor) -> Tensor:
        return log_prob(p) - 0.5 * metric.logdet(p)

    return log_q
