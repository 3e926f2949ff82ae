r"""Second-order Taylor rules of the normalization layers: layer norm, group norm, RMS norm.

Each normalizes a centred (layer and group norm) or raw (RMS norm) value c over a set of
dimensions, x̂ = c·r with r = (s + ε)^{-1/2} and s = mean(c²), then applies an optional affine
map y = x̂ w + b. With c₁, c₂ the coefficients of c (for layer and group norm
c_k = x_k − mean(x_k)),

    s₁ = 2 mean(c₀c₁),    s₂ = mean(2 c₀c₂ + c₁²),
    r₁ = −½ r₀³ s₁,       r₂ = −½ r₀³ s₂ + ⅜ r₀⁵ s₁²,

and the product rule gives x̂ = c·r and y = x̂·w + b. The saved statistics (mean, 1/std) that
the aten operations also return get their coefficients as well, so that a loss that reads them
stays exact. c₀ and r₀ are formed once per point (the rule builders take the recorded values);
each probe costs a few elementwise passes and reductions.

Every rule has the signature ``rule(node, primal, coef) -> (c₁, c₂)``.

Example
-------
>>> import torch
>>> xhat0, r0 = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0]])   # s₀ = 1, ε = 0
>>> x1, x2 = _normalized(xhat0, r0, torch.tensor([[1.0, 1.0]]), None, (-1,))[:2]
>>> x1.tolist(), x2.tolist()       # (1 + t, −1 + t)/√(1 + t²) = x̂₀ + t − ½ x̂₀ t² + …
([[1.0, 1.0]], [[-0.5, 0.5]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .coefficients import coef_of as _c
from .coefficients import primal_of as _v
from .rules import _product_rule

__all__ = ["group_norm_rule", "layer_norm_rule", "rms_norm_rule"]

Coefs = tuple[Tensor | None, Tensor | None]


def _normalized(xhat0: Tensor, r0: Tensor, c1: Tensor | None, c2: Tensor | None,
                dims: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None,
                                                Tensor | None, Tensor | None]:
    """(x̂₁, x̂₂, r₁, r₂) of x̂ = c·r, r = (mean(c²) + ε)^{-1/2} over ``dims`` (kept).

    In units of x̂, with z_k = r₀ c_k, α_k = mean(x̂₀ z_k) and β = mean(z₁²), the formulas of
    the module docstring become r₁ = −r₀ α₁, r₂ = r₀ κ with κ = −α₂ − ½β + (3/2)α₁², and
    x̂₁ = z₁ − α₁ x̂₀,  x̂₂ = z₂ − α₁ z₁ + κ x̂₀."""
    z1 = None if c1 is None else c1 * r0
    z2 = None if c2 is None else c2 * r0
    a1 = None if z1 is None else (xhat0 * z1).mean(dims, keepdim=True)
    kappa = None if z2 is None else (xhat0 * z2).mean(dims, keepdim=True).neg_()
    if z1 is not None:
        beta = (z1 * z1).mean(dims, keepdim=True)
        k1 = a1 * a1 * 1.5 - beta * 0.5
        kappa = k1 if kappa is None else kappa.add_(k1)
    x2 = None if kappa is None else xhat0 * kappa if z2 is None else torch.addcmul(
        z2, xhat0, kappa)
    if z1 is not None:
        x2 = x2.sub_(a1 * z1) if x2 is not None else -(a1 * z1)
    x1 = None if z1 is None else z1.sub_(xhat0 * a1)
    r1 = None if a1 is None else -(r0 * a1)
    r2 = None if kappa is None else r0 * kappa
    return x1, x2, r1, r2


def _centred(x1: Tensor | None, x2: Tensor | None, dims: tuple[int, ...]
             ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """([c₁, c₂], [μ₁, μ₂]) with c_k = x_k − mean(x_k) over ``dims``."""
    cs: list[Tensor | None] = []
    mus: list[Tensor | None] = []
    for xk in (x1, x2):
        mu = None if xk is None else xk.mean(dims, keepdim=True)
        mus.append(mu)
        cs.append(None if xk is None else xk - mu)
    return cs, mus


def _affine(xhat0: Tensor, xh: Coefs, w: Any, b: Any, primal: dict[Any, Any],
            coef: dict[Any, tuple[Any, Any]], view: Callable[[Tensor], Tensor]) -> Coefs:
    """Coefficients of y = x̂ w + b (w, b optional, broadcast through ``view``)."""
    out = list(xh)
    if w is not None:
        def ch(t: Tensor | None) -> Tensor | None:
            return None if t is None else view(t)

        out = list(_product_rule(torch.mul, xhat0, xh[0], xh[1], view(_v(w, primal)),
                                 ch(_c(w, coef, 1)), ch(_c(w, coef, 2))))
    if b is not None:
        for k in (1, 2):
            bk = _c(b, coef, k)
            if bk is not None:
                bk = view(bk)
                out[k - 1] = bk.expand(xhat0.shape) if out[k - 1] is None else out[k - 1] + bk
    return out[0], out[1]


def layer_norm_rule(node: Any, primal: dict[Any, Any]) -> Callable[..., Any]:
    """The rule of ``native_layer_norm(x, shape, w, b, eps) -> (y, mean, rstd)``."""
    x, shape, w, b = node.args[:4]
    dims = tuple(range(-len(shape), 0))
    _, mean0, rstd0 = primal[node]
    xhat0 = (_v(x, primal) - mean0) * rstd0

    def rule(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
        cs, mus = _centred(_c(x, coef, 1), _c(x, coef, 2), dims)
        x1, x2, r1, r2 = _normalized(xhat0, rstd0, cs[0], cs[1], dims)
        y = _affine(xhat0, (x1, x2), w, b, primal, coef, lambda t: t)
        return tuple(None if yk is None else (yk, mk, rk)
                     for yk, mk, rk in zip(y, mus, (r1, r2), strict=True))

    return rule


def group_norm_rule(node: Any, primal: dict[Any, Any]) -> Callable[..., Any]:
    """The rule of ``native_group_norm(x, w, b, N, C, HxW, G, eps) -> (y, mean, rstd)``:
    layer norm of x viewed as (N, G, C/G·HxW), then a per-channel affine map."""
    x, w, b, n, ch, _, groups = node.args[:7]
    x0 = _v(x, primal)
    shape = x0.shape
    _, mean0, rstd0 = primal[node]
    stat = (n, groups, 1)
    c0 = x0.reshape(n, groups, -1) - mean0.reshape(stat)
    r0 = rstd0.reshape(stat)
    xhat0g = c0 * r0
    xhat0 = xhat0g.reshape(shape)
    chan = (1, ch) + (1,) * (len(shape) - 2)

    def grouped(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(n, groups, -1)

    def rule(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
        cs, mus = _centred(grouped(_c(x, coef, 1)), grouped(_c(x, coef, 2)), (-1,))
        x1, x2, r1, r2 = _normalized(xhat0g, r0, cs[0], cs[1], (-1,))
        xh = tuple(None if t is None else t.reshape(shape) for t in (x1, x2))
        y = _affine(xhat0, xh, w, b, primal, coef, lambda t: t.view(chan))
        return tuple(None if yk is None else
                     (yk, None if mk is None else mk.reshape(n, groups),
                      None if rk is None else rk.reshape(n, groups))
                     for yk, mk, rk in zip(y, mus, (r1, r2), strict=True))

    return rule


def rms_norm_rule(node: Any, primal: dict[Any, Any]) -> Callable[..., Any]:
    """The rule of ``_fused_rms_norm(x, shape, w, eps) -> (y, rstd)``: x̂ = x·r with
    r = (mean(x²) + ε)^{-1/2}, no centring. (``F.rms_norm`` off this fused kernel decomposes
    into operations with rules of their own.)"""
    x, shape, w = node.args[:3]
    dims = tuple(range(-len(shape), 0))
    _, rstd0 = primal[node]
    xhat0 = _v(x, primal) * rstd0

    def rule(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
        x1, x2, r1, r2 = _normalized(xhat0, rstd0, _c(x, coef, 1), _c(x, coef, 2), dims)
        y = _affine(xhat0, (x1, x2), w, None, primal, coef, lambda t: t)
        return tuple(None if yk is None else (yk, rk)
                     for yk, rk in zip(y, (r1, r2), strict=True))

    return rule
