"""Parts (d) and (e): per-layer rescalings W_l = c_l Ω_l.

(d) **NTK vs standard parametrization.** W = (σ/√n) Ω is linear, so GD on Ω *is* GD on W with
per-layer learning rate α σ²/n (equal to float64 precision), and Riemannian GD on Ω with the
pulled-back metric is plain GD on W.
(e) **Adam / RMSprop.** Under W_l = c_l Ω_l their trajectories differ even as α → 0 (at a
fixed horizon), while natural gradient's do not.

Example
-------
>>> cfg = {"num_samples": 240, "hidden": [4], "sigma": 1.0, "lr": 0.1, "steps": 2}
>>> d = part_d(cfg, 0, None, progress=False)  # doctest: +SKIP
>>> d["gd_omega_vs_gd_w_per_layer_lr"]["max_abs"] < 1e-12  # doctest: +SKIP
True
>>> trajectory_gap({"traj": torch.zeros(2, 3)}, {"traj": torch.ones(2, 3)})["max_abs"]
1.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._progress import progress_bar
from ...optim import RiemannianGD
from .networks import dataset, mlp, train, weight_names, with_scales
from .settings import save_png

__all__ = ["part_d", "part_e", "plot_de", "trajectory_gap"]


def trajectory_gap(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Largest absolute difference of two W-trajectories, per step and overall."""
    diff = (a["traj"] - b["traj"]).abs().amax(dim=1)
    scale = float(b["traj"].abs().max())
    return {"max_abs_per_step": diff.tolist(), "max_abs": float(diff.max()),
            "max_rel": float(diff.max()) / scale}


def part_d(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    """GD on Ω (NTK) against GD on W with per-layer and with equal learning rates."""
    X, y, _, _ = dataset(cfg["num_samples"], seed, cache)
    sigma, lr, steps = cfg["sigma"], cfg["lr"], cfg["steps"]
    standard = mlp(cfg["hidden"], seed)
    with torch.no_grad():  # an NTK-style initialization: W = (σ/√n) Ω with Ω ~ N(0, 1)
        for m in standard.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_().mul_(sigma / math.sqrt(m.in_features))
    names = weight_names(standard)
    linears = [m for m in standard.modules() if isinstance(m, nn.Linear)]
    scales = [sigma / math.sqrt(m.in_features) for m in linears]
    fan_in = [m.in_features for m in linears]

    # GD on Ω with lr α (the NTK model: W = s Ω registered with parametrize)
    ntk = with_scales(standard, scales)
    run_ntk = train(ntk, torch.optim.SGD(ntk.parameters(), lr), X, y, steps, names)
    # GD on W with per-layer lr α σ²/n for the weights (biases are not rescaled: lr α)
    std = copy.deepcopy(standard)
    groups = []
    for m, n in zip([m for m in std.modules() if isinstance(m, nn.Linear)], fan_in, strict=True):
        groups.append({"params": [m.weight], "lr": lr * sigma**2 / n})
        groups.append({"params": [m.bias], "lr": lr})
    run_std = train(std, torch.optim.SGD(groups, lr), X, y, steps, names)
    # Riemannian GD on Ω with the pulled-back metric = plain GD on W with lr α
    ntk2 = with_scales(standard, scales)
    run_rgd = train(
        ntk2, RiemannianGD(ntk2.parameters(), lr, "weights", model=ntk2, cg_tol=1e-14),
        X, y, steps, names,
    )
    std2 = copy.deepcopy(standard)
    run_gd = train(std2, torch.optim.SGD(std2.parameters(), lr), X, y, steps, names)

    return {
        "sigma": sigma, "lr": lr, "steps": steps, "fan_in": fan_in,
        "per_layer_lr": [lr * sigma**2 / n for n in fan_in],
        "gd_omega_vs_gd_w_per_layer_lr": trajectory_gap(run_ntk, run_std),
        "riemannian_gd_omega_vs_gd_w": trajectory_gap(run_rgd, run_gd),
        "gd_omega_vs_gd_w_same_lr": trajectory_gap(run_ntk, run_gd),
        "loss_gd_omega": run_ntk["loss"],
        "loss_gd_w_same_lr": run_gd["loss"],
    }


def part_e(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    """Relative gaps at a fixed horizon between training W and rescaled Ω, per optimizer."""
    X, y, _, _ = dataset(cfg["num_samples"], seed, cache)
    base = mlp(cfg["hidden"], seed)
    names = weight_names(base)
    scales = cfg["scales"]
    loss_fn = nn.CrossEntropyLoss()
    makers: dict[str, tuple[Callable[[nn.Module, float], Any], float, list[float]]] = {
        "adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr),
                 cfg["adam_horizon"], cfg["adam_lrs"]),
        "rmsprop": (lambda m, lr: torch.optim.RMSprop(m.parameters(), lr),
                    cfg["adam_horizon"], cfg["adam_lrs"]),
        "sgd": (lambda m, lr: torch.optim.SGD(m.parameters(), lr),
                cfg["sgd_horizon"], cfg["sgd_lrs"]),
        "natural_gradient_ggn": (
            lambda m, lr: RiemannianGD(
                m.parameters(), lr, "ggn", model=m, loss_fn=loss_fn, data=(X, y),
                damping=cfg["damping"], cg_tol=1e-10, cg_maxiter=500,
            ),
            cfg["ngd_horizon"], cfg["ngd_lrs"],
        ),
    }
    out: dict[str, Any] = {"scales": scales, "optimizers": {}}
    for key, (make, horizon, lrs) in progress_bar(makers.items(), enabled=progress,
                                                  desc="(e) optimizers"):
        rows = []
        for lr in lrs:
            steps = round(horizon / lr)
            m_w = copy.deepcopy(base)
            a = train(m_w, make(m_w, lr), X, y, steps, names)["traj"]
            m_o = with_scales(base, scales)
            b = train(m_o, make(m_o, lr), X, y, steps, names)["traj"]
            gap = float(torch.linalg.vector_norm(a[-1] - b[-1]))
            travel = float(torch.linalg.vector_norm(a[-1] - a[0]))
            rows.append({"lr": lr, "steps": steps, "gap": gap, "travel": travel,
                         "relative_gap": gap / travel})
        out["optimizers"][key] = {"horizon": horizon, "rows": rows,
                                  "relative_gaps": [r["relative_gap"] for r in rows]}
    return out


def plot_de(d: dict[str, Any], e: dict[str, Any], out: Path, plt: Any) -> str:
    """(d) W differences per step; (e) relative gaps against the step size."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in [("gd_omega_vs_gd_w_per_layer_lr", "GD Ω vs GD W, lr α σ²/n"),
                       ("riemannian_gd_omega_vs_gd_w", "Riemannian GD Ω vs GD W, lr α"),
                       ("gd_omega_vs_gd_w_same_lr", "GD Ω vs GD W, same lr α")]:
        curve = d[key]["max_abs_per_step"][1:]
        axes[0].semilogy(np.arange(1, len(curve) + 1), np.maximum(curve, 1e-18), label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("max |W difference|")
    axes[0].set_title("NTK vs standard parametrization")
    axes[0].legend(fontsize=8)
    for key, r in e["optimizers"].items():
        lrs = [row["lr"] for row in r["rows"]]
        axes[1].loglog(lrs, np.maximum(r["relative_gaps"], 1e-17), "o-",
                       label=f"{key} (T = {r['horizon']})")
    axes[1].set_xlabel("step size α")
    axes[1].set_ylabel("relative gap at T")
    axes[1].set_title(f"per-layer rescaling W_l = c_l Ω_l, c = {e['scales']}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out / "optimization_ntk_adam.png", plt)
