r"""Figures of the generalization study, drawn from the results JSON (matplotlib, an optional
extra, is imported by the runner through :func:`covariant.errors.require`).

- ``generalization_scatter.png``: each measure against the gap (log scale for positive
  measures), one colour per optimizer, τ in the title;
- ``generalization_attacks.png``: τ before and after each attack, one bar group per measure;
- ``generalization_optimizer_bias.png``: median sharpness of SGD and Adam minima with
  bootstrap intervals, in the Euclidean, own and GGN metrics (relative to SGD's median).

Example
-------
>>> grid_shape(7)
(2, 4)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..._io import save_figure

__all__ = ["grid_shape", "plot_attacks", "plot_bias", "plot_scatter"]

_COLOURS = {"sgd": "tab:red", "momentum": "tab:orange", "adam": "tab:blue"}


def grid_shape(n: int, cols: int = 4) -> tuple[int, int]:
    """Rows and columns of a panel grid for ``n`` panels, at most ``cols`` wide."""
    c = max(1, min(cols, n))
    return math.ceil(n / c), c


def _save(fig: Any, path: Path, plt: Any) -> str:
    save_figure(fig, path, dpi=100, bbox_inches=None)
    plt.close(fig)
    return path.name


def plot_scatter(results: dict[str, Any], task: str, out: Path, plt: Any) -> str:
    """Each measure against the gap for one task."""
    stats = results["statistics"][task]
    names = list(stats)
    models = [m for m in results["models"]
              if m["hyperparameters"]["task"] == task and not m["diverged"]]
    rows, cols = grid_shape(len(names), 5)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for opt, colour in _COLOURS.items():
            pts = [(results["measures"][m["id"]][name]["value"], m["gap"]) for m in models
                   if m["hyperparameters"]["optimizer"] == opt]
            pts = [p for p in pts if math.isfinite(p[0])]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, c=colour, label=opt)
        vals = [results["measures"][m["id"]][name]["value"] for m in models]
        if vals and min(vals) > 0 and max(vals) > 20 * min(vals):
            ax.set_xscale("log")
        ax.set_title(f"{name}\nτ = {stats[name]['tau']:.2f} ({stats[name]['kind']})",
                     fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("gap (train − test acc.)", fontsize=7)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"measures vs generalization gap ({task}, {len(models)} models)")
    fig.tight_layout()
    return _save(fig, out / "generalization_scatter.png", plt)


def plot_attacks(results: dict[str, Any], task: str, out: Path, plt: Any) -> str:
    """τ(measure, gap) before and after each attack (the adversary's most extreme τ)."""
    table = results["attacks"].get(task, {})
    names = list(table)
    kinds = list(next(iter(table.values()), {}))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.35 * len(names) * (len(kinds) + 1))),
                                    4.6))
    width = 0.8 / (len(kinds) + 1)
    xs = range(len(names))
    ax.bar([x - 0.4 + width / 2 for x in xs], [table[n][kinds[0]]["tau_before"] for n in names]
           if kinds else [], width, color="black", label="before")
    for j, kind in enumerate(kinds, start=1):
        ax.bar([x - 0.4 + width * (j + 0.5) for x in xs],
               [table[n][kind]["tau_after"] for n in names], width, label=f"after {kind}")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Kendall τ(measure, gap)")
    ax.set_title(f"τ before and after each attack ({task}; adversary: greedy per-model "
                 "strengths)", fontsize=9)
    ax.legend(fontsize=7, ncol=len(kinds) + 1)
    fig.tight_layout()
    return _save(fig, out / "generalization_attacks.png", plt)


def plot_bias(results: dict[str, Any], task: str, out: Path, plt: Any) -> str:
    """Median sharpness of Adam minima relative to SGD's (all SGD variants pooled), per metric
    and quantity, with the bootstrap interval of the ratio; 1 = no difference."""
    bias = results["optimizer_bias"].get(task, {})
    labels, ratios, lows, highs = [], [], [], []
    for metric, quantities in bias.items():
        for q, r in quantities.items():
            if "ratio_adam_over_sgd" in r:
                labels.append(f"{metric}\n{q}")
                ratios.append(r["ratio_adam_over_sgd"])
                lows.append(r["ratio_adam_over_sgd"] - r["ratio_ci"][0])
                highs.append(r["ratio_ci"][1] - r["ratio_adam_over_sgd"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels)), 4.0))
    ax.errorbar(range(len(labels)), ratios, yerr=[lows, highs], fmt="o", capsize=4)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("median(Adam) / median(SGD)")
    ax.set_title(f"are Adam's minima sharper? ({task}; 95% bootstrap intervals)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "generalization_optimizer_bias.png", plt)
