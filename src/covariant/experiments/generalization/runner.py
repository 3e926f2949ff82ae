r"""Run the generalization study end to end, resumably, and draw its figures.

Stages: the population (:mod:`.population`, one record per model) → the measures of each
model, the measures under each attack and strength, and the optimizer-bias sharpness
(:mod:`.stages`, one cached file per model and stage) → the statistics, the adversary and the
optimizer-bias comparison (:mod:`.analysis`, cheap, recomputed on every run) → figures
(:mod:`.figures`) → ``generalization.json``. A killed run loses at most the model (and the
stage) it was working on; rerunning with the same settings redoes only the rest. Wall times
are kept under ``"timing"``, the one part of the results that differs between two runs.

Example
-------
>>> rows = format_table({"summary": {"task": "t", "n_models": 3, "table": {"l2_norm": {
...     "kind": "baseline", "tau": 0.5, "tau_ci": [0.1, 0.9], "Psi": 0.25, "pgdl": 0.1,
...     "after": {"per_neuron": -0.5}}}}}).splitlines()
>>> rows[2].split()[:5]
['l2_norm', 'baseline', '+0.50', '[+0.10,+0.90]', '+0.25']
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write_json, to_jsonable
from ..._progress import progress_bar
from ...errors import require
from .analysis import attack_table, bias_table, statistics_table
from .figures import plot_attacks, plot_bias, plot_scatter
from .measures import MEASURES
from .population import load_data, train_population
from .settings import JSON_NAME, settings
from .stages import attack_values, measure_data, measure_values, sharpness_values

__all__ = ["format_table", "run"]

_MODEL_KEYS = ("id", "hyperparameters", "actual_lr", "num_params", "epochs", "reached_target",
               "diverged", "train_acc", "test_acc", "train_loss", "test_loss", "gap",
               "gap_loss", "init_seed")


def run(
    out_dir: str | os.PathLike[str],
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the generalization study; write ``generalization.json`` and PNGs under ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Output folder (created). Models, per-model measures, attacked measures and sharpness
        are cached under it as they finish; a rerun with the same settings reuses them.
    quick : bool
        About 16 models on MNIST-1D (a few minutes on 2 CPU cores) instead of the full
        population (about 100 models on MNIST-1D and digits).
    seed : int
        Seed of the data draws, the seed axis, and every random probe.
    progress : bool
        Progress bars (needs tqdm).
    config : mapping, optional
        A complete settings dict instead of :func:`.settings.settings` (e.g.
        :func:`.settings.tiny_settings` in the tests).

    Returns
    -------
    dict
        ``{"experiment", "settings", "models", "measures", "statistics", "attacks",
        "optimizer_bias", "sharpness", "summary", "figures", "timing"}``, as written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = to_jsonable(dict(config) if config is not None else settings(bool(quick), int(seed)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add synchronization
    try:
        results = _compute(out, cfg, progress)
    finally:
        torch.set_num_threads(threads)
    path = out / JSON_NAME
    atomic_write_json(path, results, indent=1)
    results["figures"] = _plots(results, out)
    atomic_write_json(path, results, indent=1)
    return to_jsonable(results, nonfinite="null")


def _compute(out: Path, cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Every stage; the results dict (without figures)."""
    t0 = time.perf_counter()
    records = train_population(out, cfg, progress=progress)
    t_train = time.perf_counter() - t0
    data: dict[str, Any] = {}
    values: dict[str, Any] = {}
    attacked: dict[str, Any] = {}
    sharp: dict[str, Any] = {}
    seconds: dict[str, dict[str, float]] = {}
    live = [r for r in records if not r["diverged"]]
    for rec in progress_bar(live, enabled=progress, desc="measures"):
        task = rec["hyperparameters"]["task"]
        if task not in data:
            data[task] = measure_data(load_data(task, cfg["data"]),
                                      cfg["train"]["measure_samples"])
        m = measure_values(out, rec, data[task], cfg)
        a = attack_values(out, rec, data[task], cfg)
        s = sharpness_values(out, rec, data[task], cfg)
        values[rec["id"]] = {k: {"value": v["value"], "stderr": v["stderr"]}
                             for k, v in m["values"].items()}
        attacked[rec["id"]] = a["values"]
        sharp[rec["id"]] = s["values"]
        seconds[rec["id"]] = {"train": rec.get("seconds", math.nan), "measures": m["seconds"],
                              "attacks": a["seconds"], "sharpness": s["seconds"]}
    t_stages = time.perf_counter() - t0 - t_train
    models = [{k: r[k] for k in _MODEL_KEYS} for r in records]
    names = [n for n in MEASURES if all(n in values[r["id"]] for r in live)]
    kinds = {n: MEASURES[n].kind for n in names}
    acfg = cfg["attacks"]
    attack_names = [n for n in names if acfg["measures"] is None or n in acfg["measures"]]
    results: dict[str, Any] = {
        "experiment": "generalization", "settings": cfg, "models": models,
        "measures": values,
        "statistics": statistics_table(live, values, kinds, cfg["axes"],
                                       n_boot=cfg["n_boot"], seed=cfg["seed"],
                                       n_boot_grouped=cfg["n_boot_grouped"],
                                       n_boot_pgdl=cfg["n_boot_pgdl"]),
        "attacks": attack_table(live, values, attacked, attack_names, acfg["kinds"],
                                acfg["strengths"]),
        "optimizer_bias": bias_table(live, sharp, values, cfg["bias"]["ggn_measures"],
                                     n_boot=cfg["n_boot"], seed=cfg["seed"]),
        "sharpness": sharp,
    }
    results["summary"] = _summary(results)
    t_analysis = time.perf_counter() - t0 - t_train - t_stages
    # the compute of the whole study, also when it was resumed: every model's stages as
    # recorded when they ran (cached with their results), plus this run's analysis
    stage_sums = {stage: math.fsum(s[stage] for s in seconds.values()
                                   if math.isfinite(s[stage]))
                  for stage in ("train", "measures", "attacks", "sharpness")}
    results["timing"] = {"train_s": t_train, "per_model_stages_s": t_stages,
                         "analysis_s": t_analysis,
                         "total_s": time.perf_counter() - t0, "per_model": seconds,
                         "recorded_stage_s": stage_sums,
                         "recorded_total_s": math.fsum(stage_sums.values()) + t_analysis}
    return results


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline table of the first task: τ (interval), Ψ, PGDL, τ after each attack; and
    the optimizer-bias ratios."""
    task = results["models"][0]["hyperparameters"]["task"]
    stats = results["statistics"].get(task, {})
    attacks = results["attacks"].get(task, {})
    table = {
        name: {"kind": row["kind"], "tau": row["tau"], "tau_ci": row["tau_ci"],
               "Psi": row["Psi"], "pgdl": row["pgdl"],
               "after": {k: v["tau_after"] for k, v in attacks.get(name, {}).items()},
               "max_rel_change": {k: v["max_rel_change"]
                                  for k, v in attacks.get(name, {}).items()}}
        for name, row in stats.items()
    }
    bias = {f"{metric}.{q}": {"adam_over_sgd": r.get("ratio_adam_over_sgd"),
                              "ci": r.get("ratio_ci"), "adam_sharper": r.get("adam_sharper")}
            for metric, qs in results["optimizer_bias"].get(task, {}).items()
            for q, r in qs.items()}
    n = sum(m["hyperparameters"]["task"] == task for m in results["models"])
    return {"task": task, "n_models": n, "table": table, "optimizer_bias": bias}


def _fmt(x: Any) -> str:
    """A signed number with two decimals; ``-`` for a value not computed (None)."""
    if x is None:
        return "-"
    return "nan" if not math.isfinite(float(x)) else f"{float(x):+.2f}"


def format_table(results: Mapping[str, Any]) -> str:
    """The τ / Ψ / PGDL table of the summary (τ after each attack in the last columns), and
    the optimizer-bias ratios, as text."""
    s = results["summary"]
    table = s["table"]
    attacks = list(next(iter(table.values()), {}).get("after", {}))
    head = (f"{'measure':26s} {'kind':16s} {'tau':>6s} {'tau 95% CI':15s} {'Psi':>6s} "
            f"{'PGDL':>6s} " + " ".join(f"{'τ|' + a[:9]:>11s}" for a in attacks))
    lines = [f"generalization ({s['task']}, {s['n_models']} models): Kendall τ(measure, gap)",
             head]
    for name, row in table.items():
        ci = "[" + ",".join(_fmt(v) for v in row["tau_ci"]) + "]"
        lines.append(f"{name:26s} {row['kind']:16s} {_fmt(row['tau']):>6s} {ci:15s} "
                     f"{_fmt(row['Psi']):>6s} {_fmt(row['pgdl']):>6s} "
                     + " ".join(f"{_fmt(row['after'].get(a)):>11s}" for a in attacks))
    if s.get("optimizer_bias"):
        lines.append("optimizer bias: median(Adam) / median(SGD) [95% CI]")
        for key, r in s["optimizer_bias"].items():
            ci = r["ci"] or [math.nan, math.nan]
            lines.append(f"  {key:28s} {r['adam_over_sgd'] or math.nan:8.3g} "
                         f"[{ci[0]:.3g}, {ci[1]:.3g}]  adam sharper: {r['adam_sharper']}")
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    """Every figure of the first task."""
    plt = require("matplotlib.pyplot", "plots")
    plt.switch_backend("Agg")
    task = results["summary"]["task"]
    return [plot_scatter(results, task, out, plt), plot_attacks(results, task, out, plt),
            plot_bias(results, task, out, plt)]
