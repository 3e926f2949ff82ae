"""Part (f): natural gradient vs SGD per step.

The best final training loss of ``RiemannianGD("ggn")`` and of SGD over learning-rate sweeps,
full batch, on a small MLP on MNIST-1D, after the same number of steps. The claim recorded is
``ngd_faster_per_step``: the best natural-gradient run ends lower than the best SGD run.

Example
-------
>>> best({"0.1": [2.0, 1.0], "1.0": [2.0, 0.5], "10.0": [2.0, float("nan")]})
('1.0', [2.0, 0.5])
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._progress import progress_bar
from ...optim import RiemannianGD
from .networks import dataset, mlp, train, weight_names
from .settings import save_png

__all__ = ["best", "part_f", "plot_f"]


def best(curves: dict[str, list[float]]) -> tuple[str, list[float]]:
    """The learning rate (key) whose loss curve ends lowest, among finite ones, and its curve."""
    finite = {k: v for k, v in curves.items() if math.isfinite(v[-1])}
    k = min(finite, key=lambda k: finite[k][-1])
    return k, finite[k]


def part_f(cfg: dict[str, Any], seed: int, cache: Path | None, progress: bool) -> dict[str, Any]:
    """Learning-rate sweeps of SGD and natural gradient; the best of each."""
    X, y, _, _ = dataset(cfg["num_samples"], seed, cache)
    base = mlp(cfg["hidden"], seed)
    names = weight_names(base)
    loss_fn = nn.CrossEntropyLoss()
    steps = cfg["steps"]
    curves: dict[str, dict[str, list[float]]] = {"sgd": {}, "ngd": {}}
    for lr in progress_bar(cfg["sgd_lrs"], enabled=progress, desc="(f) SGD sweep"):
        m = copy.deepcopy(base)
        curves["sgd"][repr(lr)] = train(m, torch.optim.SGD(m.parameters(), lr), X, y,
                                        steps, names)["loss"]
    for lr in progress_bar(cfg["ngd_lrs"], enabled=progress, desc="(f) NGD sweep"):
        m = copy.deepcopy(base)
        opt = RiemannianGD(m.parameters(), lr, "ggn", model=m, loss_fn=loss_fn, data=(X, y),
                           damping=cfg["damping"], cg_maxiter=300)
        curves["ngd"][repr(lr)] = train(m, opt, X, y, steps, names)["loss"]
    sgd_lr, sgd = best(curves["sgd"])
    ngd_lr, ngd = best(curves["ngd"])
    return {
        "steps": steps, "damping": cfg["damping"], "curves": curves,
        "best_sgd": {"lr": float(sgd_lr), "final_loss": sgd[-1], "loss": sgd},
        "best_ngd": {"lr": float(ngd_lr), "final_loss": ngd[-1], "loss": ngd},
        "ngd_faster_per_step": bool(ngd[-1] < sgd[-1]),
        "initial_loss": sgd[0],
    }


def plot_f(f: dict[str, Any], out: Path, plt: Any) -> str:
    """Every loss curve of both sweeps, the best of each highlighted."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for lr, curve in f["curves"]["sgd"].items():
        ax.plot(curve, color="tab:red", alpha=0.3 + 0.7 * (float(lr) == f["best_sgd"]["lr"]),
                label=f"SGD lr {lr}")
    for lr, curve in f["curves"]["ngd"].items():
        ax.plot(curve, color="tab:blue", alpha=0.3 + 0.7 * (float(lr) == f["best_ngd"]["lr"]),
                label=f"RiemannianGD('ggn') lr {lr}")
    ax.set_ylim(top=f["initial_loss"] * 1.2, bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("natural gradient vs SGD (learning-rate sweeps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out / "optimization_ggn_vs_sgd.png", plt)
