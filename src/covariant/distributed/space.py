r"""Data-parallel model spaces: shards, global weights and the shard's model binding.

Each of P ranks holds a shard S_r of the batches (:func:`shard_batches`). Every batch keeps
its *global* weight w_b (:func:`global_weights`), so rank r's loss is a partial sum and the
full loss is their all-reduced sum, L = Σ_r L_r. :class:`ShardBinding` is the model binding
of such a shard: the shard's batches with their global weights and a
:class:`~covariant.metrics.shard.DataShard` that says how to sum over the ranks. Its ``loss``
is already the full loss (``sum_over_ranks``), and every model metric built from it (GGN,
Fisher, empirical Fisher, K-FAC) computes its partial sums on the shard and reduces them once.
Model-aware code (``with_metric("ggn")``, Laplace, K-FAC) therefore accepts the space and gets
the numbers of all the data.

Example
-------
>>> import torch
>>> from torch import nn
>>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
>>> batches = [(X[:4], y[:4]), (X[4:7], y[4:7]), (X[7:], y[7:])]
>>> shards = [shard_batches(batches, r, 2) for r in range(2)]
>>> [[len(Xb) for Xb, _ in s] for s in shards]       # uneven: rank 0 holds 7, rank 1 holds 3
[[4, 3], [3]]
>>> weights = [global_weights(nn.MSELoss(), s, total=10) for s in shards]
>>> weights
[(0.4, 0.3), (0.3,)]
>>> model, mse = nn.Linear(3, 1).double(), nn.MSELoss()
>>> partial = [sum(w * mse(model(Xb), yb) for w, (Xb, yb) in zip(ws, s))
...            for ws, s in zip(weights, shards)]
>>> bool(torch.isclose(partial[0] + partial[1], mse(model(X), y), rtol=1e-14))
True
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import autodiff
from ..errors import DistributedError
from ..layout import Batch, ModelBinding, ParameterLayout, as_batches
from ..metrics.shard import DataShard
from .reduce import ReduceSum, check_process_group, sum_over_ranks

__all__ = [
    "RankSumLoss",
    "ShardBinding",
    "agree",
    "global_weights",
    "shard_batches",
    "shard_binding",
]


def shard_batches(batches: Any, rank: int, world_size: int) -> tuple[Batch, ...]:
    """Rank ``rank``'s contiguous block of ``batches`` (deterministic, possibly uneven).

    n batches split into ``world_size`` blocks as ``numpy.array_split`` does: the first
    n mod P ranks get one batch more. Every rank needs at least one batch.
    """
    batches = as_batches(batches, "shard_batches")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_batches: rank {rank} is not in [0, {world_size})")
    if len(batches) < world_size:
        raise ValueError(
            f"shard_batches: {len(batches)} batches cannot give each of {world_size} ranks "
            "one; split the data into smaller batches"
        )
    q, extra = divmod(len(batches), world_size)
    start = rank * q + min(rank, extra)
    return batches[start:start + q + (rank < extra)]


def global_weights(
    loss_fn: Callable[[Tensor, Tensor], Tensor], local_batches: Sequence[Batch], *,
    total: int | None = None, group: Any = None,
) -> tuple[float, ...]:
    """w_b of each local batch in the loss of the data on all ranks.

    n_b / N for a ``'mean'`` loss, with N the number of examples on all ranks: ``total`` when
    given, else one all-reduce of the local count; 1 for a ``'sum'`` loss.
    """
    if getattr(loss_fn, "reduction", "mean") != "mean":
        return tuple(1.0 for _ in local_batches)
    if total is None:
        check_process_group("global_weights")
        count = torch.tensor([sum(int(X.shape[0]) for X, _ in local_batches)],
                             dtype=torch.float64)
        dist.all_reduce(count, group=group)
        total = int(count.item())
    return tuple(int(X.shape[0]) / total for X, _ in local_batches)


@dataclass(frozen=True)
class ShardBinding(ModelBinding):
    """The model binding of one rank's shard: its batches with global weights, and ``shard``.

    ``loss`` is the loss of all the data, Σ_r L_r (one all-reduce of a scalar; differentiable
    in every mode, one all-reduce of a d-vector per gradient or HVP). ``local_loss`` is this
    rank's partial sum. Model metrics read ``shard`` (:func:`covariant.metrics.shard.shard_of`).
    """

    shard: DataShard | None = None
    group: Any = None

    def local_loss(self, p: Tensor) -> Tensor:
        """L_r(θ) = Σ_{b in this shard} w_b ℓ_b: this rank's partial sum."""
        return ModelBinding.loss(self, p)

    def loss(self, p: Tensor) -> Tensor:
        """L(θ) = Σ_r L_r(θ), the loss of the data on all ranks."""
        return sum_over_ranks(self.local_loss, p, self.group)

    def rank_sum_loss(self) -> RankSumLoss:
        """``loss`` as a :class:`RankSumLoss` (Taylor mode traces the local part)."""
        return RankSumLoss(self.local_loss, self.group)


#: Blocks of a data-parallel batch of HVPs (``RankSumLoss.hvp_matmat``): each is all-reduced
#: while the next is computed.
OVERLAP_BLOCKS = 4


class RankSumLoss:
    """p ↦ Σ_r L_r(p), the loss of a data-parallel space (``sum_over_ranks``).

    ``taylor_parts()`` gives Taylor mode (``covariant._fast.QuadraticForm``) the rank's partial
    loss to trace and the sum of its forms over the ranks (one all-reduce of a scalar each).
    """

    def __init__(self, local: Callable[[Tensor], Tensor], group: Any = None) -> None:
        self.local = local
        self.group = group

    def __call__(self, p: Tensor) -> Tensor:
        return sum_over_ranks(self.local, p, self.group)

    def hvp_matmat(self, p: Tensor, blocks: int = OVERLAP_BLOCKS) -> Callable[[Tensor], Tensor]:
        """V (k, d) ↦ rows ∇²L(p) v_i: the rank's HVPs of its partial loss on one local
        gradient graph (built once, unreduced), all-reduced in at most ``blocks`` blocks of
        rows instead of one all-reduce per product: the same bytes, but the ranks meet at
        most ``blocks`` times, not k times. Each block's all-reduce runs asynchronously while
        the rank computes the next block (communication overlapped with compute)."""
        local = autodiff.hvp_operator(self.local, p)
        group = self.group

        def matmat(V: Tensor) -> Tensor:
            if V.ndim != 2:
                raise ValueError(f"hvp_matmat: V must be (k, d), one probe per row; "
                                 f"got {tuple(V.shape)}")
            rows = -(-V.shape[0] // max(1, int(blocks)))  # ceil(k / blocks)
            parts, pending = [], []
            for start in range(0, V.shape[0], rows):
                block = torch.stack([local(v) for v in V[start:start + rows]])
                pending.append(dist.all_reduce(block, group=group, async_op=True))
                parts.append(block)
            for work in pending:
                work.wait()
            return torch.cat(parts) if parts else V.new_zeros(V.shape)

        return matmat

    def taylor_parts(self) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        group = self.group

        def reduce(x: Tensor) -> Tensor:
            return ReduceSum.apply(x.detach(), group)

        return self.local, reduce


def _settings_digest(theta: Tensor, layout: ParameterLayout, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(theta.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr((layout.names, [tuple(s) for s in layout.shapes], str(theta.dtype))).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def agree(digest: str, local: Any, error: BaseException | None, group: Any,
          owner: str = "distributed_space") -> list[Any]:
    """One all-gather of (digest, ``local``, error) from every rank; the same typed error on
    every rank when any rank failed or the digests differ. Returns every rank's ``local``."""
    mine = (digest, local, None if error is None else f"{type(error).__name__}: {error}")
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    failed = [(r, g[2]) for r, g in enumerate(gathered) if g[2] is not None]
    if error is not None:
        raise error
    if failed:
        raise DistributedError(f"{owner}: rank {failed[0][0]} failed: {failed[0][1]}")
    digests = [g[0] for g in gathered]
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in dict.fromkeys(digests)}
        raise DistributedError(
            f"{owner}: the ranks disagree about the model, its parameters or the "
            f"settings (ranks grouped by their hash: {list(groups.values())}). Every rank must "
            "build the same model with the same parameters, loss, metric and seed."
        )
    return [g[1] for g in gathered]


def _targets(batches: Sequence[Batch]) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(y.shape), str(y.dtype).removeprefix("torch.")) for _, y in batches]


def _meta_batches(targets: list[tuple[tuple[int, ...], str]]) -> tuple[Any, ...]:
    """Stand-ins (None, y) with meta tensors: the shapes and dtypes of other ranks' targets."""
    return tuple((None, torch.empty(shape, dtype=getattr(torch, dtype), device="meta"))
                 for shape, dtype in targets)


def shard_binding(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], local_data: Any,
    settings: dict[str, Any], *, group: Any = None, owner: str = "distributed_space",
    **fields: Any,
) -> tuple[ShardBinding, Tensor, ParameterLayout]:
    """The :class:`ShardBinding` of this rank's data, θ and the layout (collective).

    One all-gather compares a hash of θ, the layout, the dtype and ``settings`` across the
    ranks and collects the example counts and target shapes (global weights; the targets of
    the lower ranks for the Monte-Carlo draws). ``fields``: likelihood, prior, ...
    """
    check_process_group(owner)
    layout = ParameterLayout.from_module(model)
    params = dict(model.named_parameters())
    theta = layout.flatten({n: params[n].detach() for n in layout.names})
    settings = {**settings, "world_size": dist.get_world_size(group)}
    error: BaseException | None = None
    try:
        local = as_batches(local_data, owner)
        binding, _ = ModelBinding.from_module(model, loss_fn, local, **fields)
    except Exception as err:  # reported to every rank by agree, so that none hangs
        error, local = err, ()
    count = sum(int(X.shape[0]) for X, _ in local)
    everyone = agree(_settings_digest(theta, layout, settings), (count, _targets(local)),
                     error, group, owner)
    total = sum(int(c) for c, _ in everyone)
    me = dist.get_rank(group)
    preceding = _meta_batches([t for c, ts in everyone[:me] for t in ts])
    shard = DataShard(lambda fn, p: sum_over_ranks(fn, p, group), total, preceding)
    values = {f.name: getattr(binding, f.name) for f in dataclasses.fields(ModelBinding)}
    values["weights"] = global_weights(loss_fn, local, total=total)
    return ShardBinding(**values, shard=shard, group=group), theta, layout
