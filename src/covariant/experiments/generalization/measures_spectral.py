r"""Spectral generalization measures: functions of the spectrum of E = G⁻¹ Hess.

Three groups differ only in the metric G and in how they meet the two attacks of
:mod:`.attacks` (a *reparametrization* is the same point in another chart; a *symmetry* is
another point with the same function):

============== ====================================== ==================== ===============
group          G, in the chart the measure runs in    reparametrization    symmetry
============== ====================================== ==================== ===============
classic        I of that chart (the naive view)        moves                moves
chart_invariant I of the weights w, carried along       invariant            moves
               (pulled back: JᵀJ); in w = classic
ggn, fisher    F(w) + λ·diag(1/w²), F = GGN / Fisher,   invariant            invariant
               carried along
============== ====================================== ==================== ===============

**Why the function-metric group is invariant under both, and why its damping is
diag(1/w²).** A symmetry T of a ReLU net is a positive diagonal linear map with L∘T = L.
Then ∇²L(Tw) = T⁻¹∇²L(w)T⁻¹ and, since F is built from the network's Jacobian,
F(Tw) = T⁻¹F(w)T⁻¹; the spectrum of F⁻¹∇²L is unchanged. F is singular (along the symmetry
orbits, the softmax shift, and beyond N·C directions), so it must be damped, and the damping
must transform the same way: λI does not (it breaks the invariance this group is for), while
D(w) = diag(1/w²), the metric of log|w|, satisfies D(Tw) = T⁻¹D(w)T⁻¹ for every positive
diagonal T (layer-wise α, per-neuron, batch-norm scale) and is pulled back with F into any
chart. It is not invariant under non-diagonal symmetries (none in ReLU MLPs).

**The Hessian.** G is pinned at the trained point (an ``OperatorMetric``), so the Hessian it
is paired with is the covariant Hessian of the flat connection of w, carried along into each
chart (Hess_ψ = Jᵀ ∇²_w L J): the same tensor in every chart, and covariant under linear
symmetries. At a critical point every connection gives the same Hessian.

**Why an informative variant.** At an interpolating minimum ∇²L ≈ GGN, so with a tiny λ
tr(G⁻¹Hess) ≈ rank GGN: it counts, it does not measure. ``ggn_effdim`` is MacKay's effective
number of parameters with the scale-invariant prior precision α·diag(1/w²):

    N_eff = tr(GGN (GGN + α D)⁻¹) = Σ_i γ_i / (γ_i + α),  γ_i = eig(D⁻¹ GGN),

i.e. how many function-space directions the data determine better than a prior of relative
width α^{-1/2} on each weight. It is invariant under reparametrization (all parts carried
along) and under every positive diagonal symmetry, and varies continuously with the data fit.

Measures per group: ``trace`` (tr E), ``max_eig`` (λ_max E), ``logdet`` (classic and
chart-invariant: Σ log|λ_i + ε|, i.e. log|det(E + εI)|; function metrics: the null-dropping
log|det E| of :func:`covariant.flatness`), ``frobenius`` (√tr E², the G-Frobenius norm of the
G-self-adjoint E).

Dense (d ≤ ``ctx.dense_max_dim``), float64, one generalized eigenproblem per group shared by
its measures: in w, ∇²L, GGN and Fisher are built once per model and shared by the groups
(``chart_invariant`` *is* ``classic`` there); in a chart, ``cv.flatness(..., ("spectrum",))``
on the space in that chart (pulled-back metric, horizontal space of a submersion). Stochastic:
``cv.flatness(method="stochastic")`` (Hutchinson trace, Lanczos λ_max, SLQ log-det) and a
Hutchinson estimate of tr E², with ``ctx.seed`` and ``ctx.num_probes``; the chart-invariant and
function-metric groups then run in w (their values do not depend on the chart), and the
function-metric groups give trace and λ_max only (each product is a CG solve; logdet and
frobenius are NaN with ``info["skipped"]``).

Example
-------
>>> import torch
>>> from torch import nn
>>> from covariant.experiments.generalization.measures_common import MeasureContext
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
>>> data = (torch.randn(20, 3), torch.randint(0, 3, (20,)))
>>> out = spectral_group(net, data, MeasureContext(), "classic")
>>> space, w = model_space(net, data, MeasureContext())
>>> H = torch.autograd.functional.hessian(space.loss_function, w)
>>> abs(out["trace"][0] - float(H.trace())) < 1e-10
True
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ...flatness import flatness
from ...flatness.dense import generalized_eigh
from ...flatness.nulls import pseudo_log_determinant
from ...linalg import hutchinson
from ...metrics import GGN, Euclidean, Fisher
from ...space import ParameterSpace
from .measures_common import (
    Data,
    MeasureContext,
    cached,
    chart_point,
    digest,
    model_space,
    pinned_function_metric,
    scale_reference,
    use_dense,
)

__all__ = ["GROUPS", "SPECTRAL", "effective_dimension", "spectral_group"]

#: Spectral groups, and the measures each computes.
GROUPS = ("classic", "chart_invariant", "ggn", "fisher")
SPECTRAL = ("trace", "max_eig", "logdet", "frobenius")

Result = dict[str, tuple[float, float, dict[str, Any]]]


def _group_space(space: ParameterSpace, theta: Tensor, ctx: MeasureContext, group: str,
                 in_chart: bool) -> tuple[ParameterSpace, Tensor]:
    """The space (metric and chart) a group's E is computed in, and its point."""
    if group == "classic":
        new, p = chart_point(space, theta, ctx)
        return new.with_metric(Euclidean()), p
    if group != "chart_invariant":
        space = space.with_metric(pinned_function_metric(space, theta, group, ctx.damping))
    return chart_point(space, theta, ctx) if in_chart else (space, theta)


def _from_spectrum(evals: Tensor, group: str, ctx: MeasureContext,
                   info: dict[str, Any]) -> Result:
    info = {**info, "method": "dense", "rank": int(evals.numel())}
    out: Result = {
        "trace": (float(evals.sum()), 0.0, info),
        "max_eig": (float(evals.max()), 0.0, info),
        "frobenius": (float(evals.pow(2).sum().sqrt()), 0.0, info),
    }
    if group in ("classic", "chart_invariant"):
        shifted = evals + ctx.eps
        out["logdet"] = (float(shifted.abs().log().sum()), 0.0,
                         {**info, "eps": ctx.eps, "num_negative": int((shifted < 0).sum())})
    else:
        pld = pseudo_log_determinant(evals)
        out["logdet"] = (float(pld.log_abs), 0.0, {**info, "num_null": int(pld.num_null)})
    return out


def _frobenius_stochastic(space: ParameterSpace, p: Tensor, ctx: MeasureContext,
                          info: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """√tr E² by Hutchinson on v ↦ E E v, E v = G⁻¹ Hess v (delta-method error bar)."""
    def apply_e(v: Tensor) -> Tensor:
        return space.metric.solve(p, space.hvp(p, v))

    est = hutchinson(lambda v: apply_e(apply_e(v)), p.shape[0], ctx.num_probes,
                     seed=ctx.seed, dtype=p.dtype)
    t = max(float(est.value), 0.0)
    root = math.sqrt(t)
    return root, float(est.stderr) / (2 * root) if root > 0 else math.inf, info


def _stochastic(space: ParameterSpace, theta: Tensor, group: str, ctx: MeasureContext,
                info: dict[str, Any]) -> Result:
    """Stochastic estimates. A function-metric group needs a CG solve per operator product,
    so it computes trace and λ_max only; its logdet and frobenius are NaN with
    ``info["skipped"]`` (use the dense path, d ≤ ``ctx.dense_max_dim``, for those)."""
    g_space, p = _group_space(space, theta, ctx, group, in_chart=group == "classic")
    opts = {"num_probes": ctx.num_probes, "seed": ctx.seed}
    rep = flatness(g_space, p, ("trace", "max_eig"), method="stochastic", **opts)
    info = {**info, "method": "stochastic", **opts}
    out: Result = {
        "trace": (float(rep["trace"].value), float(rep["trace"].stderr or 0.0), info),
        "max_eig": (float(rep["max_eig"].value), 0.0,
                    {**info, "residual": rep["max_eig"].residual}),
    }
    if group not in ("classic", "chart_invariant"):
        skipped = {**info, "skipped": "stochastic function-metric logdet / frobenius: one "
                   "CG solve per product is too costly; use method='dense'"}
        out["frobenius"] = out["logdet"] = (math.nan, math.nan, skipped)
        return out
    out["frobenius"] = _frobenius_stochastic(g_space, p, ctx, info)
    base, eps = g_space.loss_function, ctx.eps
    anchor = p.detach().clone()
    shifted = g_space.with_loss(lambda q: base(q) + 0.5 * eps * (q - anchor).pow(2).sum())
    m = flatness(shifted, p, ("logdet",), method="stochastic", **opts)["logdet"]
    out["logdet"] = (float(m.value), float(m.stderr or 0.0), {**info, "eps": eps})
    return out


def _matrices(space: ParameterSpace, theta: Tensor, data: Data,
              ctx: MeasureContext) -> dict[str, Tensor]:
    """Dense ∇²L, GGN and Fisher in w at the point, built on first use. One slot only (the
    latest model), so a population run never holds more than one model's matrices."""
    key = ("matrices", digest(theta, data))
    slot = ctx.cache.get("_matrices")
    if slot is None or slot[0] != key:
        slot = (key, {})
        ctx.cache["_matrices"] = slot
    return slot[1]


def _dense_in_w(space: ParameterSpace, theta: Tensor, data: Data, ctx: MeasureContext,
                group: str) -> Tensor:
    """Eigenvalues of E in w: eigvalsh(∇²L), or the pencil (∇²L, F + λ diag(1/w²)).

    The same generalized eigenproblem ``cv.flatness`` solves in w (where G is positive
    definite), with ∇²L and F built once per model and shared by the groups."""
    mats = _matrices(space, theta, data, ctx)
    if "hess" not in mats:
        mats["hess"] = space.hessian(theta, riemannian=False)
    H = mats["hess"]
    if group in ("classic", "chart_invariant"):
        return torch.linalg.eigvalsh(H)
    if group not in mats:
        mats[group] = {"ggn": GGN, "fisher": Fisher}[group].from_space(space).dense(theta)
    G = mats[group] + ctx.damping * torch.diag(scale_reference(theta))
    return generalized_eigh(H, 0.5 * (G + G.T))[0]


def spectral_group(model: nn.Module, data: Data, ctx: MeasureContext,
                   group: str) -> dict[str, tuple[float, float, dict[str, Any]]]:
    """All measures of one group: ``{name: (value, stderr, info)}``; ``info["seconds"]`` is
    the group's wall time. Cached in ``ctx.cache`` per model, data, chart and settings.

    Dense in w (``ctx.chart`` None): the Hessian and F are built once per model and shared;
    dense in a chart: ``cv.flatness(..., ("spectrum",))`` on the space in that chart.
    """
    if group not in GROUPS:
        raise ValueError(f"spectral_group: group must be one of {GROUPS}, got {group!r}")
    space, theta = model_space(model, data, ctx)
    if ctx.chart is None and group == "chart_invariant":
        group_key = "classic"  # in w the carried-along metric is the classic one
    else:
        group_key = group

    def compute() -> Result:
        t0 = time.perf_counter()
        info: dict[str, Any] = {"group": group, "dim": int(theta.numel())}
        if group in ("ggn", "fisher"):
            info["damping"] = ctx.damping
        if use_dense(int(theta.numel()), ctx):
            if ctx.chart is None:
                evals = _dense_in_w(space, theta, data, ctx, group)
            else:
                g_space, p = _group_space(space, theta, ctx, group, in_chart=True)
                rep = flatness(g_space, p, ("spectrum",))
                evals = torch.tensor(rep["spectrum"].value, dtype=torch.float64)
            out = _from_spectrum(evals, group, ctx, info)
        else:
            out = _stochastic(space, theta, group, ctx, info)
        seconds = time.perf_counter() - t0
        return {k: (v, s, {**i, "seconds": seconds}) for k, (v, s, i) in out.items()}

    key = ("spectral", group_key, ctx.eps, ctx.damping, ctx.method, ctx.num_probes, ctx.seed)
    out = cached(ctx, key, theta, data, compute)
    return {k: (v, s, {**i, "group": group}) for k, (v, s, i) in out.items()}


def effective_dimension(model: nn.Module, data: Data,
                        ctx: MeasureContext) -> tuple[float, float, dict[str, Any]]:
    r"""N_eff = tr(GGN (GGN + α D)⁻¹), D = diag(1/w²), α = ``ctx.prior_precision``.

    Dense: the generalized eigenvalues of (GGN, GGN + αD), both pulled back into
    ``ctx.chart`` (restricted to the horizontal space of a submersion chart). Stochastic:
    Hutchinson on v ↦ (GGN + αD)⁻¹ GGN v in w.
    """
    space, theta = model_space(model, data, ctx)
    alpha = ctx.prior_precision
    t0 = time.perf_counter()
    ggn = pinned_function_metric(space, theta, "ggn", 0.0)
    damped = pinned_function_metric(space, theta, "ggn", alpha)
    info: dict[str, Any] = {"prior_precision": alpha, "dim": int(theta.numel())}
    if use_dense(int(theta.numel()), ctx) and ctx.chart is None:
        mats = _matrices(space, theta, data, ctx)
        if "ggn" not in mats:
            mats["ggn"] = GGN.from_space(space).dense(theta)
        scale = theta.abs()  # D^{-1/2}: γ = eig(|w| GGN |w|), well conditioned
        M = scale[:, None] * mats["ggn"] * scale[None, :]
        gam = torch.linalg.eigvalsh(0.5 * (M + M.T))
        value, stderr = float((gam / (gam + alpha)).sum()), 0.0
        info.update(method="dense", rank=int(gam.numel()))
    elif use_dense(int(theta.numel()), ctx):
        with_prior, p = chart_point(space.with_metric(damped), theta, ctx)
        A = (ggn if ctx.chart is None or with_prior.chart is None
             else ggn.pullback(with_prior.chart)).dense(p)
        B = with_prior.metric.dense(p)
        degenerate = with_prior.metric.is_degenerate(p)
        basis = with_prior.horizontal_basis(p) if degenerate else None
        gam = generalized_eigh(0.5 * (A + A.T), 0.5 * (B + B.T), basis)[0]
        value, stderr = float(gam.sum()), 0.0
        info.update(method="dense", rank=int(gam.numel()))
    else:
        est = hutchinson(lambda v: damped.solve(theta, ggn.matvec(theta, v)),
                         int(theta.numel()), ctx.num_probes, seed=ctx.seed, dtype=theta.dtype)
        value, stderr = float(est.value), float(est.stderr)
        info.update(method="stochastic", num_probes=ctx.num_probes, seed=ctx.seed)
    info["seconds"] = time.perf_counter() - t0
    return value, stderr, info
