r"""Second-order Taylor rules of linear, bilinear and piecewise-linear operations.

Each rule maps the coefficients (x₁, x₂) of its inputs to those of its output. Linear
operations act on each coefficient; a bilinear ``op(a, b)`` (matrix products, convolutions,
elementwise products) follows the product rule

    (a·b)₁ = a₁b₀ + a₀b₁,        (a·b)₂ = a₂b₀ + a₁b₁ + a₀b₂;

division multiplies by r = 1/b with r₁ = −b₁/b₀², r₂ = −b₂/b₀² + b₁²/b₀³; the 2-norm
n = √s, s = Σ x², has n₁ = s₁/(2n₀), n₂ = s₂/(2n₀) − s₁²/(8n₀³). Batch norm with running
statistics is affine in x; max pooling picks the coefficient at the recorded argmax.

Every rule has the signature ``rule(node, primal, coef) -> (c₁, c₂)``.

Example
-------
>>> import torch
>>> a0, a1 = torch.tensor([2.0]), torch.tensor([1.0])
>>> b0, b1 = torch.tensor([3.0]), torch.tensor([-1.0])
>>> c1, c2 = _product_rule(torch.mul, a0, a1, None, b0, b1, None)  # (2 + t)(3 − t)
>>> float(c1), float(c2)
(1.0, -1.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .coefficients import accumulate as _acc
from .coefficients import add_optional as _add
from .coefficients import coef_of as _c
from .coefficients import primal_of as _v
from .coefficients import resolved as _resolved
from .recording import substitute

__all__ = [
    "add_sub", "addmm", "batch_norm_eval", "bilinear", "concat", "convolution",
    "getitem_rule", "linear_first", "masked_fill", "max_pool", "quotient", "shifted",
    "vector_norm", "where",
]


def getitem_rule(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    src, idx = node.args
    pair = coef.get(src)
    if pair is None:
        return (None, None)
    return tuple(None if c is None else c[idx] for c in pair)


# Views whose coefficient may not be viewable: a coefficient need not share the memory layout
# of its primal (an elementwise rule keeps the layout of its inputs), so these reshape.
_RESHAPED = {"view", "_unsafe_view", "view_copy"}


def linear_first(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    args, kwargs = _resolved(node, primal)
    src = node.args[0]
    target = node.target
    if target.overloadpacket.__name__ in _RESHAPED and not isinstance(args[1], torch.dtype):
        target = torch.reshape
    out = []
    for k in (1, 2):
        c = _c(src, coef, k)
        out.append(None if c is None else target(c, *args[1:], **kwargs))
    return tuple(out)


def shifted(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    return coef.get(node.args[0], (None, None))


def add_sub(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    packet = node.target.overloadpacket.__name__
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    shape = primal[node].shape
    out = []
    for k in (1, 2):
        ca, cb = _c(a, coef, k), _c(b, coef, k)
        if packet == "rsub":  # b - alpha·a
            ca, cb = cb, ca
            term_a, term_b = ca, None if cb is None else -alpha * cb
        elif packet == "sub":
            term_a, term_b = ca, None if cb is None else -alpha * cb
        else:
            term_a, term_b = ca, None if cb is None else (cb if alpha == 1 else alpha * cb)
        s = _add(term_a, term_b)
        out.append(None if s is None else s.expand(shape) if s.shape != shape else s)
    return tuple(out)


def concat(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    tensors = node.args[0]
    rest = substitute(node.args[1:], primal)
    out = []
    for k in (1, 2):
        cs = [_c(t, coef, k) for t in tensors]
        if all(c is None for c in cs):
            out.append(None)
            continue
        parts = [torch.zeros_like(_v(t, primal)) if c is None else c
                 for t, c in zip(tensors, cs, strict=True)]
        out.append(node.target(parts, *rest, **node.kwargs))
    return tuple(out)


def _product(op: Callable[[Any, Any], Tensor], a: Any, b: Any, primal: dict[Any, Any],
             coef: dict[Any, tuple[Any, Any]]) -> tuple[Tensor | None, Tensor | None]:
    """Product rule for a bilinear ``op(a, b)`` of two recorded arguments."""
    return _product_rule(op, _v(a, primal), _c(a, coef, 1), _c(a, coef, 2),
                         _v(b, primal), _c(b, coef, 1), _c(b, coef, 2))


def _product_rule(op: Callable[[Any, Any], Tensor], a0: Any, a1: Tensor | None,
                  a2: Tensor | None, b0: Any, b1: Tensor | None, b2: Tensor | None
                  ) -> tuple[Tensor | None, Tensor | None]:
    """(a·b)₁ = a₁b₀ + a₀b₁, (a·b)₂ = a₂b₀ + a₁b₁ + a₀b₂ for a bilinear ``op``."""
    # every term is a fresh tensor of the output's shape: accumulate in place
    c1 = _acc(None if a1 is None else op(a1, b0), None if b1 is None else op(a0, b1))
    c2 = None
    for x, y in ((a2, b0), (a1, b1), (a0, b2)):
        if x is not None and y is not None:
            c2 = _acc(c2, op(x, y))
    return c1, c2


def bilinear(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    a, b = node.args[0], node.args[1]
    return _product(node.target, a, b, primal, coef)


def addmm(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # addmm and baddbmm: beta·bias + alpha·(m1 @ m2), batched for baddbmm
    bias, m1, m2 = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    mm = torch.bmm if node.target.overloadpacket.__name__ == "baddbmm" else torch.mm
    c1, c2 = _product(mm, m1, m2, primal, coef)
    if alpha != 1:
        c1 = None if c1 is None else c1.mul_(alpha)
        c2 = None if c2 is None else c2.mul_(alpha)
    shape = primal[node].shape
    out = []
    for k, c in ((1, c1), (2, c2)):
        cb = _c(bias, coef, k)
        s = _acc(c, None if cb is None else cb if beta == 1 else beta * cb)
        out.append(None if s is None else s.expand(shape) if s.shape != shape else s)
    return tuple(out)


def masked_fill(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # y = x where the (constant) mask is false, the constant fill value where it is true
    mask = _v(node.args[1], primal)
    return tuple(None if c is None else c.masked_fill(mask, 0.0)
                 for c in coef.get(node.args[0], (None, None)))


def where(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # y = a where the (constant) condition holds, b elsewhere
    cond, a, b = node.args[:3]
    shape = primal[node].shape
    out = []
    for k in (1, 2):
        ca, cb = _c(a, coef, k), _c(b, coef, k)
        if ca is None and cb is None:
            out.append(None)
            continue
        t = torch.where(_v(cond, primal), 0.0 if ca is None else ca, 0.0 if cb is None else cb)
        out.append(t.expand(shape) if t.shape != shape else t)
    return tuple(out)


def convolution(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    x, w, bias = node.args[:3]
    rest = substitute(node.args[3:], primal)
    target = node.target

    def conv(a: Tensor, b: Tensor) -> Tensor:
        return target(a, b, None, *rest)

    c1, c2 = _product(conv, x, w, primal, coef)
    out = []
    for k, c in ((1, c1), (2, c2)):
        cb = _c(bias, coef, k)
        if cb is not None:
            view = (1, -1) + (1,) * (primal[node].ndim - 2)
            shape = primal[node].shape
            cb = cb.view(view)
            c = cb.expand(shape) if c is None else c.add_(cb)
        out.append(c)
    return tuple(out)


def quotient(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # a / b = a · r with r = 1/b: r₁ = −b₁/b₀², r₂ = −b₂/b₀² + b₁²/b₀³; then the product rule
    a, b = node.args[0], node.args[1]
    a0, r0 = _v(a, primal), 1.0 / _v(b, primal)
    b1, b2 = _c(b, coef, 1), _c(b, coef, 2)
    r1 = None if b1 is None else -b1 * r0 * r0
    r2 = None if b2 is None else -b2 * r0 * r0
    if b1 is not None:
        r2 = _acc(r2, b1 * b1 * r0 * r0 * r0)
    q1, q2 = _product_rule(torch.mul, a0, _c(a, coef, 1), _c(a, coef, 2), r0, r1, r2)
    shape = primal[node].shape
    return tuple(None if q is None else q.expand(shape) if q.shape != shape else q
                 for q in (q1, q2))


def vector_norm(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # n = √s with s = Σ x²: s₁ = 2Σ x₀x₁, s₂ = Σ (2 x₀x₂ + x₁²);
    # n₁ = s₁ / (2n₀), n₂ = s₂ / (2n₀) − s₁² / (8 n₀³)
    src = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    keepdim = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    x0, n0 = _v(src, primal), primal[node]
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)

    def total(t: Tensor) -> Tensor:
        return t.sum() if dim is None else t.sum(dim, keepdim=keepdim)

    s1 = None if x1 is None else 2 * total(x0 * x1)
    s2 = None if x2 is None else 2 * total(x0 * x2)
    if x1 is not None:
        s2 = _acc(s2, total(x1 * x1))
    n1 = None if s1 is None else s1 / (2 * n0)
    n2 = None if s2 is None else s2 / (2 * n0)
    if s1 is not None:
        n2 = _acc(n2, -(s1 * s1) / (8 * n0 * n0 * n0))
    return n1, n2


def batch_norm_eval(node: Any, primal: dict[Any, Any],
                     coef: dict[Any, tuple[Any, Any]]) -> Any:
    # y = x̂ w + b with x̂ = (x − μ) / √(σ² + ε) per channel (running statistics: affine in x)
    legit = node.target.overloadpacket.__name__ == "_native_batch_norm_legit_no_training"
    x, w, b, mean, var = node.args[:5]
    eps = node.args[6] if legit else node.args[7]
    x0 = _v(x, primal)
    view = (1, -1) + (1,) * (x0.ndim - 2)
    scale = (_v(var, primal) + eps).rsqrt().view(view)
    xhat0 = (x0 - _v(mean, primal).view(view)) * scale
    w0 = None if w is None else _v(w, primal).view(view)

    def chan(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.view(view)

    out = []
    x1 = _c(x, coef, 1)
    for k in (1, 2):
        xk = _c(x, coef, k)
        c = None if xk is None else xk * scale if w0 is None else xk * (scale * w0)
        if w is not None:
            wk = chan(_c(w, coef, k))
            if wk is not None:
                c = _acc(c, xhat0 * wk)
            w1 = chan(_c(w, coef, 1))
            if k == 2 and x1 is not None and w1 is not None:
                c = _acc(c, x1 * scale * w1)
        if b is not None:
            bk = chan(_c(b, coef, k))
            if bk is not None:
                c = bk.expand(x0.shape) if c is None else c + bk
        out.append(c)
    # (output, saved mean, saved inverse std): only the output carries coefficients
    return tuple(None if c is None else (c, None, None) for c in out)


def max_pool(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # piecewise linear: each output coefficient is the input coefficient at the argmax
    # (indices count within each plane of the d spatial dimensions)
    src = node.args[0]
    d = int(node.target.overloadpacket.__name__[len("max_pool")])
    out0, idx = primal[node]
    flat_idx = idx.flatten(start_dim=idx.ndim - d)
    res = []
    for k in (1, 2):
        xk = _c(src, coef, k)
        if xk is None:
            res.append(None)
            continue
        picked = xk.flatten(start_dim=xk.ndim - d).gather(-1, flat_idx)
        res.append((picked.reshape(out0.shape), None))
    return tuple(res)
