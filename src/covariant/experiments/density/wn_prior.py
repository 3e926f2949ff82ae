"""The prior of part (c) in the weight-norm chart (g, v), whose pushforward to w is N(0, λ⁻¹I).

Weight norm is a submersion, so the w-prior cannot be pushed to (g, v) as a density. On every
row we place the product prior g ~ ½·χ_n(√λ |g|)√λ (a symmetric χ_n law, n the row length) and
v rotation-invariant with log‖v‖ ~ N(0, 0.1²). Then g·v/‖v‖ has a uniform direction and a
χ_n/√λ length, so its pushforward to w is exactly N(0, λ⁻¹I).

Example
-------
>>> import math
>>> round(math.exp(_log_sphere_area(3)) / math.pi, 12)  # |S²| = 4π
4.0
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import laplace as cvl
from ...reparam import ParameterwiseReparametrization, WeightNorm
from ...space import ParameterSpace

__all__ = ["LOGV_SCALE", "weight_norm_space", "wn_point", "wn_prior_log_prob"]

LOGV_SCALE = 0.1  # log‖v‖ ~ N(0, LOGV_SCALE²): the gauge part of the prior on (g, v)


def _log_chi(x: Tensor, n: int) -> Tensor:
    """log of the χ_n density at x > 0."""
    return (n - 1) * torch.log(x) - x**2 / 2 - (n / 2 - 1) * math.log(2) - math.lgamma(n / 2)


def _log_sphere_area(n: int) -> float:
    """log of the area of the unit sphere S^{n−1} ⊂ ℝⁿ."""
    return math.log(2) + (n / 2) * math.log(math.pi) - math.lgamma(n / 2)


def wn_prior_log_prob(g: Tensor, v_rows: Tensor, lam: float) -> Tensor:
    """log p(g) + log p(v) for weight-norm rows: the (g, v) prior whose pushforward is N(0, λ⁻¹I).

    g ~ ½ χ_n(√λ|g|)√λ (symmetric), v rotation invariant with log‖v‖ ~ N(0, s²):
    p(v) = ρ(‖v‖) / (|S^{n−1}| ‖v‖^{n−1}) with ρ(r) = N(log r; 0, s²)/r.
    """
    n = v_rows.shape[1]
    r = v_rows.norm(dim=1)
    lg = math.log(0.5) + _log_chi(g.abs() * math.sqrt(lam), n) + 0.5 * math.log(lam)
    lr = torch.log(r)
    log_rho = (-0.5 * (lr / LOGV_SCALE) ** 2 - math.log(LOGV_SCALE * math.sqrt(2 * math.pi))
               - lr)
    lv = log_rho - _log_sphere_area(n) - (n - 1) * lr
    return (lg + lv).sum()


def weight_norm_space(
    w_space: ParameterSpace, lam: float
) -> tuple[ParameterSpace, ParameterwiseReparametrization]:
    """The Bayesian MLP in the weight-norm chart (every ``*.weight``), with the (g, v) prior."""
    layout = w_space.layout
    assert layout is not None
    h = ParameterwiseReparametrization(layout, {"*.weight": WeightNorm()})
    new_layout = h.new_layout
    assert w_space.binding is not None and w_space.binding.is_bayesian
    nll = w_space.binding.loss  # −log p(D | θ) of a posterior space
    sl = new_layout.slices
    names = list(new_layout.names)
    shapes = dict(zip(new_layout.names, new_layout.shapes, strict=True))

    def log_prob(psi: Tensor) -> Tensor:
        total = -nll(h.forward(psi))
        for name in names:
            if name.endswith(".g"):
                base = name[:-2]
                g = psi[sl[name]]
                v = psi[sl[base + ".v"]].reshape(shapes[base + ".v"])
                total = total + wn_prior_log_prob(g, v.reshape(v.shape[0], -1), lam)
            elif not name.endswith(".v"):
                total = total - cvl.gaussian_prior_nll(psi[sl[name]], lam)
        return total

    space = w_space.reparametrize(h, loss=lambda psi: -log_prob(psi))
    return space, h


def wn_point(h: ParameterwiseReparametrization, w: Tensor) -> Tensor:
    """h⁻¹(w) with every ‖v_row‖ at the gauge prior's optimum e^{−s²} (g = ±‖w_row‖)."""
    psi = h.inverse(w).clone()
    layout = h.new_layout
    for name, sl in layout.slices.items():
        if name.endswith(".v"):
            shape = dict(zip(layout.names, layout.shapes, strict=True))[name]
            rows = psi[sl].reshape(shape[0], -1)
            rows = rows / rows.norm(dim=1, keepdim=True) * math.exp(-(LOGV_SCALE**2))
            psi[sl] = rows.reshape(-1)
    return psi
