"""Part (c): an MLP on MNIST-1D in two charts, the weights w and weight norm (g, v).

GD in w; GD in (g, v) (``torch.nn.utils.parametrizations.weight_norm``); Riemannian GD in
(g, v) with the pulled-back metric; natural gradient (GGN) in both charts. The trajectories are
compared after mapping to w: plain GD in (g, v) drifts away from GD in w, Riemannian GD tracks
it to first order in the step size, and natural gradient agrees in both charts.

Example
-------
>>> d = compare({"a": {"traj": torch.zeros(3, 2)},
...              "b": {"traj": torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])}}, "a", "b")
>>> d["final"], d["travel"], d["relative_final"]
(2.0, 2.0, 1.0)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...optim import RiemannianGD
from .networks import accuracy, dataset, dist_curve, mlp, train, weight_names, with_weight_norm
from .settings import save_png

__all__ = ["compare", "part_c", "plot_c"]


def _ngd_maker(cfg: dict[str, Any], X: Tensor, y: Tensor) -> Callable[..., RiemannianGD]:
    """Natural gradient (GGN, damped) on ``model`` at step ``lr`` (default ``cfg["ngd_lr"]``)."""
    loss_fn = nn.CrossEntropyLoss()

    def ngd(model: nn.Module, lr: float = cfg["ngd_lr"]) -> RiemannianGD:
        return RiemannianGD(
            model.parameters(), lr, "ggn", model=model, loss_fn=loss_fn, data=(X, y),
            damping=cfg["damping"], cg_tol=1e-8, cg_maxiter=1000,
        )

    return ngd


def _rgd(lr: float) -> Callable[[nn.Module], RiemannianGD]:
    """Riemannian GD with the Euclidean metric of w pulled back to the model's chart."""
    return lambda m: RiemannianGD(m.parameters(), lr, "weights", model=m, cg_tol=1e-12,
                                  cg_maxiter=500)


def _runs(cfg: dict[str, Any], base: nn.Module, names: list[str], data: tuple[Tensor, ...],
          progress: bool) -> dict[str, Any]:
    """The five runs from the same initialization, with timings and test accuracies."""
    X, y, Xt, yt = data
    gd_lr, gd_steps = cfg["gd_lr"], cfg["gd_steps"]
    ngd = _ngd_maker(cfg, X, y)
    specs: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any], int]] = [
        ("gd_w", lambda: copy.deepcopy(base),
         lambda m: torch.optim.SGD(m.parameters(), gd_lr), gd_steps),
        ("gd_gv", lambda: with_weight_norm(base),
         lambda m: torch.optim.SGD(m.parameters(), gd_lr), gd_steps),
        ("riemannian_gd_gv", lambda: with_weight_norm(base), _rgd(gd_lr), gd_steps),
        ("ngd_w", lambda: copy.deepcopy(base), ngd, cfg["ngd_steps"]),
        ("ngd_gv", lambda: with_weight_norm(base), ngd, cfg["ngd_steps"]),
    ]
    runs: dict[str, Any] = {}
    for key, make_model, make_opt, steps in specs:
        model = make_model()
        t0 = time.perf_counter()
        runs[key] = train(model, make_opt(model), X, y, steps, names,
                          progress=progress, desc=f"(c) {key}")
        runs[key]["seconds"] = time.perf_counter() - t0
        runs[key]["test_accuracy"] = accuracy(model, Xt, yt)
    return runs


def compare(runs: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """Distance between the w-trajectories of runs ``a`` and ``b``, also relative to how far
    ``b`` has travelled from its start."""
    ta, tb = runs[a]["traj"], runs[b]["traj"]
    curve = dist_curve(ta, tb)
    moved = torch.linalg.vector_norm(tb - tb[0], dim=1)
    relative = [d / float(m) if m > 0 else 0.0 for d, m in zip(curve, moved, strict=True)]
    travel = float(moved[-1])
    return {"distance": curve, "relative": relative, "final": curve[-1], "travel": travel,
            "relative_final": curve[-1] / travel}


def _half_lr(cfg: dict[str, Any], base: nn.Module, names: list[str], X: Tensor,
             y: Tensor) -> tuple[float, dict[str, Any] | None]:
    """Final gaps at half the step and twice the steps: Riemannian GD in (g, v) vs GD in w,
    and (if ``cfg["half_lr_ngd"]``) natural gradient in (g, v) vs in w."""
    gd_lr, gd_steps = cfg["gd_lr"], cfg["gd_steps"]
    half: dict[str, Any] = {}
    for key, make_model, make_opt_half in [
        ("gd_w", lambda: copy.deepcopy(base),
         lambda m: torch.optim.SGD(m.parameters(), gd_lr / 2)),
        ("riemannian_gd_gv", lambda: with_weight_norm(base), _rgd(gd_lr / 2)),
    ]:
        model = make_model()
        half[key] = train(model, make_opt_half(model), X, y, 2 * gd_steps, names)
    half_gap = float(torch.linalg.vector_norm(
        half["gd_w"]["traj"][-1] - half["riemannian_gd_gv"]["traj"][-1]
    ))
    if not cfg["half_lr_ngd"]:
        return half_gap, None
    ngd, ngd_lr, ngd_steps = _ngd_maker(cfg, X, y), cfg["ngd_lr"], cfg["ngd_steps"]
    finals = []
    for make_model in (lambda: copy.deepcopy(base), lambda: with_weight_norm(base)):
        model = make_model()
        opt = ngd(model, ngd_lr / 2)
        finals.append(train(model, opt, X, y, 2 * ngd_steps, names)["traj"][-1])
    return half_gap, {"lr": ngd_lr / 2, "steps": 2 * ngd_steps,
                      "final": float(torch.linalg.vector_norm(finals[0] - finals[1]))}


def part_c(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    """Train in w and in (g, v); distances of the trajectories mapped to w."""
    X, y, Xt, yt = dataset(cfg["num_samples"], seed, cache)
    base = mlp(cfg["hidden"], seed)
    names = weight_names(base)
    gd_lr, gd_steps = cfg["gd_lr"], cfg["gd_steps"]
    runs = _runs(cfg, base, names, (X, y, Xt, yt), progress)
    half_gap, ngd_half = _half_lr(cfg, base, names, X, y)
    out: dict[str, Any] = {
        "num_parameters_w": len(runs["gd_w"]["traj"][0]),
        "runs": {
            k: {"loss": v["loss"], "final_loss": v["loss"][-1],
                "test_accuracy": v["test_accuracy"], "seconds": v["seconds"]}
            for k, v in runs.items()
        },
        "distances": {
            "gd_gv_vs_gd_w": compare(runs, "gd_gv", "gd_w"),
            "riemannian_gd_gv_vs_gd_w": compare(runs, "riemannian_gd_gv", "gd_w"),
            "ngd_gv_vs_ngd_w": compare(runs, "ngd_gv", "ngd_w"),
        },
        "riemannian_gd_gv_vs_gd_w_half_lr": {
            "lr": gd_lr / 2, "steps": 2 * gd_steps, "final": half_gap,
        },
    }
    full = out["distances"]["riemannian_gd_gv_vs_gd_w"]["final"]
    out["riemannian_gd_gv_vs_gd_w_half_lr"]["ratio"] = full / half_gap if half_gap else None
    if ngd_half is not None:
        ngd_half["ratio"] = out["distances"]["ngd_gv_vs_ngd_w"]["final"] / ngd_half["final"]
        out["ngd_gv_vs_ngd_w_half_lr"] = ngd_half
    return out


def plot_c(c: dict[str, Any], out: Path, plt: Any) -> str:
    """Loss curves, and the distance between the charts' trajectories mapped to w."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"gd_w": "GD in w", "gd_gv": "GD in (g, v)",
              "riemannian_gd_gv": "Riemannian GD in (g, v)", "ngd_w": "natural gradient in w",
              "ngd_gv": "natural gradient in (g, v)"}
    for key, run in c["runs"].items():
        axes[0].plot(run["loss"], label=labels[key], ls="--" if key.endswith("gv") else "-")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("MLP on MNIST-1D, full batch")
    axes[0].legend(fontsize=8)
    dl = {"gd_gv_vs_gd_w": "GD (g, v) vs GD w",
          "riemannian_gd_gv_vs_gd_w": "Riemannian GD (g, v) vs GD w",
          "ngd_gv_vs_ngd_w": "natural gradient (g, v) vs w"}
    for key, r in c["distances"].items():
        steps = np.arange(1, len(r["relative"]))
        axes[1].semilogy(steps, np.maximum(r["relative"][1:], 1e-17), label=dl[key])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("‖w_a(k) − w_b(k)‖ / ‖w_b(k) − w_b(0)‖")
    axes[1].set_title("distance between charts, mapped to w")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out / "optimization_network.png", plt)
