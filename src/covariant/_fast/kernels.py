r"""Kernel choices for second-order work: attention that can be differentiated twice.

The fused kernels of ``scaled_dot_product_attention`` (flash, memory-efficient, cuDNN; on CPU
and CUDA) have neither a double backward nor forward-mode AD, and the inference fast path of
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (taken without autograd) has no
derivative at all. :func:`second_order` selects the math kernel, the composite of matrix
products, masking and a softmax that every derivative (and every Taylor rule) goes through,
and turns the fast path off, for the forward passes run inside it. Models without attention
compute exactly the same numbers inside and outside.

:func:`composite_layer_norm` works around a torch bug of another kind: the forward-mode
derivative of ``native_layer_norm`` is not itself differentiable correctly (torch 2.13: any
derivative of a ``jvp`` through layer norm, ``jvp`` of ``jvp`` or ``grad`` of ``jvp``, gets the
block ∂²/∂w∂x of the norm's weight w and input x wrong, and so does ``torch.func.hessian``).
Inside it, ``F.layer_norm`` runs as its composite, mean, centring, ``rsqrt`` of the biased
variance and the affine map, whose derivatives of every order are those of plain operations.

Example
-------
>>> import torch
>>> import torch.nn.functional as F
>>> q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
>>> with second_order():
...     a = F.scaled_dot_product_attention(q, q, q)
...     torch.backends.cuda.flash_sdp_enabled()
False
>>> torch.backends.cuda.flash_sdp_enabled()       # restored on exit
True
>>> s = torch.softmax(q @ q.transpose(-2, -1) / 2.0, -1) @ q   # the math kernel itself
>>> bool(torch.allclose(a, s, rtol=1e-12, atol=1e-14))
True
>>> w = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
>>> with composite_layer_norm():
...     y = F.layer_norm(q, (4,), w)
>>> bool(torch.allclose(y, F.layer_norm(q, (4,), w), rtol=1e-12, atol=1e-12))
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch has no public backend selection
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]

__all__ = ["composite_layer_norm", "layer_norm_composite", "second_order"]


@contextmanager
def second_order() -> Iterator[None]:
    """Forward passes inside are differentiable twice and in forward mode: attention takes the
    math kernel (``sdpa_kernel(SDPBackend.MATH)``) and ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` skip their inference fast path. The previous settings come
    back on exit; contexts nest."""
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else False
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH) if sdpa_kernel is not None else nullcontext():
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def layer_norm_composite(x: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` written out: (x − mean) / √(var + ε) · w + b over the last dims."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    dims = tuple(range(-len(shape), 0))
    c = x - x.mean(dims, keepdim=True)
    y = c * (c * c).mean(dims, keepdim=True).add(eps).rsqrt()
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class _CompositeLayerNorm(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.layer_norm or func is torch.layer_norm:
            return layer_norm_composite(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def composite_layer_norm() -> Iterator[None]:
    """``F.layer_norm`` (``nn.LayerNorm``) runs as :func:`layer_norm_composite` inside: for
    forward passes whose forward-mode derivatives are differentiated again (see module
    docstring)."""
    with _CompositeLayerNorm():
        yield
