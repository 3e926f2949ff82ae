r"""Second-order Taylor rules of nonlinear operations: elementwise functions and losses.

For an elementwise φ, (φ∘x)₁ = φ'(x₀) x₁ and (φ∘x)₂ = φ'(x₀) x₂ + ½ φ''(x₀) x₁², with φ'
and φ'' taken once per point by autograd (tanh and relu in closed form). Log-softmax,
softmax and logsumexp share the coefficients of logsumexp over a dimension,

    l₁ = ⟨π, x₁⟩,    l₂ = ⟨π, x₂⟩ + ½(⟨π, x₁²⟩ − ⟨π, x₁⟩²),    π = softmax(x₀);

MSE and binary cross-entropy with logits have their closed forms.

Every rule has the signature ``rule(node, primal, coef) -> (c₁, c₂)``.

Example
-------
>>> import torch
>>> x0, x1 = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])
>>> l1, l2 = _lse_coefficients(torch.softmax(x0, 1), x1, None, 1)
>>> float(l1), float(l2)  # logsumexp(t, −t) = log 2 + t²/2
(0.0, 0.5)
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

__all__ = [
    "bce_with_logits", "elementwise_rule", "log_softmax", "logsumexp", "mse_loss",
    "softmax",
]


def _lse_coefficients(probs: Tensor, x1: Tensor | None, x2: Tensor | None, dim: Any
                      ) -> tuple[Tensor | None, Tensor | None]:
    """Coefficients 1 and 2 of logsumexp(x) over ``dim`` (kept): ⟨π, x₁⟩ and
    ⟨π, x₂⟩ + ½(⟨π, x₁²⟩ − ⟨π, x₁⟩²), with π = softmax(x₀)."""
    l1 = l2 = None
    if x1 is not None:
        l1 = (probs * x1).sum(dim, keepdim=True)
        l2 = (probs * x1 * x1).sum(dim, keepdim=True).sub_(l1 * l1).mul_(0.5)
    if x2 is not None:
        l2 = _acc(l2, (probs * x2).sum(dim, keepdim=True))
    return l1, l2


def log_softmax(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # y = x − logsumexp(x): y_k = x_k − lse_k
    src, dim = node.args[0], node.args[1]
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
    l1, l2 = _lse_coefficients(primal[node].exp(), x1, x2, dim)
    y1 = None if x1 is None else x1 - l1
    y2 = None if l2 is None else (-l2).expand(primal[node].shape) if x2 is None else x2 - l2
    return y1, y2


def softmax(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # s = exp(u), u = log_softmax(x): s₁ = s u₁, s₂ = s (u₂ + ½ u₁²)
    src, dim = node.args[0], node.args[1]
    s0 = primal[node]
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
    l1, l2 = _lse_coefficients(s0, x1, x2, dim)
    u1 = None if x1 is None else x1 - l1
    u2 = None if l2 is None else -l2 if x2 is None else x2 - l2
    s1 = None if u1 is None else s0 * u1
    s2 = None
    if u2 is not None:
        s2 = s0 * (u2 + 0.5 * u1 * u1) if u1 is not None else s0 * u2
    return s1, s2


def logsumexp(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    src, dim = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = [dim] if isinstance(dim, int) else list(dim)
    x0 = _v(src, primal)
    y0 = primal[node] if keepdim else primal[node].reshape(
        [1 if i in [d % x0.ndim for d in dims] else n for i, n in enumerate(x0.shape)])
    l1, l2 = _lse_coefficients((x0 - y0).exp(), _c(src, coef, 1), _c(src, coef, 2), dims)
    shape = primal[node].shape
    return (None if l1 is None else l1.reshape(shape), None if l2 is None else l2.reshape(shape))


def bce_with_logits(node: Any, primal: dict[Any, Any],
                     coef: dict[Any, tuple[Any, Any]]) -> Any:
    # ℓ(x) = softplus(x) − t x: ℓ' = σ(x) − t, ½ℓ'' = ½ σ(1 − σ)
    src, target = node.args[0], node.args[1]
    reduction = node.args[4] if len(node.args) > 4 else node.kwargs.get("reduction", 1)
    x0, t = _v(src, primal), _v(target, primal)
    sig = torch.sigmoid(x0)
    x1, x2 = _c(src, coef, 1), _c(src, coef, 2)

    def reduce(v: Tensor) -> Tensor:
        return v.mean() if reduction == 1 else v.sum() if reduction == 2 else v

    y1 = None if x1 is None else reduce((sig - t) * x1)
    y2 = None if x2 is None else (sig - t) * x2
    if x1 is not None:
        y2 = _acc(y2, 0.5 * sig * (1 - sig) * x1 * x1)
    return y1, None if y2 is None else reduce(y2)


def mse_loss(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
    # ℓ = reduce((a − b)²): ℓ₁ = reduce(2 d₀ d₁), ℓ₂ = reduce(2 d₀ d₂ + d₁²)
    a, b = node.args[0], node.args[1]
    reduction = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction", 1)
    d0 = _v(a, primal) - _v(b, primal)
    d1 = _add(_c(a, coef, 1), None if _c(b, coef, 1) is None else -_c(b, coef, 1))
    d2 = _add(_c(a, coef, 2), None if _c(b, coef, 2) is None else -_c(b, coef, 2))

    def reduce(t: Tensor) -> Tensor:
        t = t.expand(torch.broadcast_shapes(t.shape, d0.shape))
        return t.mean() if reduction == 1 else t.sum() if reduction == 2 else t

    y1 = None if d1 is None else reduce(2 * d0 * d1)
    y2 = None
    if d2 is not None:
        y2 = reduce(2 * d0 * d2)
    if d1 is not None:
        y2 = _add(y2, reduce(d1 * d1))
    return y1, y2


def elementwise_rule(node: Any, primal: dict[Any, Any]) -> Callable[..., Any]:
    """φ'(x₀) and ½φ''(x₀) by autograd, once per point (tanh and relu in closed form, kept
    in less memory: tanh keeps only y and forms φ' = 1 − y² and ½φ'' = −y φ' per probe;
    relu keeps its mask as booleans)."""
    args, kwargs = _resolved(node, primal)
    name = node.target.overloadpacket.__name__
    src = node.args[0]
    if name == "relu":
        mask = args[0] > 0

        def relu_rule(node: Any, primal: dict[Any, Any],
                      coef: dict[Any, tuple[Any, Any]]) -> Any:
            x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
            return (None if x1 is None else x1 * mask, None if x2 is None else x2 * mask)

        return relu_rule
    if name == "tanh":
        y = primal[node]

        def tanh_rule(node: Any, primal: dict[Any, Any],
                      coef: dict[Any, tuple[Any, Any]]) -> Any:
            x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
            dy = torch.addcmul(torch.ones_like(y), y, y, value=-1)  # 1 − y², not kept
            y1 = None if x1 is None else dy * x1
            y2 = None if x2 is None else dy * x2
            if x1 is not None:  # ½φ'' x₁² = −y (1 − y²) x₁² = −(y x₁) y₁
                t = (y * x1).mul_(y1)
                y2 = t.neg_() if y2 is None else y2.sub_(t)
            return y1, y2

        return tanh_rule
    x0 = args[0].detach().requires_grad_(True)
    with torch.enable_grad():
        y = node.target(x0, *args[1:], **kwargs)
        (d1,) = torch.autograd.grad(y.sum(), x0, create_graph=True)
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), x0)
            half_d2: Tensor | None = 0.5 * d2.detach()
            if not bool(half_d2.any()):
                half_d2 = None
        else:
            half_d2 = None
    d1 = d1.detach()

    def rule(node: Any, primal: dict[Any, Any], coef: dict[Any, tuple[Any, Any]]) -> Any:
        x1, x2 = _c(src, coef, 1), _c(src, coef, 2)
        y1 = None if x1 is None else d1 * x1
        y2 = None if x2 is None else d1 * x2
        if x1 is not None and half_d2 is not None:
            y2 = _acc(y2, (half_d2 * x1).mul_(x1))
        return y1, y2

    return rule
