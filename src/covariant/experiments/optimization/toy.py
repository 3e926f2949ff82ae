"""Parts (a) and (b): trajectories on the 2-D loss of docs/math.md §8, and the order of invariance.

(a) GD in θ, plain GD in ψ, Riemannian GD in ψ (linear, second-order, geodesic) and the
gradient flow, under the charts h = φ⁻¹ and polar, every run mapped back to θ.
(b) The distance at a fixed horizon T between the ψ-run (mapped to θ) and the θ-run against
the step size α, with fitted log-log slopes: plain GD ≈ 0, linear ≈ 1, second order ≈ 2,
geodesic exact up to the ODE tolerance.

Example
-------
>>> a = part_a({"theta0": [1.1, 0.55], "lr": 0.1, "steps": 2}, progress=False)
>>> all(c["flow_invariance_gap"] < 1e-7 for c in a["charts"].values())
True
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import metrics as _metrics
from ..._progress import progress_bar
from ...optim import gradient_flow, map_trajectory, riemannian_gd, step_size_sweep
from ...space import ParameterSpace
from ...zoo.problems import reference_loss
from .charts import charts as _charts
from .settings import save_png

__all__ = ["part_a", "part_b", "plot_a", "plot_b"]

_DT = torch.float64


def part_a(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Trajectories of every optimizer in both charts, mapped to θ."""
    theta_space = ParameterSpace(reference_loss)
    theta0 = torch.tensor(cfg["theta0"], dtype=_DT)
    lr, steps = cfg["lr"], cfg["steps"]
    horizon = lr * steps
    gd_theta = riemannian_gd(theta_space, theta0, lr, steps)
    t_flow = np.linspace(0.0, horizon, 41)
    flow = gradient_flow(theta_space, theta0, t_flow)
    out: dict[str, Any] = {"theta0": cfg["theta0"], "lr": lr, "steps": steps,
                           "horizon": horizon, "charts": {}}
    for name, h in progress_bar(_charts().items(), enabled=progress, desc="(a) charts"):
        psi_space = theta_space.reparametrize(h)
        psi0 = h.inverse(theta0)
        runs = {
            "gd_theta": gd_theta,
            "plain_gd_psi": map_trajectory(
                riemannian_gd(psi_space.with_metric(_metrics.Euclidean()), psi0, lr, steps), h
            ),
        }
        for update in ("linear", "second_order", "geodesic"):
            runs[f"riemannian_{update}"] = map_trajectory(
                riemannian_gd(psi_space, psi0, lr, steps, update), h
            )
        flow_psi = map_trajectory(gradient_flow(psi_space, psi0, t_flow), h)
        runs["flow_theta"] = flow
        runs["flow_psi"] = flow_psi
        final = {k: float(torch.linalg.vector_norm(v[-1] - gd_theta[-1])) for k, v in runs.items()}
        largest = {  # the discrete runs, step by step against GD in θ
            k: float(torch.linalg.vector_norm(v - gd_theta, dim=1).max())
            for k, v in runs.items() if not k.startswith("flow")
        }
        out["charts"][name] = {
            "trajectories": {k: v.tolist() for k, v in runs.items()},
            "final_distance_to_gd_theta": final,
            "max_distance_to_gd_theta": largest,
            "flow_invariance_gap": float((flow_psi - flow).abs().max()),
        }
    return out


def part_b(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Step-size sweeps at a fixed horizon: the order of invariance of each update."""
    theta_space = ParameterSpace(reference_loss)
    charts = _charts()
    out: dict[str, Any] = {"horizon": cfg["horizon"]}
    for name, theta0 in cfg["theta0"].items():
        h = charts[name]
        psi_space = theta_space.reparametrize(h)
        psi0 = h.inverse(torch.tensor(theta0, dtype=_DT))
        res: dict[str, Any] = {"theta0": theta0}
        runs = [
            ("plain_gd", psi_space.with_metric(_metrics.Euclidean()), "linear", cfg["lrs"]),
            ("linear", psi_space, "linear", cfg["lrs"]),
            ("second_order", psi_space, "second_order", cfg["lrs"]),
            ("geodesic", psi_space, "geodesic", cfg["geodesic_lrs"]),
        ]
        for key, space, update, lrs in progress_bar(runs, enabled=progress, desc=f"(b) {name}"):
            t0 = time.perf_counter()
            sweep = step_size_sweep(space, psi0, lrs, cfg["horizon"], update=update)
            res[key] = {**sweep.to_dict(), "seconds": time.perf_counter() - t0}
        geo = res["geodesic"]
        geo["max_discrepancy"] = max(geo["discrepancies"])
        geo["slope"] = geo["intercept"] = None  # a fit through round-off means nothing
        out[name] = res
    return out


def plot_a(a: dict[str, Any], out: Path, plt: Any) -> str:
    """The trajectories over the loss contours, one panel per chart."""
    fig, axes = plt.subplots(1, len(a["charts"]), figsize=(5.5 * len(a["charts"]), 6.2))
    axes = np.atleast_1d(axes)
    allpts = np.concatenate([
        np.asarray(tr) for res in a["charts"].values() for tr in res["trajectories"].values()
    ])
    lo, hi = allpts.min(0), allpts.max(0)
    center, half = (lo + hi) / 2, 0.6 * max(hi - lo) + 0.05  # a square view
    xs = np.linspace(center[0] - half, center[0] + half, 240)
    ys = np.linspace(center[1] - half, center[1] + half, 240)
    XX, YY = np.meshgrid(xs, ys)
    LL = (XX**2 + 2 * YY**2 - 1) ** 2 + 0.3 * np.sin(2 * XX) + 0.1 * XX * YY
    levels = np.quantile(LL, np.linspace(0.0, 1.0, 30) ** 2)
    styles = {
        "flow_theta": dict(color="0.5", lw=5, alpha=0.5, label="gradient flow"),
        "gd_theta": dict(color="k", marker="o", ms=4, lw=1.5, label="GD in θ"),
        "plain_gd_psi": dict(color="tab:red", marker="s", ms=4, ls="--",
                             label="plain GD in ψ (mapped to θ)"),
        "riemannian_linear": dict(color="tab:blue", marker="^", ms=4,
                                  label="Riemannian GD in ψ, linear"),
        "riemannian_second_order": dict(color="tab:green", marker="v", ms=4,
                                        label="Riemannian GD in ψ, second order"),
        "riemannian_geodesic": dict(color="tab:purple", marker="x", ms=7, ls=":",
                                    label="Riemannian GD in ψ, geodesic"),
    }
    for ax, (name, res) in zip(axes, a["charts"].items(), strict=True):
        ax.contour(XX, YY, LL, levels=np.unique(levels), cmap="viridis", linewidths=0.6)
        for key, st in styles.items():
            tr = np.asarray(res["trajectories"][key])
            ax.plot(tr[:, 0], tr[:, 1], **st)
        title = {"phi": "chart h = φ⁻¹ (docs/math.md §8)", "polar": "polar chart (r, φ)"}[name]
        ax.set_title(f"{title}\nα = {a['lr']}, {a['steps']} steps")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_aspect("equal")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return save_png(fig, out / "optimization_trajectories.png", plt)


def plot_b(b: dict[str, Any], out: Path, plt: Any) -> str:
    """Discrepancy against step size, log-log, one panel per chart."""
    charts = [k for k in b if k != "horizon"]
    fig, axes = plt.subplots(1, len(charts), figsize=(6 * len(charts), 4.5), squeeze=False)
    colors = {"plain_gd": "tab:red", "linear": "tab:blue", "second_order": "tab:green",
              "geodesic": "tab:purple"}
    for ax, name in zip(axes[0], charts, strict=True):
        for key, color in colors.items():
            r = b[name][key]
            label = (f"{key}: max {max(r['discrepancies']):.1e}" if key == "geodesic"
                     else f"{key}: slope {r['slope']:.2f}")
            d = np.maximum(np.asarray(r["discrepancies"], dtype=float), 1e-17)
            ax.loglog(r["lrs"], d, "o-", color=color, label=label)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("step size α")
        ax.set_ylabel(f"‖θ-run − ψ-run‖ at T = {b['horizon']}")
        ax.set_title(f"order of invariance, chart {name}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out / "optimization_order.png", plt)
