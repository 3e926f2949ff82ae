r"""Sums over the ranks of a process group, differentiable in every mode (docs/api.md).

A rank's partial result F_r(θ) at a point θ that every rank holds becomes F(θ) = Σ_r F_r(θ)
through two autograd functions: :class:`ReduceSum` all-reduces in the forward pass and is the
identity backwards; :class:`CopyToRanks` is the identity forwards and all-reduces the
cotangent backwards. Each is the other's backward, and each has a forward-mode rule (reduce
or copy the tangent) and a ``vmap`` rule (reduce the whole batch at once), so every
composition of reverse mode, forward mode and ``torch.func`` transforms is exact:
``sum_over_ranks(F_r, θ) = ReduceSum(F_r(CopyToRanks(θ)))``. A batch of k products under
``vmap`` costs one all-reduce of k d-vectors.

:class:`ReducedMetric` turns a metric of this rank's shard into the metric of all the data.

Example
-------
>>> import torch
>>> from covariant.metrics import Diagonal
>>> G = ReducedMetric(Diagonal(torch.tensor([1.0, 2.0])))
>>> G
ReducedMetric(Diagonal())
>>> G.is_constant
False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._fast import is_taylor_recording
from ..errors import DistributedError, TaylorUnsupportedError
from ..metrics import Metric
from ..metrics.base import cholesky_or_raise

__all__ = [
    "CopyToRanks",
    "ReduceSum",
    "ReducedMetric",
    "check_process_group",
    "reduce_stack",
    "sum_over_ranks",
]

_LAUNCH_HINT = (
    "Launch with `torchrun --nproc-per-node N script.py` (which sets the environment) and "
    "call torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (CUDA) first."
)


def check_process_group(owner: str = "distributed_space") -> None:
    """Raise :class:`~covariant.errors.DistributedError` unless a process group is running."""
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            f"{owner}: no torch.distributed process group is initialized. " + _LAUNCH_HINT
        )


class ReduceSum(torch.autograd.Function):
    """Forward: all-reduce (sum) a rank's partial value. Backward: identity (CopyToRanks)."""

    @staticmethod
    def forward(x: Tensor, group: Any) -> Tensor:
        if is_taylor_recording():  # the record would see a constant: refuse, use HVPs
            raise TaylorUnsupportedError(
                "a sum over data-parallel ranks is not traced by Taylor mode; its quadratic "
                "forms run as Hessian-vector products (quadratic_forms='hvp')")
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return CopyToRanks.apply(g, ctx.group), None

    @staticmethod
    def jvp(ctx: Any, t: Tensor, _: Any) -> Tensor:
        return ReduceSum.apply(t, ctx.group)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, group: Any) -> tuple[Tensor, Any]:
        return ReduceSum.apply(x, group), in_dims[0]


class CopyToRanks(torch.autograd.Function):
    """Forward: identity (a replicated value enters a rank). Backward: all-reduce (ReduceSum)."""

    @staticmethod
    def forward(x: Tensor, group: Any) -> Tensor:
        return x.detach().clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return ReduceSum.apply(g, ctx.group), None

    @staticmethod
    def jvp(ctx: Any, t: Tensor, _: Any) -> Tensor:
        return CopyToRanks.apply(t, ctx.group)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, group: Any) -> tuple[Tensor, Any]:
        return CopyToRanks.apply(x, group), in_dims[0]


def sum_over_ranks(fn: Callable[[Tensor], Tensor], p: Tensor, group: Any = None) -> Tensor:
    """Σ_r fn_r(p) for a point p that every rank holds: one all-reduce of fn's value, exact
    under reverse mode, forward mode and ``vmap`` (module docstring)."""
    return ReduceSum.apply(fn(CopyToRanks.apply(p, group)), group)


def reduce_stack(vectors: list[Tensor], group: Any = None) -> list[Tensor]:
    """k tensors of this rank summed over the ranks: stacked, one all-reduce, split."""
    if not vectors:
        return []
    sizes = [v.numel() for v in vectors]
    flat = torch.cat([v.detach().reshape(-1) for v in vectors])
    dist.all_reduce(flat, group=group)
    return [t.reshape(v.shape).to(v.dtype) for t, v in zip(flat.split(sizes), vectors,
                                                              strict=True)]


class ReducedMetric(Metric):
    """G = Σ_r G_r: a metric of this rank's shard, summed over the ranks.

    ``local`` is the metric of this rank's data with global batch weights. ``matvec`` and
    ``dense`` are the local ones, all-reduced once (a d-vector, a d×d matrix); they are
    differentiable in the point, so the connection terms of the Riemannian Hessian are
    exact (each directional derivative of a product costs three all-reduces of a d-vector:
    the product and the two backward passes). ``solve`` is the base class's (Cholesky of the
    reduced dense G for small d, else CG on reduced products), ``logdet`` the Cholesky of the
    reduced dense G and ``rank`` the numerical rank of its spectrum (relative threshold
    ``rank_rtol``). Named model metrics of :func:`distributed_space` ("ggn", "fisher",
    "empirical_fisher", "kfac", "ekfac") are built reduced instead, which keeps their own
    ``solve_mode``, ``rank`` and ``logdet``.
    """

    is_constant = False

    def __init__(self, local: Metric, group: Any = None, *, rank_rtol: float = 1e-10) -> None:
        self.local = local
        self.group = group
        self.rank_rtol = float(rank_rtol)

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return sum_over_ranks(lambda q: self.local.matvec(q, v), p, self.group)

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        return sum_over_ranks(lambda q: self.local.dense(q, max_dim=max_dim), p, self.group)

    def logdet(self, p: Tensor) -> Tensor:
        L = cholesky_or_raise(self.dense(p), "ReducedMetric.logdet")
        return 2 * torch.diagonal(L).log().sum()

    def rank(self, p: Tensor) -> int:
        evals = torch.linalg.eigvalsh(self.dense(p.detach()))
        top = float(evals[-1])
        return 0 if top <= 0 else int((evals > self.rank_rtol * top).sum())

    def __repr__(self) -> str:
        return f"ReducedMetric({self.local!r})"

