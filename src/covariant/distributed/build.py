r"""The data-parallel spaces: a model's loss space and a model posterior (docs/api.md).

:func:`distributed_space` is ``ParameterSpace.from_module`` over every rank's shard and
:func:`distributed_posterior_space` is ``covariant.laplace.posterior_space`` over them: each
space carries a :class:`~covariant.distributed.space.ShardBinding`, so its loss, gradient,
HVPs, model metrics (GGN, Fisher, empirical Fisher, K-FAC), Riemannian Hessian and Laplace
approximation are those of all the data.

Example
-------
>>> import torch
>>> from torch import nn
>>> from covariant.errors import DistributedError
>>> try:                                   # outside torchrun / init_process_group
...     distributed_space(nn.Linear(2, 1), nn.MSELoss(), (torch.zeros(4, 2), torch.zeros(4, 1)))
... except DistributedError as err:
...     print(str(err).split(". ")[0])
distributed_space: no torch.distributed process group is initialized
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..laplace.posterior import LIKELIHOODS, GaussianNLL, gaussian_prior_nll
from ..metrics import Metric, resolve_metric
from ..reparam.interop import split_parametrizations
from ..space import ParameterSpace
from .space import shard_binding

__all__ = ["distributed_posterior_space", "distributed_space"]


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
    :class:`~covariant.errors.DistributedError` on every rank. The space's binding is the
    shard's (:class:`ShardBinding`): a metric by name ("ggn", "fisher", "empirical_fisher",
    "kfac", "ekfac"), here or later by ``space.with_metric``, is built on the shard and
    reduces its sums over the ranks; a Metric instance is used as given and must be the same
    on every rank (wrap a shard's own metric in :class:`ReducedMetric`).

    A model using ``torch.nn.utils.parametrize`` is analysed as ``ParameterSpace.from_module``
    does by default (``metric_chart="weights"``): the plain model's data-parallel space,
    reparametrized by the model's own charts, with θ its ``original`` tensors.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        # as ParameterSpace.from_module: the plain model's (w) space, with the metric given
        # in w, reparametrized by the model's own charts (its ``original`` tensors)
        plain, charts, originals = split_parametrizations(model)
        w_space, _ = distributed_space(plain, loss_fn, local_data, metric, group=group,
                                       seed=seed, **metric_kwargs)
        native = w_space.reparametrize(charts)
        assert native.layout is not None
        return native, native.layout.flatten(originals)
    settings = {"loss_fn": repr(loss_fn), "metric": repr(metric), "seed": seed,
                "metric_kwargs": repr(sorted(metric_kwargs.items()))}
    binding, theta, layout = shard_binding(model, loss_fn, local_data, settings, group=group)
    space = ParameterSpace(binding.rank_sum_loss(), layout=layout, binding=binding)
    space.metric = resolve_metric(metric, space, **metric_kwargs)
    return space, theta


def distributed_posterior_space(
    model: nn.Module,
    local_data: Any,
    *,
    likelihood: str = "classification",
    prior_precision: float | Tensor = 1.0,
    sigma_noise: float = 1.0,
    metric: Metric | None = None,
    max_dense_dim: int | None = None,
    group: Any = None,
    seed: int | None = None,
) -> tuple[ParameterSpace, Tensor]:
    r"""``covariant.laplace.posterior_space`` over the data of all ranks: the log joint

    .. math:: \log p(D, θ) = \sum_r \log p(D_r | θ) + \log N(θ; 0, λ^{-1} I),

    with this rank's ``local_data`` (one ``(X, y)`` batch or several) as D_r. The likelihood
    is reduced over the ranks, the prior is not (every rank holds θ). ``laplace(space, θ,
    ...)`` then gives the evidence and covariance of all the data ("full", "diag",
    "lowrank", "kron"). Collective, with the checks of :func:`distributed_space`.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            "distributed_posterior_space: likelihood must be 'classification' or "
            f"'regression', got {likelihood!r}"
        )
    nll_fn: nn.Module = (nn.CrossEntropyLoss(reduction="sum") if likelihood == "classification"
                         else GaussianNLL(sigma_noise))
    settings = {"likelihood": likelihood, "sigma_noise": float(sigma_noise), "seed": seed,
                "prior_precision": repr(prior_precision), "metric": repr(metric)}
    binding, theta, layout = shard_binding(
        model, nll_fn, local_data, settings, group=group, owner="distributed_posterior_space",
        likelihood=likelihood, sigma_noise=float(sigma_noise), prior_precision=prior_precision,
    )
    nll, lam0 = binding.loss, prior_precision

    def loss(p: Tensor) -> Tensor:
        return nll(p) + gaussian_prior_nll(p, lam0)

    space = ParameterSpace(loss, metric, layout=layout, is_density=True,
                           max_dense_dim=max_dense_dim, binding=binding)
    return space, theta
