r"""Baseline generalization measures from the literature.

Each takes the coordinates the model is evaluated in: the weights w, or the point ψ of
``ctx.chart`` (the literature's formulas applied to the parameters as they are stored, which
is what a reparametrization attack exploits). Path norm is a function of the network's
weight matrices w alone.

- **Adaptive sharpness** (Andriushchenko et al. 2023, elementwise adaptive c = |θ|):
  average S_avg = E_z[L(θ + ρ|θ|⊙z) − L(θ)], z ~ N(0, I) (Monte Carlo, ``ctx.num_probes``
  draws, standard error); worst case S_max = max_{|δ_i| ≤ ρ|θ_i|} L(θ + δ) − L(θ) by
  ``ctx.worst_steps`` steps of projected sign-gradient ascent from δ = 0 (a lower bound;
  the best iterate). Both are invariant under positive diagonal symmetries (δ scales with θ).
- **Fisher–Rao norm** (Liang et al. 2019): ‖θ‖_fr = √(θᵀ F(θ) θ) with the exact Fisher F
  (covariant's :class:`~covariant.metrics.Fisher`). For a bias-free ReLU net of k layers,
  ⟨θ, ∇_θ f⟩ = k f, so ‖θ‖²_fr = k² E_x[fᵀ (diag p − ppᵀ) f] (the tests check this).
- **σ′_mag** (Jiang et al. 2020, eqs. 60–61, "pacbayes.mag.flatness"): 1/σ′², where σ′ is the
  largest σ with E_u[err(θ + u)] − err(θ) ≤ ``ctx.sigma_target`` for the training 0-1 error
  err and u_i ~ N(0, σ²θ_i² + ε²), ε = ``ctx.sigma_eps``. Bisection on log σ in
  [1e-4, 10] (20 steps) with common random numbers (``ctx.num_probes`` draws, ``ctx.seed``).
  The ε term makes it only approximately symmetry-invariant.
- **L2 norm** ‖θ‖₂; **distance to initialization** ‖θ − θ₀‖₂ (θ₀ from ``ctx.init``, carried
  into the chart); **path norm** (Neyshabur et al. 2015) √(Σ_paths Π_e w_e²), a forward pass
  of the squared weights and biases on an all-ones input.

Example
-------
>>> import torch
>>> from torch import nn
>>> from covariant.experiments.generalization.measures_common import MeasureContext
>>> net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
...     _ = net[2].weight.copy_(torch.tensor([[3.0, 0.5]]))
>>> path_norm(net, (torch.zeros(1, 1), torch.zeros(1)), MeasureContext())[0]  # √(9 + 1)
3.1622776601683795
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad

from ...metrics import Fisher
from .attacks import linear_layers
from .measures_common import Data, MeasureContext, chart_point, model_space

__all__ = [
    "adaptive_sharpness_avg",
    "adaptive_sharpness_worst",
    "distance_to_init",
    "fisher_rao_norm",
    "l2_norm",
    "path_norm",
    "sigma_mag",
]

Out = tuple[float, float, dict[str, Any]]


def _draws(ctx: MeasureContext, n: int, dim: int) -> Tensor:
    gen = torch.Generator().manual_seed(int(ctx.seed))
    return torch.randn(n, dim, generator=gen, dtype=torch.float64)


def adaptive_sharpness_avg(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """E_z[L(θ + ρ|θ|⊙z) − L(θ)], z ~ N(0, I), ρ = ``ctx.rho_avg``."""
    s, p = chart_point(*model_space(model, data, ctx), ctx)
    loss = s.loss_function
    with torch.no_grad():
        base = float(loss(p))
        vals = torch.tensor([float(loss(p + ctx.rho_avg * p.abs() * z)) - base
                             for z in _draws(ctx, ctx.num_probes, p.numel())])
    stderr = float(vals.std() / math.sqrt(vals.numel())) if vals.numel() > 1 else math.inf
    return float(vals.mean()), stderr, {"rho": ctx.rho_avg, "num_draws": ctx.num_probes,
                                        "seed": ctx.seed}


def adaptive_sharpness_worst(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """max over the box |δ_i| ≤ ρ|θ_i| of L(θ + δ) − L(θ), by projected sign ascent."""
    s, p = chart_point(*model_space(model, data, ctx), ctx)
    loss = s.loss_function
    box = ctx.rho_worst * p.abs()
    step = 2.0 * box / max(ctx.worst_steps, 1)
    delta = torch.zeros_like(p)
    base = float(loss(p))
    best = 0.0
    g = grad(loss)
    for _ in range(ctx.worst_steps):
        delta = torch.clamp(delta + step * torch.sign(g(p + delta)), -box, box)
        best = max(best, float(loss(p + delta)) - base)
    return best, 0.0, {"rho": ctx.rho_worst, "steps": ctx.worst_steps, "lower_bound": True}


def fisher_rao_norm(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """√(θᵀ F(θ) θ), F the exact Fisher of the model (in the chart's coordinates)."""
    s, p = chart_point(*model_space(model, data, ctx), ctx)
    fisher = Fisher.from_space(s)
    return math.sqrt(max(float(fisher.inner(p, p, p)), 0.0)), 0.0, {}


def _train_error(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) != y).to(torch.float64).mean()


def sigma_mag(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """1/σ′² of Jiang et al.'s magnitude-aware perturbation (see the module docstring)."""
    s, p = chart_point(*model_space(model, data, ctx), ctx)
    binding = s.binding
    assert binding is not None
    h = s.root_chart()
    forward = binding.forward_in_chart(None if h is None else h.forward)
    X, y = data[0].to(torch.float64), data[1]
    Z = _draws(ctx, ctx.num_probes, p.numel())

    def deviation(log_sigma: float) -> float:
        std = torch.sqrt(math.exp(2 * log_sigma) * p.pow(2) + ctx.sigma_eps**2)
        errs = [float(_train_error(forward(p + std * z, X), y)) for z in Z]
        return sum(errs) / len(errs) - err0

    with torch.no_grad():
        err0 = float(_train_error(forward(p, X), y))
        lo, hi = math.log(1e-4), math.log(10.0)
        info: dict[str, Any] = {"target": ctx.sigma_target, "eps": ctx.sigma_eps,
                                "num_draws": ctx.num_probes, "seed": ctx.seed}
        if deviation(hi) <= ctx.sigma_target:
            log_s = hi
            info["capped"] = "upper"
        elif deviation(lo) > ctx.sigma_target:
            log_s = lo
            info["capped"] = "lower"
        else:
            for _ in range(20):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if deviation(mid) <= ctx.sigma_target else (lo, mid)
            log_s = lo
    info["sigma"] = math.exp(log_s)
    return math.exp(-2 * log_s), 0.0, info


def l2_norm(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """‖θ‖₂ of the coordinates (w, or ψ in ``ctx.chart``)."""
    _, p = chart_point(*model_space(model, data, ctx), ctx)
    return float(p.norm()), 0.0, {}


def distance_to_init(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """‖θ − θ₀‖₂, θ₀ = ``ctx.init`` (a ``state_dict``), both in the chart's coordinates."""
    if ctx.init is None:
        raise ValueError("distance_to_init needs MeasureContext(init=<the initial state_dict>)")
    space, theta = model_space(model, data, ctx)
    assert space.layout is not None
    theta0 = space.layout.flatten({k: torch.as_tensor(v, dtype=torch.float64)
                                   for k, v in ctx.init.items() if k in space.layout.names})
    _, p = chart_point(space, theta, ctx)
    _, p0 = chart_point(space, theta0, ctx)
    return float((p - p0).norm()), 0.0, {}


def path_norm(model: nn.Module, data: Data, ctx: MeasureContext) -> Out:
    """√(Σ_paths Π w²): squared weights and biases applied to an all-ones input."""
    layers = linear_layers(model)
    with torch.no_grad():
        a = torch.ones(layers[0].in_features, dtype=torch.float64)
        for layer in layers:
            a = layer.weight.detach().to(torch.float64).pow(2) @ a
            if layer.bias is not None:
                a = a + layer.bias.detach().to(torch.float64).pow(2)
    return math.sqrt(float(a.sum())), 0.0, {}
