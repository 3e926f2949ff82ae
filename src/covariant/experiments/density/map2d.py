"""Part (b): a 2-D density under two nonlinear charts (a cubic shear and polar coordinates).
The classic MAP in each chart, mapped back to θ, moves; the Riemannian MAP stays on the θ-mode.

Example
-------
>>> theta = torch.tensor([1.4, 0.6], dtype=torch.float64)
>>> float(log_p_2d(theta)) > float(log_p_2d(theta + 1.0))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import density as cvd
from ...reparam import Polar
from ...space import ParameterSpace
from .common import DT, pyplot, save_png, shear_chart, t

__all__ = ["log_p_2d", "part_map2d", "plot_map2d"]


def log_p_2d(theta: Tensor) -> Tensor:
    """A skewed 2-D density: a two-component Gaussian mixture (unnormalized weights fixed)."""
    m1, m2 = t([1.4, 0.6]), t([0.2, 1.6])
    P1 = torch.linalg.inv(t([[0.30, 0.12], [0.12, 0.20]]))
    P2 = torch.linalg.inv(t([[0.5, -0.1], [-0.1, 0.4]]))
    d1, d2 = theta - m1, theta - m2
    a = -0.5 * d1 @ P1 @ d1 + math.log(0.7) + 0.5 * torch.logdet(P1)
    b = -0.5 * d2 @ P2 @ d2 + math.log(0.3) + 0.5 * torch.logdet(P2)
    return torch.logsumexp(torch.stack([a, b]), 0) - math.log(2 * math.pi)


def part_map2d(quick: bool, seed: int) -> dict[str, Any]:
    """Classic and Riemannian MAP in each chart, mapped to θ; contour data for the figure."""
    space = ParameterSpace.from_log_prob(log_p_2d)
    theta_map = cvd.map_estimate(space, t([1.0, 0.5]), riemannian=False).point
    charts = {"cubic shear": shear_chart(), "polar": Polar()}
    out: dict[str, Any] = {"theta_map": theta_map.tolist(), "charts": {}}
    for name, h in charts.items():
        s = space.reparametrize(h)
        psi0 = h.inverse(theta_map)
        c = cvd.map_estimate(s, psi0, riemannian=False)
        r = cvd.map_estimate(s, psi0 + 0.05, riemannian=True)
        out["charts"][name] = {
            "classic_psi": c.point.tolist(), "riemannian_psi": r.point.tolist(),
            "classic_in_theta": h(c.point).tolist(), "riemannian_in_theta": h(r.point).tolist(),
            "classic_shift": float((h(c.point) - theta_map).norm()),
            "riemannian_shift": float((h(r.point) - theta_map).norm()),
            "psi_of_theta_map": psi0.tolist(),
            "converged": c.converged and r.converged,
        }
    # contour data: p in θ, and p_Ψ in the shear chart (vectorized over the grid)
    n = 40 if quick else 100
    g0 = torch.linspace(-1.0, 3.0, n, dtype=DT)
    g1 = torch.linspace(-1.0, 3.2, n, dtype=DT)
    sh = space.reparametrize(charts["cubic shear"])
    u0 = torch.linspace(-1.3, 1.6, n, dtype=DT)
    u1 = torch.linspace(-1.8, 2.4, n, dtype=DT)

    def grid_eval(fn: Callable[[Tensor], Tensor], a: Tensor, b: Tensor) -> list[list[float]]:
        B, A = torch.meshgrid(b, a, indexing="ij")
        pts = torch.stack([A.reshape(-1), B.reshape(-1)], 1)
        with torch.no_grad():
            return torch.func.vmap(fn)(pts).exp().reshape(len(b), len(a)).tolist()

    Z = grid_eval(log_p_2d, g0, g1)
    Zs = grid_eval(lambda q: -sh.loss_function(q), u0, u1)
    out["plot"] = {"x": g0.tolist(), "y": g1.tolist(), "z": Z,
                   "u": u0.tolist(), "v": u1.tolist(), "zs": Zs}
    return out


def plot_map2d(r: dict[str, Any], path: Path) -> None:
    """The MAPs over the contours of p in θ, and p_Ψ in the shear chart."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    P = r["plot"]
    ax = axes[0]
    ax.contour(P["x"], P["y"], P["z"], levels=14, cmap="Greys")
    t = r["theta_map"]
    ax.plot(*t, "k*", ms=14, label="mode of p_Θ (MAP in θ)")
    for (name, c), col in zip(r["charts"].items(), ("C0", "C3"), strict=False):
        ax.plot(*c["classic_in_theta"], "x", color=col, ms=11, mew=2.5,
                label=f"classic MAP in {name} chart, mapped to θ")
        ax.plot(*c["riemannian_in_theta"], "o", color=col, ms=11, mfc="none", mew=2,
                label=f"Riemannian MAP in {name} chart, mapped to θ")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")
    ax.set_title("(b) in θ: classic MAPs move, Riemannian MAPs stay")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.contour(P["u"], P["v"], P["zs"], levels=14, cmap="Blues")
    c = r["charts"]["cubic shear"]
    ax.plot(*c["psi_of_theta_map"], "k*", ms=14, label="h⁻¹(θ-mode)")
    ax.plot(*c["classic_psi"], "x", color="C0", ms=11, mew=2.5, label="mode of p_Ψ (classic MAP)")
    ax.plot(*c["riemannian_psi"], "o", color="C0", ms=11, mfc="none", mew=2,
            label="mode of q_Ψ (Riemannian MAP)")
    ax.set_xlabel("ψ₁")
    ax.set_ylabel("ψ₂")
    ax.set_title("p_Ψ in the cubic-shear chart ψ")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path, plt)
