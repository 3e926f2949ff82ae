"""Part (a): x ~ N(0.5, 0.8²), y = eˣ. The MAP of p_Y is e^{μ−σ²} = 0.869358; the Riemannian
MAP (G_y = 1/y²) is e^{μ} = 1.648721, the image of the Gaussian mode.

Example
-------
>>> r = part_lognormal(True, 0)
>>> round(r["classic_mode"], 6), round(r["riemannian_mode"], 6)
(0.869358, 1.648721)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ... import density as cvd
from ...reparam import Log
from ...space import ParameterSpace
from .common import DT, pyplot, save_png, t

__all__ = ["MU", "SIGMA", "part_lognormal", "plot_lognormal"]

MU, SIGMA = 0.5, 0.8



def part_lognormal(quick: bool, seed: int) -> dict[str, Any]:
    """Classic and Riemannian MAP in y against their closed forms, and the densities to plot."""
    normal = torch.distributions.Normal(t(MU), t(SIGMA))
    x_space = ParameterSpace.from_log_prob(lambda x: normal.log_prob(x).sum())
    y_space = x_space.reparametrize(Log())  # θ = x = log y, ψ = y
    y0 = t([1.0])
    classic = cvd.map_estimate(y_space, y0, riemannian=False)
    riem = cvd.map_estimate(y_space, y0, riemannian=True)
    x_map = cvd.map_estimate(x_space, t([0.0]), riemannian=False)
    a_classic, a_riem = math.exp(MU - SIGMA**2), math.exp(MU)
    ys = torch.linspace(0.02, 6.0, 300, dtype=DT)
    p_y = torch.stack([(-y_space.loss(y[None])).exp() for y in ys])
    q_y = p_y * ys  # density w.r.t. the Riemannian volume dy/y (up to normalization)
    return {
        "mu": MU, "sigma": SIGMA,
        "classic_mode": float(classic.point), "riemannian_mode": float(riem.point),
        "analytic_classic": a_classic, "analytic_riemannian": a_riem,
        "abs_err_classic": abs(float(classic.point) - a_classic),
        "abs_err_riemannian": abs(float(riem.point) - a_riem),
        "x_mode": float(x_map.point), "exp_x_mode": math.exp(float(x_map.point)),
        "converged": classic.converged and riem.converged,
        "plot": {"y": ys.tolist(), "p_y": p_y.tolist(), "q_y": q_y.tolist()},
    }


def plot_lognormal(r: dict[str, Any], path: Path) -> None:
    """p_Y and q_Y with both modes marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    y, p, q = r["plot"]["y"], r["plot"]["p_y"], r["plot"]["q_y"]
    qmax, pmax = max(q), max(p)
    ax.plot(y, p, label="p_Y(y)  (density w.r.t. dy)")
    ax.plot(y, [v * pmax / qmax for v in q], "--",
            label="q_Y(y) ∝ p_Y(y)·y  (w.r.t. dy/y, rescaled)")
    ax.axvline(r["classic_mode"], color="C0", ls=":",
               label=f"MAP in y: {r['classic_mode']:.6f} (e^(μ−σ²) = {r['analytic_classic']:.6f})")
    ax.axvline(r["riemannian_mode"], color="C1", ls=":",
               label=f"Riemannian MAP: {r['riemannian_mode']:.6f} (e^μ = "
                     f"{r['analytic_riemannian']:.6f})")
    ax.set_xlabel("y = exp(x),  x ~ N(0.5, 0.8²)")
    ax.set_title("(a) Log-normal: the MAP moves, the Riemannian MAP is e^(mode of x)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, plt)
