r"""Data-parallel steps of ``covariant.optim.RiemannianGD``: what crosses the wire per step.

With ``RiemannianGD(..., data_parallel=True)`` every rank holds the same parameters and its
own part of each step's batch. :class:`DataParallelSteps` keeps the replicas in sync the way
DDP does, but with the weights that make the step the single process's on the union of the
batches:

- the gradients are combined as g = Σ_r (n_r / N) g_r for a ``'mean'`` loss (n_r the size of
  rank r's batch, N = Σ_r n_r) and g = Σ_r g_r for a ``'sum'`` loss, g_r being the gradient
  of rank r's loss on its batch (``loss_fn(model(X_r), y_r).backward()``), written into
  ``.grad`` like DDP. Without ``data`` every rank counts as one (DDP's plain mean). One
  all-reduce of d + 1 numbers (the gradients and n_r);
- the model metric of the step (``"ggn"``, ``"fisher"``, ``"empirical_fisher"``) is built on
  the rank's batch with the global weight n_r/N and reduces each product: one all-reduce of
  a d-vector per CG iteration;
- K-FAC (``"kfac"``, ``"ekfac"``): at each refresh the factors are taken on the same kind of
  space, so they are the factors of the union of the ranks' batches (one all-reduce of all
  the factors' entries); the closed-form solve then runs on every rank alike.

The CG iterations then run identically on every rank, and every rank moves its parameters by
the same direction.

Example
-------
>>> import torch
>>> from torch import nn
>>> weights_of(nn.MSELoss(), 3, 10), weights_of(nn.MSELoss(reduction="sum"), 3, 10)
(0.3, 1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..layout import ModelBinding, ParameterLayout
from ..metrics.shard import DataShard
from ..space import ParameterSpace
from .reduce import check_process_group, reduce_stack, sum_over_ranks
from .space import ShardBinding

__all__ = ["DataParallelSteps", "weights_of"]


def _is_mean(loss_fn: Callable[..., Tensor] | None) -> bool:
    return getattr(loss_fn, "reduction", "mean") == "mean"


def weights_of(loss_fn: Callable[..., Tensor] | None, n_local: int, total: int) -> float:
    """The weight of a rank's batch of ``n_local`` examples among ``total``: n/N or 1."""
    return n_local / total if _is_mean(loss_fn) else 1.0


class DataParallelSteps:
    """The reductions of one data-parallel ``RiemannianGD`` (module docstring)."""

    def __init__(self, group: Any = None, metric: str = "ggn",
                 metric_kwargs: dict[str, Any] | None = None) -> None:
        check_process_group("RiemannianGD(data_parallel=True)")
        kw = metric_kwargs or {}
        if kw.get("mc_samples") is not None or kw.get("fisher_type") == "mc":
            raise ValueError(
                f"RiemannianGD(data_parallel=True) does not take metric={metric!r} with "
                f"{metric_kwargs}: Monte-Carlo metrics draw their labels per batch, and the "
                "ranks' draws would not be the single process's; use the exact GGN / Fisher "
                "(no mc_samples)")
        self.group = group
        self.total: int | None = None

    def reduce_gradients(self, params: list[Tensor], loss_fn: Callable[..., Tensor] | None,
                         batch: tuple[Tensor, Tensor] | None) -> None:
        """Replace every ``.grad`` by the combined gradient (one all-reduce of d + 1); the
        weights come from the size of the step's ``batch`` (None: every rank counts one)."""
        n_local = None if batch is None else int(batch[0].shape[0])
        n = 1 if n_local is None else n_local
        scale = float(n) if (_is_mean(loss_fn) or n_local is None) else 1.0
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)) * scale for p in params]
        count = torch.tensor([float(n)], dtype=grads[0].dtype, device=grads[0].device)
        *reduced, total = reduce_stack([*grads, count], self.group)
        self.total = round(float(total))
        norm = float(total) if (_is_mean(loss_fn) or n_local is None) else 1.0
        for p, g in zip(params, reduced, strict=True):
            p.grad = g / norm

    def space(self, module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
              batch: tuple[Tensor, Tensor]) -> ParameterSpace:
        """The model space of this rank's batch with its global weight, products reduced."""
        if self.total is None:
            raise RuntimeError("DataParallelSteps.space: reduce_gradients comes first")
        binding, _ = ModelBinding.from_module(module, loss_fn, batch)
        group = self.group
        shard = DataShard(lambda fn, p: sum_over_ranks(fn, p, group), self.total)
        values = {f.name: getattr(binding, f.name) for f in dataclasses.fields(ModelBinding)}
        values["weights"] = tuple(weights_of(loss_fn, int(X.shape[0]), self.total)
                                  for X, _ in binding.batches)
        shard_binding = ShardBinding(**values, shard=shard, group=group)
        return ParameterSpace(shard_binding.loss, layout=ParameterLayout.from_module(module),
                              binding=shard_binding)
