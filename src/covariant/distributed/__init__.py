r"""Data-parallel model spaces over ``torch.distributed`` (docs/api.md, docs/scale.md).

Each of P ranks holds a shard S_r of the batches. Every batch keeps its *global* weight w_b
(batch size / total size over all ranks for a ``'mean'`` loss, 1 for ``'sum'``), so rank r's
local loss is a partial sum and the full loss is their all-reduced sum:

.. math::

    L(θ) = \sum_{r=1}^{P} L_r(θ),  L_r(θ) = \sum_{b \in S_r} w_b\, ℓ(f(θ, X_b), y_b).

Every data-dependent quantity is linear in the data, so it is the sum of the ranks' local
ones: ∇L = Σ_r ∇L_r, ∇²L v = Σ_r ∇²L_r v, G v = Σ_r G_r v for G = Σ_b w_b J_bᵀ Λ_b J_b (GGN,
Fisher, empirical Fisher), and the K-FAC factors. :func:`distributed_space` builds a
:class:`~covariant.space.ParameterSpace` whose model binding is the shard's
(:class:`ShardBinding`): each product is computed on the shard and all-reduced, **one
all-reduce of a d-vector per product** (a scalar for the loss), or of k d-vectors for k probes
batched with ``vmap``.

The mechanism (:mod:`covariant.distributed.reduce`) is a pair of autograd functions around a
partial result, F(θ) = R(F_r(C(θ))): R all-reduces forwards and is the identity backwards, C
the reverse; each has forward-mode and ``vmap`` rules, so reverse mode, forward mode (dense
Hessians), ``torch.func`` transforms and the connection terms of a data-dependent metric
(differentiated GGN products) are all exact. Taylor mode traces each rank's partial loss
(:class:`RankSumLoss`) and sums the forms. Estimators (Hutchinson, Lanczos, CG) run
identically on every rank: with the same seed they draw the same probes, and only model
products are reduced. The seeded Monte-Carlo Fisher draws, on each rank, the labels the
single process draws for the same examples. :func:`hvp_matmat` and :func:`metric_matmat`
reduce k products in one all-reduce.

:func:`distributed_posterior_space` is the model posterior of ``covariant.laplace`` over the
shards (Laplace evidence and covariances of all the data), and
``RiemannianGD(..., data_parallel=True)`` (:mod:`covariant.distributed.optim`) keeps the
replicated parameters of a natural-gradient run in step, like DDP.

Example
-------
The shards and their global weights are worked through in :mod:`covariant.distributed.space`;
here, the contiguous split of five batches over two ranks (the first n mod P ranks get one more):

>>> import torch
>>> batches = [(torch.zeros(2, 1), torch.zeros(2, 1))] * 5
>>> [len(shard_batches(batches, r, 2)) for r in range(2)]
[3, 2]
"""

from __future__ import annotations

from .build import distributed_posterior_space, distributed_space
from .products import hvp_matmat, metric_matmat
from .reduce import (
    CopyToRanks,
    ReducedMetric,
    ReduceSum,
    check_process_group,
    reduce_stack,
    sum_over_ranks,
)
from .space import RankSumLoss, ShardBinding, global_weights, shard_batches

__all__ = [
    "CopyToRanks",
    "RankSumLoss",
    "ReduceSum",
    "ReducedMetric",
    "ShardBinding",
    "check_process_group",
    "distributed_posterior_space",
    "distributed_space",
    "global_weights",
    "hvp_matmat",
    "metric_matmat",
    "reduce_stack",
    "shard_batches",
    "sum_over_ranks",
]
