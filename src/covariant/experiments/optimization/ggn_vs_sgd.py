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

__all__ = ["best", "part_f", "plot_f", "sweep_colours"]


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


def sweep_colours(n: int, cmap: Any) -> list[Any]:
    """n distinguishable shades of one colour map, light (small lr) to dark (large lr).

    >>> import matplotlib
    >>> cols = sweep_colours(6, matplotlib.colormaps["Reds"])
    >>> len({tuple(c) for c in cols})
    6
    """
    return [cmap(0.35 + 0.6 * i / max(n - 1, 1)) for i in range(n)]


def plot_f(f: dict[str, Any], out: Path, plt: Any) -> str:
    """Every loss curve of both sweeps, one shade per learning rate; the best of each solid and
    thick."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, cmap, best, name in (("sgd", "Reds", f["best_sgd"]["lr"], "SGD"),
                                   ("ngd", "Blues", f["best_ngd"]["lr"], "RiemannianGD('ggn')")):
        curves = f["curves"][kind]
        colours = sweep_colours(len(curves), plt.get_cmap(cmap))
        for colour, (lr, curve) in zip(colours, sorted(curves.items(), key=lambda c: float(c[0])),
                                       strict=True):
            top = float(lr) == best
            ax.plot(curve, color=colour, lw=2.2 if top else 1.0, ls="-" if top else "--",
                    label=f"{name} lr {lr}" + (" (best)" if top else ""))
    ax.set_ylim(top=f["initial_loss"] * 1.2, bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("natural gradient vs SGD (learning-rate sweeps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out / "optimization_ggn_vs_sgd.png", plt)
