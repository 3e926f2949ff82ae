"""Run the optimization experiment part by part, saving after each (checkpoint / resume),
and draw the figures from the saved results.

Example
-------
>>> _summary({"f": {"best_ngd": {"final_loss": 0.5}, "best_sgd": {"final_loss": 0.9},
...                 "ngd_faster_per_step": True}})["ngd_vs_sgd"]["ngd_faster_per_step"]
True
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..._io import to_jsonable
from ..._progress import progress_bar
from ...errors import require
from .ggn_vs_sgd import part_f, plot_f
from .rescaling import part_d, part_e, plot_de
from .settings import FIGURES, JSON_NAME, load_previous, settings, write_results
from .toy import part_a, part_b, plot_a, plot_b
from .weight_norm import part_c, plot_c

__all__ = ["run"]


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    """Draw every figure from the results; return the file names."""
    plt = require("matplotlib.pyplot", "plots")
    plt.switch_backend("Agg")
    parts = results["parts"]
    return [
        plot_a(parts["a"], out, plt),
        plot_b(parts["b"], out, plt),
        plot_c(parts["c"], out, plt),
        plot_de(parts["d"], parts["e"], out, plt),
        plot_f(parts["f"], out, plt),
    ]


def _summary(parts: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of the parts computed so far."""
    s: dict[str, Any] = {}
    if "b" in parts:
        b = parts["b"]
        s["slopes"] = {
            name: {k: b[name][k]["slope"] for k in ("plain_gd", "linear", "second_order")}
            for name in b if name != "horizon"
        }
        s["geodesic_max_gap"] = max(
            b[name]["geodesic"]["max_discrepancy"] for name in b if name != "horizon"
        )
    if "c" in parts:
        s["network_relative_final_distance"] = {
            k: v["relative_final"] for k, v in parts["c"]["distances"].items()
        }
    if "d" in parts:
        s["ntk_max_abs_difference"] = parts["d"]["gd_omega_vs_gd_w_per_layer_lr"]["max_abs"]
    if "e" in parts:
        s["rescaling_relative_gap_smallest_lr"] = {
            k: v["relative_gaps"][-1] for k, v in parts["e"]["optimizers"].items()
        }
    if "f" in parts:
        f = parts["f"]
        s["ngd_vs_sgd"] = {"ngd_final_loss": f["best_ngd"]["final_loss"],
                           "sgd_final_loss": f["best_sgd"]["final_loss"],
                           "ngd_faster_per_step": f["ngd_faster_per_step"]}
    return s


def run(
    out_dir: str | os.PathLike[str],
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the optimization experiment; write ``optimization.json`` and PNGs under ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Output folder (created). The JSON is rewritten atomically after every part; a rerun
        with the same ``quick`` and ``seed`` skips the parts already there (checkpoint /
        resume), and different settings start over.
    quick : bool
        A reduced version in well under a minute (used by the tests); the full one takes a
        few minutes on a laptop CPU.
    seed : int
        Seed of the network initializations and of the MNIST-1D draw.
    progress : bool
        Progress bars (needs tqdm).

    Returns
    -------
    dict
        ``{"experiment", "settings", "parts": {"a".."f"}, "summary", "figures"}``, as written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    config = settings(bool(quick), int(seed))
    results = load_previous(path, config) or {
        "experiment": "optimization", "settings": config, "parts": {}, "timing": {},
    }
    cache = out / "cache"
    # Every tensor here is tiny: intra-op threads only add synchronization, which on a busy
    # machine costs 10-50x. Run single-threaded and restore the setting afterwards.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        computed = _run_parts(results, config, seed, cache, progress, path)
    finally:
        torch.set_num_threads(torch_threads)
    results["summary"] = _summary(results["parts"])
    if computed or not all((out / name).exists() for name in FIGURES):
        results["figures"] = _plots(results, out)
        write_results(path, results)
    return to_jsonable(results, nonfinite="null")


def _run_parts(
    results: dict[str, Any],
    config: dict[str, Any],
    seed: int,
    cache: Path,
    progress: bool,
    path: Path,
) -> list[str]:
    """Compute the parts not yet in ``results``, saving after each; return their keys."""
    computed = []
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("a", lambda: part_a(config["a"], progress)),
        ("b", lambda: part_b(config["b"], progress)),
        ("c", lambda: part_c(config["c"], seed, cache, progress)),
        ("d", lambda: part_d(config["d"], seed, cache, progress)),
        ("e", lambda: part_e(config["e"], seed, cache, progress)),
        ("f", lambda: part_f(config["f"], seed, cache, progress)),
    ]
    for key, fn in progress_bar(parts, enabled=progress, desc="optimization"):
        if key in results["parts"]:
            continue
        t0 = time.perf_counter()
        results["parts"][key] = to_jsonable(fn())  # NaN / inf kept: flagged when written
        results.setdefault("timing", {})[key] = time.perf_counter() - t0
        results["summary"] = _summary(results["parts"])
        write_results(path, results)
        computed.append(key)
    return computed
