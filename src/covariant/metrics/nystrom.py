r"""The randomized Nyström preconditioner of a damped metric's solves, G + μI with d large.

Above :data:`~covariant.metrics.base.DENSE_SOLVE_DIM` coordinates a metric solves by
conjugate gradients. For G = A + μI with a positive semi-definite A whose spectrum decays (a
GGN, a Fisher) and a small μ, CG is governed by the condition number (λ_1 + μ)/μ. A rank-ℓ
Nyström approximation Û Λ̂ Ûᵀ of A (:func:`covariant.linalg.nystrom`, ℓ products of A, done
once per point) gives the preconditioner P⁻¹ = (λ̂_ℓ + μ) Û(Λ̂ + μI)⁻¹Ûᵀ + (I − ÛÛᵀ)
(:class:`~covariant.linalg.nystrom.NystromPreconditioner`), after which CG sees about
(λ_{ℓ+1} + μ)/μ (Frangella, Tropp & Udell 2023). ``Damped(G, lam, nystrom_rank=ℓ)`` uses it
for every solve at a point (the solves of r = G⁻¹∇L and of each probe of a trace): the CG
stopping test is unchanged, so the solutions agree with plain CG to its tolerance.

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
>>> data = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
>>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
>>> P = nystrom_preconditioner(space.metric, theta, 12, 1e-3)  # rank G <= 5·2 < 12
>>> G = space.metric.dense(theta)
>>> top = torch.linalg.eigvalsh(G)[-10:].flip(0)
>>> bool(torch.allclose(P.eigenvalues[:10], top, rtol=1e-9))   # exact: ℓ >= rank G
True
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import same_point
from .._fast import is_plain
from ..linalg.nystrom import NystromPreconditioner, nystrom

__all__ = ["NYSTROM_CHUNK", "NystromCache", "data_subsample", "nystrom_preconditioner"]

#: Products per vmapped call when the Nyström block A Ω is formed.
NYSTROM_CHUNK = 16


def nystrom_preconditioner(metric: object, p: Tensor, rank: int, mu: float, *,
                           seed: int = 0) -> NystromPreconditioner:
    """P⁻¹ for ``metric`` + μI at ``p`` from a rank-``rank`` Nyström approximation of
    ``metric`` (its ``matvec``), the block of products vmapped in chunks of
    :data:`NYSTROM_CHUNK` (one product at a time for models that vmap cannot batch)."""
    p = p.detach()

    def one(v: Tensor) -> Tensor:
        return metric.matvec(p, v).detach()  # type: ignore[attr-defined]

    def matmat(V: Tensor) -> Tensor:
        cols = []
        for s in range(0, V.shape[1], NYSTROM_CHUNK):
            block = V[:, s:s + NYSTROM_CHUNK]
            try:
                cols.append(vmap(one)(block.T).T)
            except (RuntimeError, NotImplementedError):  # models that vmap cannot batch
                cols.append(torch.stack([one(v) for v in block.T], 1))
        return torch.cat(cols, 1)

    approx = nystrom(matmat, p.shape[0], min(int(rank), p.shape[0]), seed=seed,
                     dtype=p.dtype, device=p.device)
    return NystromPreconditioner(approx, mu)


def data_subsample(metric: object, count: int, seed: int = 0) -> object:
    """The same kind of curvature metric on about ``count`` samples drawn without replacement
    from its data (each batch in proportion, its weight rescaled for a ``'sum'`` loss), for
    building a preconditioner only; ``metric`` itself when it has no data to draw from (not a
    curvature metric, a data-parallel shard, fewer samples than ``count``)."""
    batches, weights = getattr(metric, "batches", None), getattr(metric, "weights", None)
    info = getattr(metric, "info", None)
    if batches is None or weights is None or info is None \
            or getattr(metric, "shard", None) is not None:
        return metric
    total = sum(len(y) for _, y in batches)
    if count >= total:
        return metric
    gen = torch.Generator().manual_seed(int(seed))
    sub, sub_weights = [], []
    for (X, y), w in zip(batches, weights, strict=True):
        k = max(1, round(count * len(y) / total))
        idx = torch.randperm(len(y), generator=gen)[:k].to(y.device)
        sub.append((X[idx.to(X.device)], y[idx]))
        sub_weights.append(w * (len(y) / k if info.reduction == "sum" else 1.0))
    try:
        return type(metric)(metric.forward, metric.loss_fn, sub,  # type: ignore[call-arg,attr-defined]
                            sub_weights)
    except TypeError:  # a subclass with another constructor: the whole data
        return metric


class NystromCache:
    """The Nyström preconditioner of one damped metric, kept for the last point.

    ``at(metric, p, mu, min_dim)`` returns P⁻¹ for ``metric`` + μI at ``p`` (built on the
    first call at that point), or None where it does not apply: d <= ``min_dim`` (the dense
    Cholesky solve takes over there) or a point inside a transform. With ``samples``, the
    Nyström products are those of the metric on that many samples of its data
    (:func:`data_subsample`): a cheaper build of a rougher preconditioner, the same solves.
    """

    def __init__(self, rank: int, seed: int = 0, samples: int | None = None) -> None:
        if int(rank) < 1:
            raise ValueError(f"Damped: nystrom_rank must be >= 1, got {rank}")
        if samples is not None and int(samples) < 1:
            raise ValueError(f"Damped: nystrom_samples must be >= 1, got {samples}")
        self.rank, self.seed = int(rank), int(seed)
        self.samples = None if samples is None else int(samples)
        self.point: Tensor | None = None
        self.preconditioner: NystromPreconditioner | None = None

    def at(self, metric: object, p: Tensor, mu: float, min_dim: int
           ) -> NystromPreconditioner | None:
        if p.shape[0] <= min_dim or not is_plain(p):
            return None
        if not same_point(self.point, p) or self.preconditioner is None:
            source = metric if self.samples is None else data_subsample(metric, self.samples,
                                                                         self.seed)
            self.preconditioner = nystrom_preconditioner(source, p, self.rank, mu,
                                                         seed=self.seed)
            self.point = p.detach().clone()
        return self.preconditioner
