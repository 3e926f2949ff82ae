r"""Batched products of a data-parallel space: k probes, one all-reduce of k d-vectors.

An estimator that has k probes at once (a block of Hutchinson probes, a Lanczos block, the
columns of a sketch) needs the k products A v_1, …, A v_k of the same operator. On a shard
each of them is a partial sum, so the ranks compute all k locally and reduce them together:
the k local products are stacked into one (k, d) tensor, all-reduced once, and split. This
costs k local products and **one all-reduce of k·d numbers** — the same bytes as k separate
all-reduces but one latency instead of k. (Under ``vmap`` the reduced loss and gradient give
the same one (k, d) all-reduce per batch of products, after one of the loss and gradient.)

:func:`hvp_matmat` does it for the Hessian of the loss (the local HVPs share the shard's
gradient graph, built once without any reduction), :func:`metric_matmat` for a model metric
built on a shard (``local_matvec`` of the GGN, Fisher, empirical Fisher).

Example
-------
>>> import torch
>>> from torch import nn
>>> import covariant as cv
>>> space, theta = cv.ParameterSpace.from_module(nn.Linear(2, 1).double(), nn.MSELoss(),
...     (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)))
>>> V = torch.eye(3, dtype=torch.float64)
>>> H = hvp_matmat(space, theta)(V)              # one process: no reduction at all
>>> bool(torch.allclose(H, space.hessian(theta, riemannian=False)))
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..metrics import Metric
from ..metrics.shard import reduce_local
from ..space import ParameterSpace
from .space import RankSumLoss

__all__ = ["hvp_matmat", "metric_matmat"]

Matmat = Callable[[Tensor], Tensor]


def _rows(product: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
    if V.ndim != 2:
        raise ValueError(f"matmat: V must be (k, d), one probe per row; got {tuple(V.shape)}")
    return torch.stack([product(v) for v in V])


def hvp_matmat(space: ParameterSpace, p: Tensor) -> Matmat:
    """V (k, d) ↦ rows ∇²L(p) v_i: the shard's local HVPs on one gradient graph, then one
    all-reduce of the (k, d) block. A single-process space just stacks its HVPs."""
    loss: Any = space.loss_function
    if not isinstance(loss, RankSumLoss):  # one process, or a loss with more than the ranks'
        op = space.hvp_operator(p, False)  # sum (a posterior's prior): its own products
        return lambda V: _rows(op, V)
    return loss.hvp_matmat(p)


def metric_matmat(metric: Metric, p: Tensor) -> Matmat:
    """V (k, d) ↦ rows G(p) v_i: for a model metric with a shard (``local_matvec``), the local
    products and one all-reduce of the (k, d) block; otherwise the metric's own products."""
    shard = getattr(metric, "shard", None)
    local = getattr(metric, "local_matvec", None)
    if shard is None or local is None:
        return lambda V: _rows(lambda v: metric.matvec(p, v), V)

    def matmat(V: Tensor) -> Tensor:
        block = _rows(lambda v: local(p, v), V)
        return reduce_local(shard, lambda _: block, p)

    return matmat
