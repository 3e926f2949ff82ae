r"""The invariant trace tr(G⁻¹Hess) from quadratic forms, with a dense metric factor.

With G = L Lᵀ (the Cholesky factor that ``Metric.solve`` keeps for d <= DENSE_SOLVE_DIM),
tr(G⁻¹Hess) = tr(L⁻¹ Hess L⁻ᵀ). Hutchinson's estimator of that symmetric matrix turns each
probe z into a quadratic form uᵀ Hess u with u = L⁻ᵀz, and the Riemannian Hessian's
quadratic form is (docs/math.md §3)

    uᵀ Hess u = uᵀ∇²L u − rᵀ G Γ(u, u),    r = G⁻¹∇L,

computed without any solve or Hessian-vector product per probe: ``metric.connection_form``
splits rᵀGΓ(u, u) into uᵀ∇²ψ u + remainder(u), the first folded into the loss's quadratic form
(one Taylor-mode pass of L − ψ, as cheap as the Euclidean trace's), the second a jvp. The
probes z are the same as every other Hutchinson estimate with that seed; the estimator is
Hutchinson's on the symmetric L⁻¹HessL⁻ᵀ (similar to G⁻¹Hess, same trace), whose Gaussian-
probe variance 2‖L⁻¹HessL⁻ᵀ‖_F² = 2Σλ² is the smallest of any matrix similar to E.

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> data = (torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,)))
>>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
>>> space = space.with_metric(cv.metrics.Damped(space.metric, 1e-2))
>>> est = factored_trace(space, theta, num_probes=3, seed=0)
>>> G = space.metric.dense(theta)
>>> L = torch.linalg.cholesky(G)
>>> H = space.hessian(theta, method="general")
>>> from covariant.linalg.probes import probe_block
>>> Z = probe_block(0, theta.shape[0], 3)
>>> U = torch.linalg.solve_triangular(L.T, Z, upper=True)
>>> truth = float(((H @ U) * U).sum(0).mean())
>>> abs(est.value - truth) < 1e-10 * abs(truth)
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import linalg
from .._fast import QuadraticForm, TaylorUnsupportedError
from .._fast import is_plain as _plain
from ..autodiff import hvp_operator
from ..linalg.probes import probe_block
from ..linalg.results import TraceEstimate
from ..metrics.forms import ConnectionForm
from ..space import ParameterSpace

__all__ = ["factored_trace"]


def factored_trace(space: ParameterSpace, p: Tensor, *, num_probes: int, seed: int = 0,
                   quadratic_forms: str = "auto", progress: bool = False
                   ) -> TraceEstimate | None:
    """Hutchinson's estimate of tr(G⁻¹Hess) = tr(WᵀHess W) (module docstring), or None when
    it does not apply: a Euclidean or constant metric, a point inside a transform, or a metric
    whose solve keeps neither a Cholesky factor (``Metric.cholesky_factor``) nor a Woodbury
    factor (``Metric.sample_space_factor``)."""
    metric = space.metric
    if metric.is_constant or not _plain(p) or (space.chart is not None
                                                    and space.is_pullback):
        return None
    p = p.detach()
    L = metric.cholesky_factor(p)
    woodbury = metric.sample_space_factor(p) if L is None else None
    if L is None and woodbury is None:
        return None
    grad = space.grad(p)
    if L is not None:
        r = torch.cholesky_solve(grad.reshape(-1, 1).to(L), L).reshape(-1).to(p.dtype)
    else:
        r = woodbury.solve(grad)
    form = metric.connection_form(p, r)
    quad = _quadratic(_folded(space, form), p, quadratic_forms)

    def factor(Zs: Tensor) -> Tensor:  # W Zs with W Wᵀ = G⁻¹
        if L is not None:
            return torch.linalg.solve_triangular(L.T, Zs.to(L), upper=True).to(p.dtype)
        return woodbury.inverse_factor(Zs)

    # all probes' u = Wz and remainders at once (the same stream hutchinson draws)
    dim = p.shape[0] if L is not None else p.shape[0] + woodbury.size
    Z = probe_block(seed, dim, num_probes, dtype=p.dtype, device=p.device)
    U = factor(Z)
    rem = form.remainders(U)
    count = iter(range(num_probes))

    def sample(z: Tensor) -> Tensor:
        i = next(count)
        if torch.equal(z, Z[:, i]):
            return quad(U[:, i]) - rem[i]
        u = factor(z.reshape(-1, 1)).reshape(-1)  # not reached
        return quad(u) - form.remainder(u)

    return linalg.hutchinson(lambda v: v, dim, num_probes=num_probes, seed=seed,
                             dtype=p.dtype, device=p.device, progress=progress,
                             quadratic_form=sample)


def _folded(space: ParameterSpace, form: ConnectionForm) -> Callable[[Tensor], Tensor]:
    """L − ψ: the form's fused version (one model pass per batch for both) where the space's
    loss is the metric's data loss (a model space's own loss, the same batches and weights),
    else the difference of the two functions."""
    loss, pot = space.loss_function, form.potential
    if pot is None:
        return loss
    binding = space.binding
    if form.loss_minus_potential is not None and binding is not None \
            and loss == binding.loss and _same_data(form.loss_data, binding):
        return form.loss_minus_potential

    def folded(q: Tensor) -> Tensor:
        return loss(q) - pot(q)

    return folded


def _same_data(data: Any, binding: Any) -> bool:
    """True when ``data`` = (loss_fn, batches, weights) is the binding's, tensor for tensor."""
    loss_fn, batches, weights = data
    return loss_fn is binding.loss_fn and len(batches) == len(binding.batches) \
        and all(X is Xb and y is yb for (X, y), (Xb, yb) in zip(batches, binding.batches,
                                                                 strict=True)) \
        and [float(w) for w in weights] == [float(w) for w in binding.weights]


def _quadratic(fn: Callable[[Tensor], Tensor], p: Tensor, mode: str
               ) -> Callable[[Tensor], Tensor]:
    """u ↦ uᵀ∇²fn(p)u by Taylor mode (``mode`` 'auto' or 'taylor'), or by a Hessian-vector
    product ('hvp', or 'auto' when the function cannot be traced)."""
    if mode != "hvp":
        try:
            return QuadraticForm(fn, p)
        except TaylorUnsupportedError:
            if mode == "taylor":
                raise
        except Exception as err:  # tracing failed: HVPs work
            if mode == "taylor":
                raise TaylorUnsupportedError(f"flatness: the loss could not be traced: {err}") \
                    from err
    op = hvp_operator(fn, p)
    return lambda u: torch.dot(u, op(u))
