r"""Euclidean derivatives of a scalar function of a flat point: ∇L, ∇²L v, and the dense ∇²L.

Every function takes the loss as a plain callable ``L(p) -> scalar`` written in torch
operations. Each picks the fastest correct mode for its input:

- on plain tensors (not tracked by autograd, not wrapped by ``torch.func``): ``torch.autograd``,
  with double backward for Hessian-vector products;
- inside ``torch.func`` transforms (vmap, jacfwd, grad): ``torch.func.grad`` compositions.

Reverse-over-reverse beats the forward-mode variants on CPU (measured in ``benchmarks/``),
works for operations without forward-mode AD (``torch._weight_norm``), and avoids the
immutable-zero-tensor failure of ``jvp(grad(L))`` through ``mse_loss`` on torch 2.13.

These are the chart-bound (Euclidean) objects; the Riemannian Hessian adds the connection term
(:mod:`covariant.connection`, ``ParameterSpace.hvp``).

Attention. The fused kernels of ``scaled_dot_product_attention`` (flash, memory-efficient,
cuDNN; on CPU and CUDA) have neither a double backward nor forward-mode AD, and the inference
fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` has no derivative at
all. Every second-order computation therefore runs its forward passes inside
:func:`second_order`, which selects the math kernel (plain matrix products and a softmax,
differentiable to any order) and turns the fast path off: :func:`hvp`, :func:`hvp_operator`,
:func:`dense_hessian`, Taylor-mode quadratic forms (``covariant._fast.QuadraticForm``) and,
through ``ModelBinding``'s forward, which enters it whenever θ is wrapped by a ``torch.func``
transform, the GGN/Fisher products and the connection terms. First-order paths on plain
tensors (the loss, :func:`gradient`, training) keep the fused kernels.

Example
-------
>>> import torch
>>> L = lambda p: (p[0] ** 2) * p[1] + p[1] ** 3
>>> p = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> gradient(L, p)                                   # (2 p0 p1, p0² + 3 p1²)
tensor([ 4., 13.], dtype=torch.float64)
>>> hvp(L, p, torch.tensor([1.0, 0.0], dtype=torch.float64))   # first column of ∇²L
tensor([4., 2.], dtype=torch.float64)
>>> bool(torch.equal(dense_hessian(L, p), torch.tensor([[4.0, 2.0], [2.0, 12.0]],
...                                                    dtype=torch.float64)))
True
>>> with second_order():                             # attention: the math kernel
...     torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

from ._fast import is_plain, second_order

__all__ = ["dense_hessian", "gradient", "hvp", "hvp_matmat_operator", "hvp_operator",
           "probe_chunk_size", "second_order"]

LossFn = Callable[[Tensor], Tensor]


def gradient(loss: LossFn, p: Tensor) -> Tensor:
    """∇L(p): autograd on plain tensors, ``torch.func.grad`` inside transforms."""
    if is_plain(p):
        with torch.enable_grad():
            q = p.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(q), q, allow_unused=True)
        return torch.zeros_like(p) if g is None else g
    return grad(loss)(p)


def hvp(loss: LossFn, p: Tensor, v: Tensor) -> Tensor:
    """∇²L(p) v by reverse-over-reverse differentiation (double backward on plain tensors)."""
    with second_order():
        return _hvp(loss, p, v)


def _hvp(loss: LossFn, p: Tensor, v: Tensor) -> Tensor:
    if is_plain(p) and is_plain(v):
        with torch.enable_grad():
            q = p.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(q), q, create_graph=True)
            if not g.requires_grad:  # the loss is linear in p
                return torch.zeros_like(p)
            (hv,) = torch.autograd.grad(g, q, grad_outputs=v, allow_unused=True)
        return torch.zeros_like(p) if hv is None else hv.detach()
    return grad(lambda q: torch.dot(grad(loss)(q), v))(p)


def hvp_operator(loss: LossFn, p: Tensor) -> Callable[[Tensor], Tensor]:
    """v ↦ ∇²L(p) v at a fixed plain point, with the gradient graph built once.

    Each product then runs only the second backward pass (as PyHessian does). Products with a
    transformed v fall back to :func:`hvp`.
    """
    q = p.detach().requires_grad_(True)
    with torch.enable_grad(), second_order():
        (g,) = torch.autograd.grad(loss(q), q, create_graph=True)
    if not g.requires_grad:  # the loss is at most linear in p
        return lambda v: torch.zeros_like(v)

    def product(v: Tensor) -> Tensor:
        if not is_plain(v):
            return hvp(loss, p, v)
        (hv,) = torch.autograd.grad(g, q, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    return product


def probe_chunk_size(graph_bytes: int, free_bytes: int, k: int, *, fraction: float = 0.5) -> int:
    """Columns per batched product so that a chunk fits in ``fraction`` of the free memory.

    A batched second backward over c columns holds about c times the intermediate tensors
    of one backward pass, which are bounded by the saved graph of the gradient
    (``graph_bytes``, measured when it was built): c = ⌊fraction · free / graph_bytes⌋,
    between 1 and k.

    >>> probe_chunk_size(graph_bytes=100, free_bytes=10_000, k=1000)
    50
    >>> probe_chunk_size(graph_bytes=100, free_bytes=10_000, k=20), probe_chunk_size(10**9, 10, 8)
    (20, 1)
    """
    per = max(int(graph_bytes), 1)
    return max(1, min(int(k), int(fraction * max(int(free_bytes), 0)) // per))


def hvp_matmat_operator(loss: LossFn, p: Tensor) -> Callable[[Tensor], Tensor]:
    """V ↦ ∇²L(p) V for a (d, k) block of vectors: one batched second backward per chunk.

    The gradient graph is built once, as in :func:`hvp_operator`; the columns then go
    through ``torch.autograd.grad(..., is_grads_batched=True)`` (a vmap over the backward
    pass) in chunks of :func:`probe_chunk_size` columns, sized on CUDA to the free device
    memory (``torch.cuda.mem_get_info``) and the measured size of the gradient graph; on
    other devices all k columns go at once. Raises whatever the batched backward raises
    for an operation without a batching rule (callers fall back to :func:`hvp_operator`).

    >>> L = lambda p: (p ** 4).sum() / 12
    >>> p = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> hvp_matmat_operator(L, p)(torch.eye(2, dtype=torch.float64))   # diag(p²)
    tensor([[1., 0.],
            [0., 4.]], dtype=torch.float64)
    """
    cuda = p.device.type == "cuda"
    before = torch.cuda.memory_allocated(p.device) if cuda else 0
    q = p.detach().requires_grad_(True)
    with torch.enable_grad(), second_order():
        (g,) = torch.autograd.grad(loss(q), q, create_graph=True)
    graph_bytes = (torch.cuda.memory_allocated(p.device) - before) if cuda else 0

    def product(V: Tensor) -> Tensor:
        if not g.requires_grad:  # the loss is at most linear in p
            return torch.zeros_like(V)
        k = int(V.shape[1])
        chunk = probe_chunk_size(graph_bytes, torch.cuda.mem_get_info(p.device)[0], k) \
            if cuda else k
        cols = []
        for start in range(0, k, chunk):
            (hv,) = torch.autograd.grad(g, q, grad_outputs=V[:, start:start + chunk].T,
                                        retain_graph=True, is_grads_batched=True)
            cols.append(hv.detach().T)
        return torch.cat(cols, 1)

    return product


def dense_hessian(loss: LossFn, p: Tensor) -> Tensor:
    """∇²L(p) as a dense matrix, reverse over reverse like the HVPs: ``jacrev(grad(L))`` for
    d ≤ 64, else batched HVPs with the identity in chunks of 32 (memory stays bounded).

    Not ``torch.func.hessian`` (forward over reverse): on torch 2.13 it gets the layer-norm
    block ∂²L/∂w∂θ wrong (w the norm's weight, θ upstream of its input: an asymmetric result,
    ``tests/test_attention.py``) and batch norm with batch statistics too, and forward mode
    fails through ``mse_loss``; reverse over reverse agrees with finite differences."""
    with second_order():
        return _dense_hessian(loss, p)


def _dense_hessian(loss: LossFn, p: Tensor) -> Tensor:
    d = p.shape[0]
    if d <= 64:
        return jacrev(grad(loss))(p)
    eye = torch.eye(d, dtype=p.dtype, device=p.device)
    try:
        return vmap(lambda v: hvp(loss, p, v), chunk_size=32)(eye)
    except NotImplementedError:  # an op without a batching rule for the products
        return jacrev(grad(loss), chunk_size=32)(p)
