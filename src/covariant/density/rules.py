r"""The transformation rules of a density, and the Riemannian volume (docs/math.md §2, §7).

A probability density with respect to Lebesgue measure is *not* a scalar: under θ = h(ψ),

    log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|,

so its mode moves. The density with respect to the Riemannian volume dV = √det G dθ,

    log q = log p − ½ log det G,

is a scalar, q_Ψ(ψ) = q_Θ(h(ψ)), and its modes are the same point in every chart.
:func:`lift_log_prob` carries a density through a *submersion*, given a density along its
fibres.

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
from typing import Any

from torch import Tensor

from ..metrics import Metric
from ..reparam import Reparametrization
from .logdet import logdet

__all__ = ["lift_log_prob", "pushforward_log_prob", "riemannian_log_prob"]


def pushforward_log_prob(
    log_prob: Callable[[Tensor], Tensor], reparam: Reparametrization
) -> Callable[[Tensor], Tensor]:
    """log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|: the same distribution in the chart ψ.

    Raises :class:`~covariant.errors.NotABijectionError` for a submersion, which has no
    log|det J| (see :func:`lift_log_prob` for what can be done instead).
    """
    return reparam.pushforward_log_prob(log_prob)


def riemannian_log_prob(
    log_prob: Callable[[Tensor], Tensor], metric: Metric, *, method: str | None = None,
    **logdet_kwargs: Any,
) -> Callable[[Tensor], Tensor]:
    """log q(p) = log p(p) − ½ log det G(p): the density w.r.t. the Riemannian volume.

    It transforms as a scalar when ``log_prob`` is pushed forward and ``metric`` pulled back
    through the same chart. By default log det G is the closed form where one is known (for a
    degenerate metric, a submersion chart, the pseudo-log-determinant) and ``metric.logdet``
    otherwise; ``method`` and ``logdet_kwargs`` choose a :func:`logdet` method instead.
    """

    def log_q(p: Tensor) -> Tensor:
        if method is None:
            closed = metric.closed_form_logdet(p, pseudo=metric.is_degenerate(p))
            ld = metric.logdet(p) if closed is None else closed
        else:
            ld = logdet(metric, p, method=method, **logdet_kwargs)
        return log_prob(p) - 0.5 * ld

    return log_q


def lift_log_prob(
    log_prob: Callable[[Tensor], Tensor],
    reparam: Reparametrization,
    fiber_log_prob: Callable[[Tensor], Tensor],
) -> Callable[[Tensor], Tensor]:
    r"""A density on ψ whose pushforward through a *submersion* h is p_Θ.

    A density cannot be pushed *backwards* through a submersion θ = h(ψ) (k > d): many ψ give
    the same θ. One has to choose how the mass spreads along each fibre h⁻¹(θ). By the coarea
    formula,

    .. math::

        \log p_Ψ(ψ) = \log p_Θ(h(ψ)) + ½ \log\det(J Jᵀ)(ψ) + \log ρ(ψ)

    is a probability density on Ψ with h_# p_Ψ = p_Θ whenever ρ restricted to every fibre is a
    probability density with respect to the fibre's (k−d)-dimensional volume. ``fiber_log_prob``
    is log ρ. For weight normalization w = g v/‖v‖ the fibre of one row is the two rays
    {(±‖w‖, ±s ŵ) : s > 0}, so ρ = ½ ρ_s(‖v‖) for any density ρ_s of s = ‖v‖ on (0, ∞).

    Its Riemannian density with the pulled-back metric Jᵀ G_Θ J (pseudo-determinant
    det G_Θ · det J Jᵀ) is q_Ψ = q_Θ(h(ψ)) · ρ(ψ): the θ-part of its mode is the θ-mode.

    ``log det J Jᵀ`` comes from the chart's ``jjt_logdet`` when it has one (weight norm,
    charts by parameter name), else from a dense Jacobian.

    Example
    -------
    >>> import torch, math
    >>> from covariant.reparam import WeightNorm
    >>> h = WeightNorm((1, 2))                      # one row w ∈ ℝ², ψ = (g, v₁, v₂)
    >>> log_p = lambda w: -0.5 * (w**2).sum() - math.log(2 * math.pi)
    >>> rho = lambda psi: math.log(0.5) - psi[1:].norm()   # ½ · Exp(1) density of ‖v‖
    >>> log_p_psi = lift_log_prob(log_p, h, rho)
    >>> psi = torch.tensor([1.5, 0.3, 0.4], dtype=torch.float64)
    >>> round(float(log_p_psi(psi)), 6)   # log N(h(ψ)) + log(g/‖v‖) + log ρ
    -3.057412
    """
    if reparam.is_bijection:
        base = pushforward_log_prob(log_prob, reparam)
        return lambda psi: base(psi) + fiber_log_prob(psi)

    def log_prob_psi(psi: Tensor) -> Tensor:
        return log_prob(reparam.forward(psi)) + 0.5 * reparam.jjt_logdet(psi) + fiber_log_prob(
            psi
        )

    return log_prob_psi

