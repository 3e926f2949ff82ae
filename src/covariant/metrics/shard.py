r"""The data-parallel hook of the model metrics: a shard of the data and its reduction.

A model binding built by :func:`covariant.distributed.distributed_space` holds only this
rank's batches (with their *global* weights) and a :class:`DataShard`. Every data-dependent
quantity of a metric is a sum over batches, so the metric computes it on the shard (a partial
sum) and hands it to ``shard.reduce`` once: products, dense matrices, rank bounds, Kronecker
factors. A binding without a shard (every single-process space) reduces nothing, and the
numbers are those of the plain code path.

``preceding`` holds the targets of the batches of the lower ranks (meta tensors: shapes and
dtypes only), so that the seeded Monte-Carlo label draws of a shard are the same numbers the
single process draws for the same examples (:func:`shard_noise`).

Example
-------
>>> import torch
>>> from covariant.metrics.losses import LossInfo, mc_noise
>>> info = LossInfo("mse", "mean")
>>> y = torch.zeros(3, 1, dtype=torch.float64)
>>> full = mc_noise(info, [(y, y), (y, y)], samples=2, seed=0)
>>> shard = DataShard(lambda fn, p: fn(p), examples=6,
...                   preceding=((None, torch.empty(3, 1, device="meta")),))
>>> mine = shard_noise(info, [(y, y)], 2, 0, shard)    # the second batch of the full data
>>> bool(torch.equal(mine[0], full[1]))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import Metric
from .losses import LossInfo, mc_noise

__all__ = ["DataShard", "LocalPart", "reduce_local", "shard_noise", "shard_of"]

#: fn, p ↦ Σ over ranks of fn(p) for a replicated point p (differentiable in p).
Reducer = Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]


@dataclass(frozen=True)
class DataShard:
    """This rank's part of the data: how to sum partial results over the ranks.

    Attributes
    ----------
    reduce : callable
        ``reduce(fn, p)``: Σ_r fn_r(p) for a point p that every rank holds (one all-reduce of
        fn's value; differentiable in p by reverse mode).
    examples : int
        Examples on all ranks together (K-FAC normalizes its input factors by it).
    preceding : tuple of (X, y)
        The batches of the lower ranks, in order (meta tensors suffice: only the targets'
        shapes and dtypes are read, to skip their Monte-Carlo draws).
    """

    reduce: Reducer
    examples: int
    preceding: tuple[Any, ...] = ()


def shard_of(binding: Any) -> DataShard | None:
    """The :class:`DataShard` of a model binding, or None for a single-process one."""
    shard = getattr(binding, "shard", None)
    return shard if isinstance(shard, DataShard) else None


def reduce_local(shard: DataShard | None, fn: Callable[[Tensor], Tensor], p: Tensor) -> Tensor:
    """fn(p) summed over the ranks of ``shard`` (fn(p) itself without a shard)."""
    return fn(p) if shard is None else shard.reduce(fn, p)


def shard_noise(info: LossInfo, batches: Sequence[Any], samples: int, seed: int,
                shard: DataShard | None) -> tuple[Tensor, ...]:
    """The Monte-Carlo draws of ``batches`` as the single process draws them for the same
    examples: the stream of ``seed`` first runs through the draws of ``shard.preceding``."""
    before = () if shard is None else tuple(shard.preceding)
    return mc_noise(info, [*before, *batches], samples, seed)[len(before):]


class LocalPart(Metric):
    """One rank's part G_r = Σ_{b on this rank} w_b J_bᵀ Λ_b J_b of a sharded curvature
    metric (``CurvatureMetric.shard_parts``): its products are the rank's ``local_matvec``,
    not reduced over the ranks (for terms linear in G, reduced once afterwards, e.g. the
    connection terms of a data-parallel Riemannian HVP)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.is_constant = False

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self.metric.local_matvec(p, v)

    def __repr__(self) -> str:
        return f"LocalPart({self.metric!r})"
