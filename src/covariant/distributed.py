r"""Data-parallel model spaces over ``torch.distributed`` (first slice; docs/api.md).

Each of P ranks holds a shard S_r of the batches. Every batch keeps its *global* weight w_b
(batch size / total size over all ranks for a ``'mean'`` loss, 1 for ``'sum'``), so rank r's
local loss is a partial sum and the full loss is their all-reduced sum:

.. math::

    L(θ) = \sum_{r=1}^{P} L_r(θ),  L_r(θ) = \sum_{b \in S_r} w_b\, ℓ(f(θ, X_b), y_b).

Every data-dependent product is linear in the data, so it is the sum of the ranks' local
products: ∇L = Σ_r ∇L_r, ∇²L v = Σ_r ∇²L_r v, G v = Σ_r G_r v for G = Σ_b w_b J_bᵀ Λ_b J_b
(GGN, Fisher, empirical Fisher). :func:`distributed_space` builds a
:class:`~covariant.space.ParameterSpace` that computes each product on the local shard and
all-reduces the result: **one all-reduce of a d-vector per product** (a scalar for the loss;
nothing else crosses the wire).

The mechanism is a pair of autograd functions around the local loss, L(θ) =
R(L_r(C(θ))): R all-reduces in the forward pass and is the identity backwards; C is the
identity forwards and all-reduces the cotangent backwards. Each is the other's backward, so
every order of reverse-mode differentiation is exact: ``grad`` gives Σ_r ∇L_r (one
all-reduce), and an HVP on a shared gradient graph (``hvp_operator``) runs one all-reduce
per product. Curvature metrics named at construction are wrapped in :class:`ReducedMetric`
(matvec = all-reduced local matvec). Estimators (Hutchinson, Lanczos, CG) run identically
on every rank: with the same seed they draw the same probes, and only model products are
reduced.

Not reduced yet (they raise :class:`~covariant.errors.DistributedError`): ``torch.func``
transforms of the loss (vmap, forward mode, hence Taylor quadratic forms, which ``flatness``
then replaces by HVPs) and the connection terms of a data-dependent metric (the Riemannian
Hessian with a GGN/Fisher metric). The space carries no model binding, so model-aware code
(Laplace, ``with_metric("ggn")`` later) refuses it instead of silently using one shard.

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

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._fast import is_transformed
from .errors import DistributedError
from .layout import Batch, ModelBinding, ParameterLayout, as_batches
from .metrics import Metric, resolve_metric
from .space import ParameterSpace

__all__ = [
    "ReducedMetric",
    "check_process_group",
    "distributed_space",
    "global_weights",
    "shard_batches",
]

_LAUNCH_HINT = (
    "Launch with `torchrun --nproc-per-node N script.py` (which sets the environment) and "
    "call torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (CUDA) first."
)


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


def check_process_group(owner: str = "distributed_space") -> None:
    """Raise :class:`~covariant.errors.DistributedError` unless a process group is running."""
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            f"{owner}: no torch.distributed process group is initialized. " + _LAUNCH_HINT
        )


class _ReduceSum(torch.autograd.Function):
    """Forward: all-reduce (sum) a rank's partial value. Backward: identity (via _Copy)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return _Copy.apply(g, ctx.group), None


class _Copy(torch.autograd.Function):
    """Forward: identity (a replicated value enters a rank). Backward: all-reduce (_ReduceSum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.detach().clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return _ReduceSum.apply(g, ctx.group), None


def _reduced(x: Tensor, group: Any, what: str) -> Tensor:
    """The all-reduced sum of a plain local product (one all-reduce)."""
    if is_transformed(x) or x.requires_grad:
        raise DistributedError(
            f"{what}: a data-parallel product cannot run inside torch.func transforms or be "
            "differentiated (connection terms of a data-dependent metric are not reduced yet)"
        )
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


class ReducedMetric(Metric):
    """G = Σ_r G_r: a data-dependent metric whose rank-local products are all-reduced.

    ``local`` is the metric of this rank's shard with global batch weights (a GGN, Fisher or
    empirical Fisher of :func:`distributed_space`). ``matvec`` costs one all-reduce of a
    d-vector, ``dense`` one of d×d; ``solve`` is the base class's (Cholesky of the reduced
    dense G for small d, else conjugate gradients on reduced products).
    """

    is_constant = False

    def __init__(self, local: Metric, group: Any = None) -> None:
        self.local = local
        self.group = group

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return _reduced(self.local.matvec(p, v), self.group, "ReducedMetric.matvec")

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        return _reduced(self.local.dense(p, max_dim=max_dim), self.group, "ReducedMetric.dense")

    def connection_form(self, p: Tensor, r: Tensor) -> Any:
        raise DistributedError(
            "ReducedMetric: the connection terms of a data-parallel metric are not reduced "
            "yet; use riemannian=False or the Euclidean metric"
        )

    def __repr__(self) -> str:
        return f"ReducedMetric({self.local!r})"


def _distributed_loss(local_loss: Callable[[Tensor], Tensor], group: Any
                      ) -> Callable[[Tensor], Tensor]:
    def loss(p: Tensor) -> Tensor:
        if is_transformed(p):
            raise DistributedError(
                "distributed space: the loss cannot run inside torch.func transforms (vmap, "
                "jacrev, forward mode: dense Hessians, flatness(method='dense')); its products "
                "run by reverse mode on plain tensors: use flatness(..., method='stochastic')"
            )
        return _ReduceSum.apply(local_loss(_Copy.apply(p, group)), group)

    return loss


def _settings_digest(theta: Tensor, layout: ParameterLayout, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(theta.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr((layout.names, [tuple(s) for s in layout.shapes], str(theta.dtype))).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def _agree(digest: str, count: int, error: BaseException | None, group: Any) -> int:
    """One all-gather of (digest, example count, error) from every rank; the same typed
    error on every rank when any rank failed or disagrees. Returns the total count."""
    mine = (digest, count, None if error is None else f"{type(error).__name__}: {error}")
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    failed = [(r, g[2]) for r, g in enumerate(gathered) if g[2] is not None]
    if error is not None:
        raise error
    if failed:
        raise DistributedError(f"distributed_space: rank {failed[0][0]} failed: {failed[0][1]}")
    digests = [g[0] for g in gathered]
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in dict.fromkeys(digests)}
        raise DistributedError(
            "distributed_space: the ranks disagree about the model, its parameters or the "
            f"settings (ranks grouped by their hash: {list(groups.values())}). Every rank must "
            "build the same model with the same parameters, loss, metric and seed."
        )
    return sum(int(g[1]) for g in gathered)


def distributed_space(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    local_data: Any,
    metric: Metric | str = "euclidean",
    *,
    group: Any = None,
    seed: int | None = None,
    **metric_kwargs: Any,
) -> tuple[ParameterSpace, Tensor]:
    """The data-parallel space of ``model`` over every rank's ``local_data``, and θ.

    Call it on every rank of an initialized process group, each with its own shard (an
    ``(X, y)`` pair or batches; :func:`shard_batches`). The weights are global (one
    all-gather at construction also counts the examples), and a hash of the parameters,
    layout, dtype, loss, metric and ``seed`` is compared across ranks: a mismatch raises
    :class:`~covariant.errors.DistributedError` on every rank. A metric given by name
    ("ggn", "fisher", "empirical_fisher") is built on the shard and reduced
    (:class:`ReducedMetric`); a Metric instance is used as given and must be the same on
    every rank. Products: see the module docstring.
    """
    check_process_group()
    layout = ParameterLayout.from_module(model)
    params = dict(model.named_parameters())
    theta = layout.flatten({n: params[n].detach() for n in layout.names})
    settings = {"loss_fn": repr(loss_fn), "metric": repr(metric), "seed": seed,
                "metric_kwargs": repr(sorted(metric_kwargs.items())),
                "world_size": dist.get_world_size(group)}
    error: BaseException | None = None
    try:
        local = as_batches(local_data, "distributed_space")
        binding, _ = ModelBinding.from_module(model, loss_fn, local)
    except Exception as err:  # reported to every rank by _agree, so that none hangs
        error, local = err, ()
    count = sum(int(X.shape[0]) for X, _ in local)
    total = _agree(_settings_digest(theta, layout, settings), count, error, group)
    binding = binding.replace(weights=global_weights(loss_fn, local, total=total))
    if isinstance(metric, str) and metric != "euclidean":
        shard_space = ParameterSpace(binding.loss, layout=layout, binding=binding)
        metric = ReducedMetric(resolve_metric(metric, shard_space, **metric_kwargs), group)
    space = ParameterSpace(_distributed_loss(binding.loss, group), layout=layout)
    space.metric = resolve_metric(metric, space, **metric_kwargs)
    return space, theta
