r"""The Levi-Civita connection of a metric: Christoffel contractions, Riemannian Hessian-vector
products and geodesics, all matrix-free (docs/math.md §3).

With DG[u] the directional derivative of θ ↦ G(θ) along u,

- Γ(u, w) = ½ G⁻¹ [ DG[u] w + DG[w] u − ∇_θ (uᵀ G(θ) w) ];
- Hess·v = ∇²L v − ½ [ DG[v] r + ∇_θ (vᵀ G(θ) r) − DG[r] v ],  r = G⁻¹ ∇L;
- geodesics solve ẍ + Γ(ẋ, ẋ) = 0.

Each bracketed term is one ``jvp`` or ``grad`` through ``metric.matvec``; the d³ tensor of
Christoffel symbols is built only by :func:`christoffel_dense`, the ground truth for tests.

Example
-------
>>> import torch
>>> from covariant.metrics import Pullback, Euclidean
>>> from covariant.reparam import Polar
>>> G = Pullback(Euclidean(), Polar())            # the Euclidean plane in polar coordinates
>>> p = torch.tensor([2.0, 0.3], dtype=torch.float64)
>>> e_phi = torch.tensor([0.0, 1.0], dtype=torch.float64)
>>> christoffel(G, p, e_phi, e_phi)                # Γ^r_φφ = −r, Γ^φ_φφ = 0
tensor([-2.,  0.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jacfwd, jvp

from . import autodiff
from ._fast import is_plain as _plain
from .errors import NonFiniteError, NotConvergedError
from .metrics import Metric

__all__ = [
    "christoffel",
    "christoffel_dense",
    "christoffel_lowered_dense",
    "connection_correction",
    "connection_quadratic",
    "data_parallel_riemannian_hvp",
    "geodesic",
    "riemannian_hvp",
]


def _directional_derivative(metric: Metric, p: Tensor, u: Tensor, x: Tensor) -> Tensor:
    """DG[u] x = d/dt G(p + t u) x at t = 0.

    On plain tensors: the transpose of a vjp (double backward), about twice as fast as
    forward mode on CPU; inside ``torch.func`` transforms: ``jvp``.
    """
    if metric.is_constant:
        return torch.zeros_like(x)
    if _plain(p, u, x):
        with torch.enable_grad():
            q = p.detach().requires_grad_(True)
            out = metric.matvec(q, x)
            if not out.requires_grad:
                return torch.zeros_like(x)
            c = torch.zeros_like(out, requires_grad=True)
            (gq,) = torch.autograd.grad(out, q, grad_outputs=c, create_graph=True)
            (res,) = torch.autograd.grad(gq, c, grad_outputs=u, allow_unused=True)
        return torch.zeros_like(x) if res is None else res.detach()
    return jvp(lambda q: metric.matvec(q, x), (p,), (u,))[1]


def _grad_of_inner(metric: Metric, p: Tensor, u: Tensor, x: Tensor) -> Tensor:
    """∇_p (uᵀ G(p) x) with u and x held fixed."""
    if metric.is_constant:
        return torch.zeros_like(p)
    if _plain(p, u, x):
        with torch.enable_grad():
            q = p.detach().requires_grad_(True)
            val = torch.dot(u, metric.matvec(q, x))
            if not val.requires_grad:
                return torch.zeros_like(p)
            (res,) = torch.autograd.grad(val, q, allow_unused=True)
        return torch.zeros_like(p) if res is None else res.detach()
    return grad(lambda q: torch.dot(u, metric.matvec(q, x)))(p)


def christoffel_lowered(metric: Metric, p: Tensor, u: Tensor, w: Tensor) -> Tensor:
    """G Γ(u, w) = ½ [DG[u] w + DG[w] u − ∇(uᵀ G w)], without the solve."""
    return 0.5 * (
        _directional_derivative(metric, p, u, w)
        + _directional_derivative(metric, p, w, u)
        - _grad_of_inner(metric, p, u, w)
    )


def christoffel(metric: Metric, p: Tensor, u: Tensor, w: Tensor) -> Tensor:
    """Γ(u, w)^m = Γ^m_ij u^i w^j, matrix-free: two jvps, one grad and one solve."""
    if metric.is_constant:
        return torch.zeros_like(p)
    return metric.solve(p, christoffel_lowered(metric, p, u, w))


def connection_correction(metric: Metric, p: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Γ^m_ij v^j ∂_m L = ½ [DG[v] r + ∇(vᵀ G r) − DG[r] v] with r = G⁻¹∇L.

    Subtracting it from the Euclidean HVP gives the Riemannian Hessian-vector product.
    """
    if metric.is_constant:
        return torch.zeros_like(p)
    return 0.5 * (
        _directional_derivative(metric, p, v, r)
        + _grad_of_inner(metric, p, v, r)
        - _directional_derivative(metric, p, r, v)
    )


def connection_quadratic(metric: Metric, p: Tensor, u: Tensor, r: Tensor) -> Tensor:
    """Γ^m_ij u^i u^j (G r)_m = rᵀ G Γ(u, u) = D_u(rᵀ G u) − ½ D_r(uᵀ G u), a scalar.

    With r = G⁻¹∇L this is the connection part of the Riemannian Hessian's quadratic form,
    uᵀ Hess u = uᵀ∇²L u − rᵀ G Γ(u, u). One-off form of ``metric.connection_form(p, r)``
    (which shares the per-point work across many u).
    """
    form = metric.connection_form(p, r)
    value = form.remainder(u)
    if form.potential is not None:
        value = value + jvp(lambda q: jvp(form.potential, (q,), (u,))[1], (p,), (u,))[1]
    return value


def christoffel_lowered_dense(metric: Metric, p: Tensor, *, max_dim: int | None = None) -> Tensor:
    """The Christoffel symbols of the first kind, Γ[l, i, j] = Γ_lij, as a dense (d, d, d)
    tensor: Γ_lij = ½ (∂_i G_jl + ∂_j G_il − ∂_l G_ij).

    Built from ``jacfwd`` of the dense metric, independent of the matrix-free path: the
    ground truth that the Riemannian Hessian's ``method="general"`` and the tests use.
    """
    dG = jacfwd(lambda q: metric.dense(q, max_dim=max_dim))(p)  # dG[j, l, i] = ∂_i G_jl
    return 0.5 * (
        torch.einsum("jli->lij", dG) + torch.einsum("ilj->lij", dG) - torch.einsum("ijl->lij", dG)
    )


def christoffel_dense(metric: Metric, p: Tensor, *, pseudo_inverse: bool = False) -> Tensor:
    """All Christoffel symbols Γ[m, i, j] = Γ^m_ij as a dense (d, d, d) tensor (small d).

    Γ^m_ij = G^{ml} Γ_lij from :func:`christoffel_lowered_dense`. ``pseudo_inverse=True``
    raises the index with the pseudo-inverse (submersion charts).
    """
    G = metric.dense(p)
    lowered = christoffel_lowered_dense(metric, p)
    Ginv = torch.linalg.pinv(G, hermitian=True) if pseudo_inverse else torch.linalg.inv(G)
    return torch.einsum("ml,lij->mij", Ginv, lowered)


def geodesic(
    metric: Metric,
    p: Tensor,
    v: Tensor,
    t: float | Tensor = 1.0,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
    return_velocity: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Geodesic shooting, the exponential map exp_p(t v): solve ẍ = −Γ(ẋ, ẋ), x(0)=p, ẋ(0)=v.

    Uses ``scipy.integrate.solve_ivp`` (an adaptive, well-tested integrator; DOP853 by
    default) on the state (x, ẋ); each right-hand side is one matrix-free Christoffel
    contraction. For a constant metric the geodesic is the straight line p + t v.

    Parameters
    ----------
    t : float or 1-D tensor
        Time, or an increasing sequence of times (then the result has one row per time).
    rtol, atol : float
        Integrator tolerances.
    return_velocity : bool
        Also return ẋ at the final time(s).
    """
    from scipy.integrate import solve_ivp

    times = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    scalar = torch.as_tensor(t).ndim == 0
    if metric.is_constant:
        xs = p[None, :] + times.to(p)[:, None] * v[None, :]
        vs = v[None, :].expand_as(xs)
        xs, vs = (xs[0], vs[0]) if scalar else (xs, vs)
        return (xs, vs) if return_velocity else xs

    d = p.shape[0]
    dtype, device = p.dtype, p.device

    def rhs(_: float, state: np.ndarray) -> np.ndarray:
        s = torch.as_tensor(state, dtype=torch.float64).to(device=device, dtype=dtype)
        x, xdot = s[:d], s[d:]
        acc = -christoffel(metric, x, xdot, xdot)
        out = torch.cat([xdot, acc]).detach().to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(out)):
            raise NonFiniteError("geodesic: the geodesic equation produced NaN or Inf")
        return out

    state0 = torch.cat([p, v]).detach().to("cpu", torch.float64).numpy()
    t_end = float(times.max())
    sol = solve_ivp(
        rhs, (0.0, t_end), state0, method=method, rtol=rtol, atol=atol,
        t_eval=times.numpy() if t_end > 0 else None,
    )
    if not sol.success:
        raise NotConvergedError(f"geodesic: the ODE solver failed: {sol.message}")
    ys = torch.as_tensor(sol.y.T if t_end > 0 else state0[None, :]).to(dtype=dtype, device=device)
    xs, vs = ys[:, :d], ys[:, d:]
    if scalar:
        xs, vs = xs[-1], vs[-1]
    return (xs, vs) if return_velocity else xs


def data_parallel_riemannian_hvp(loss: Any, metric: Metric, p: Tensor
                                 ) -> Callable[[Tensor], Tensor] | None:
    """v ↦ Hess·v of a data-parallel space with **one** all-reduce per product, or None.

    When the loss is a sum over ranks with a partial loss ``loss.local`` (``covariant.
    distributed``) and the metric splits as Σ_r G_r + a constant (``Metric.shard_parts``),
    ∇²L v − Γ(v, ·)·∇L = Σ_r [∇²L_r v − Γ_r(v, ·)·∇L], the connection terms being linear in G
    for the fixed r = G⁻¹∇L (solved once here, with the reduced G): each rank computes its
    part, and the parts are summed once. None otherwise (then each product of G is reduced
    by itself).
    """
    local_loss = getattr(loss, "local", None)
    parts = metric.shard_parts()
    if local_loss is None or parts is None or parts[0] is None:
        return None
    local_metric, shard = parts
    r = metric.solve(p, autodiff.gradient(loss, p))
    local_euclidean = autodiff.hvp_operator(local_loss, p)

    def riemannian_hvp(v: Tensor) -> Tensor:
        part = local_euclidean(v) - connection_correction(local_metric, p, v, r)
        return shard.reduce(lambda _: part, p)

    return riemannian_hvp


def riemannian_hvp(space: Any, p: Tensor, v: Tensor, method: str = "auto") -> Tensor:
    """Hess·v of a ``ParameterSpace`` without input checks (it runs inside ``torch.func``
    transforms; ``space.hvp`` is the checked form).

    A pulled-back space uses the tensor rule Jᵀ Hess_Θ (J v) through its parent, recursively;
    otherwise ∇²L v − Γ(v, ·)∇L with the matrix-free connection term (docs/math.md §3).
    """
    if method not in ("auto", "pullback", "general"):
        raise ValueError(f"hvp: method must be 'auto', 'pullback' or 'general', got {method!r}")
    if space.is_pullback and method in ("auto", "pullback"):
        h, parent = space.chart, space.parent
        assert h is not None and parent is not None
        theta = h.forward(p)
        return h.vjp(p, riemannian_hvp(parent, theta, h.jvp(p, v), "auto"))
    if method == "pullback":
        raise ValueError("hvp: the pullback fast path needs a space made by reparametrize")
    hv = autodiff.hvp(space.loss_function, p, v)
    if space.metric.is_constant:
        return hv
    r = space.metric.solve(p, autodiff.gradient(space.loss_function, p))
    return hv - connection_correction(space.metric, p, v, r)
