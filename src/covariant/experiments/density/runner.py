"""Run the density experiment part by part: each finished part is checkpointed to
``density_parts/<part>.json`` (so a killed run resumes where it stopped) and drawn to
``density_<part>.png``; the whole lot is written to ``density.json``.

Every file is strict JSON (:func:`covariant._io.dumps_json`): a non-finite number, such as the
−inf evidence of a λ where the precision is not positive definite, is written as ``null`` and
flagged under the top-level key ``"nonfinite"``; a resumed run reads the parts back with
:func:`covariant._io.read_json`, which restores it, so its figures and results are those of an
uninterrupted run.

Example
-------
>>> _summary({"lognormal": {"classic_mode": 0.87, "riemannian_mode": 1.65,
...                         "analytic_classic": 0.87, "analytic_riemannian": 1.65}})
{'lognormal_modes': {'classic': 0.87, 'riemannian': 1.65, 'analytic': [0.87, 1.65]}}
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._io import atomic_write_json, read_json, to_jsonable
from ..._progress import progress_bar
from .common import threads
from .evidence import part_evidence, plot_evidence
from .lognormal import part_lognormal, plot_lognormal
from .map2d import part_map2d, plot_map2d
from .mlp import part_mlp, plot_mlp
from .prior import part_prior, plot_prior

__all__ = ["PARTS", "run"]

PARTS = ("lognormal", "map2d", "mlp", "evidence", "prior")


def _summary(parts: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "lognormal" in parts:
        a = parts["lognormal"]
        s["lognormal_modes"] = {"classic": a["classic_mode"], "riemannian": a["riemannian_mode"],
                                "analytic": [a["analytic_classic"], a["analytic_riemannian"]]}
    if "map2d" in parts:
        s["map2d_shifts"] = {k: {"classic": v["classic_shift"],
                                 "riemannian": v["riemannian_shift"]}
                             for k, v in parts["map2d"]["charts"].items()}
    if "mlp" in parts:
        s["mlp"] = [{k: row[k] for k in ("method", "test_accuracy", "test_nll",
                                          "rel_distance_to_map_w")}
                    for row in parts["mlp"]["table"]]
    if "evidence" in parts:
        s["evidence_spread"] = {k: {"classic": v["classic_spread"],
                                    "invariant": v["invariant_spread"]}
                                for k, v in parts["evidence"].items()
                                if isinstance(v, dict) and "classic_spread" in v}
    if "prior" in parts:
        s["prior_lambda_ratio"] = {k: {"classic": v["classic_lambda_ratio"],
                                       "invariant": v["invariant_lambda_ratio"]}
                                   for k, v in parts["prior"].items() if isinstance(v, dict)
                                   and "charts" in v}
    return s


def run(out_dir: str | os.PathLike[str], *, quick: bool = False, seed: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Run parts (a)–(e); write JSON and PNG under ``out_dir``; return the results.

    Parameters
    ----------
    out_dir : path
        Output folder (created). Each finished part is checkpointed to
        ``density_parts/<part>.json``; a rerun with the same ``quick`` and ``seed`` reuses
        them, so a killed run resumes.
    quick : bool
        Smaller problems and fewer charts (well under a minute; used by the tests).
    seed : int
        Seed of data splits, initializations and probes.
    progress : bool
        Progress bars (tqdm, if installed).

    Returns
    -------
    dict
        ``{"config", "parts": {name: result}, "summary", "files"}``, also written to
        ``density.json``.
    """
    out = Path(out_dir)
    ckpt = out / "density_parts"
    ckpt.mkdir(parents=True, exist_ok=True)
    config = {"quick": bool(quick), "seed": int(seed)}
    runners: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict, Path], None]]] = {
        "lognormal": (lambda: part_lognormal(quick, seed), plot_lognormal),
        "map2d": (lambda: part_map2d(quick, seed), plot_map2d),
        "mlp": (lambda: part_mlp(quick, seed, progress), plot_mlp),
        "evidence": (lambda: part_evidence(quick, seed), plot_evidence),
        "prior": (lambda: part_prior(quick, seed, progress), plot_prior),
    }
    parts: dict[str, Any] = {}
    files: list[str] = []
    timings: dict[str, float] = {}
    for name in progress_bar(PARTS, enabled=progress, desc="density"):
        path = ckpt / f"{name}.json"
        result = None
        if path.exists():
            try:
                saved = read_json(path)
                if saved.get("config") == config:
                    result = saved["result"]
                    timings[name] = saved.get("time_s", 0.0)
            except (OSError, ValueError, KeyError, AttributeError):
                result = None
        if result is None:
            t0 = time.time()
            with threads(1):
                result = runners[name][0]()
            result = to_jsonable(result)
            timings[name] = time.time() - t0
            atomic_write_json(path, {"config": config, "result": result, "time_s": timings[name]})
        png = out / f"density_{name}.png"
        runners[name][1](result, png)
        files.append(str(png))
        parts[name] = result
    final = {"config": config, "parts": parts, "summary": _summary(parts),
             "timings_s": timings, "files": [*files, str(out / "density.json")]}
    atomic_write_json(out / "density.json", final)
    return final
