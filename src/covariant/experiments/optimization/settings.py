"""Settings of the optimization experiment, reading back a previous run's results, and
saving its figures.

Example
-------
>>> quick = settings(True, 0)
>>> quick["quick"], sorted(k for k in quick if len(k) == 1)
(True, ['a', 'b', 'c', 'd', 'e', 'f'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..._io import atomic_write_json, read_json, save_figure, to_jsonable

__all__ = ["FIGURES", "JSON_NAME", "load_previous", "save_png", "settings", "write_results"]

#: File name of the results, under ``out_dir``.
JSON_NAME = "optimization.json"
#: The figures, under ``out_dir`` (redrawn when a part is recomputed or a figure is missing).
FIGURES = (
    "optimization_trajectories.png",
    "optimization_order.png",
    "optimization_network.png",
    "optimization_ntk_adam.png",
    "optimization_ggn_vs_sgd.png",
)
_VERSION = 1


def settings(quick: bool, seed: int) -> dict[str, Any]:
    """Every setting of the run (``quick`` or full), the seed, and a version number."""
    if quick:
        return {
            "version": _VERSION, "quick": True, "seed": seed,
            "a": {"theta0": [1.1, 0.55], "lr": 0.1, "steps": 2},
            "b": {"theta0": {"phi": [0.7, -0.4]}, "horizon": 0.2,
                  "lrs": [0.04, 0.02, 0.01], "geodesic_lrs": [0.1]},
            "c": {"num_samples": 240, "hidden": [16], "gd_lr": 0.2, "gd_steps": 20,
                  "ngd_lr": 0.2, "ngd_steps": 3, "damping": 1e-2, "half_lr_ngd": False},
            "d": {"num_samples": 240, "hidden": [16, 16], "sigma": 1.0, "lr": 0.1, "steps": 10},
            "e": {"num_samples": 240, "hidden": [16], "scales": [10.0, 0.1],
                  "adam_horizon": 0.02, "adam_lrs": [4e-3, 1e-3],
                  "sgd_horizon": 0.4, "sgd_lrs": [0.1, 0.025],
                  "ngd_horizon": 0.2, "ngd_lrs": [0.1], "damping": 1e-2},
            "f": {"num_samples": 240, "hidden": [16], "steps": 8,
                  "sgd_lrs": [0.3, 1.0, 3.0, 10.0], "ngd_lrs": [0.3, 1.0], "damping": 1e-2},
        }
    return {
        "version": _VERSION, "quick": False, "seed": seed,
        "a": {"theta0": [1.1, 0.55], "lr": 0.05, "steps": 20},
        "b": {"theta0": {"phi": [0.7, -0.4], "polar": [0.7, -0.4]}, "horizon": 0.4,
              "lrs": [0.04, 0.02, 0.01, 0.005, 0.0025], "geodesic_lrs": [0.04, 0.02]},
        "c": {"num_samples": 1000, "hidden": [32], "gd_lr": 0.2, "gd_steps": 150,
              "ngd_lr": 0.2, "ngd_steps": 15, "damping": 1e-2, "half_lr_ngd": True},
        "d": {"num_samples": 500, "hidden": [32, 32], "sigma": 1.0, "lr": 0.1, "steps": 30},
        "e": {"num_samples": 500, "hidden": [32], "scales": [10.0, 0.1],
              "adam_horizon": 0.02, "adam_lrs": [4e-3, 2e-3, 1e-3, 5e-4],
              "sgd_horizon": 0.4, "sgd_lrs": [0.1, 0.05, 0.025, 0.0125],
              "ngd_horizon": 0.4, "ngd_lrs": [0.1, 0.05, 0.025], "damping": 1e-2},
        "f": {"num_samples": 1000, "hidden": [32], "steps": 25,
              "sgd_lrs": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "ngd_lrs": [0.1, 0.3, 1.0],
              "damping": 1e-2},
    }


def load_previous(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results at ``path`` (strict JSON, non-finite numbers restored) if they were made
    with ``settings``, else ``None``."""
    if not path.exists():
        return None
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("settings") != to_jsonable(settings, nonfinite="null"):
        return None
    return old


def write_results(path: Path, results: dict[str, Any]) -> None:
    """The results file, written atomically as strict JSON: a non-finite number (the loss of
    a diverged run) is ``null``, flagged under the top-level key ``"nonfinite"``, and
    :func:`load_previous` reads it back as it was."""
    atomic_write_json(path, results, indent=1)


def save_png(fig: Any, path: Path, plt: Any) -> str:
    """Save ``fig`` atomically as PNG (110 dpi), close it, and return the file name."""
    save_figure(fig, path, dpi=110, bbox_inches=None)
    plt.close(fig)
    return path.name
