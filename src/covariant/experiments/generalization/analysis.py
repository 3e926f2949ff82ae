r"""From per-model numbers to the study's tables: τ, granulated Ψ and PGDL per measure (with
bootstrap intervals), τ before / after each attack, and the optimizer-bias comparison.

Statistics are computed per task (a gap on MNIST-1D and a gap on digits are not comparable),
over the models that did not diverge and whose measure is finite.

Example
-------
>>> hps = [{"a": 0}, {"a": 1}, {"a": 2}]
>>> row = measure_row([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], hps, ["a"], n_boot=50, seed=0)
>>> row["tau"], row["Psi"], row["n"]
(1.0, 1.0, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .attacks import adversary
from .optimizer_bias import compare
from .statistics import bootstrap_ci, granulated_tau, kendall_tau, pgdl_score

__all__ = ["attack_table", "bias_table", "measure_row", "statistics_table"]


def measure_row(measure: Sequence[float], gap: Sequence[float],
                hyperparams: Sequence[Mapping[str, Any]], axes: Sequence[str], *,
                n_boot: int, seed: int, n_boot_grouped: int | None = None,
                n_boot_pgdl: int | None = None) -> dict[str, Any]:
    """τ, ψ per axis, Ψ and the PGDL score of one measure, each with a percentile-bootstrap
    interval over models (rows resampled jointly; ``n_boot`` replicates for τ,
    ``n_boot_grouped`` for Ψ and ``n_boot_pgdl`` for PGDL (O(n²) pairs per replicate), both
    ``n_boot`` by default)."""
    nb = n_boot if n_boot_grouped is None else n_boot_grouped
    nb_pgdl = n_boot if n_boot_pgdl is None else n_boot_pgdl
    m, g, hps = np.asarray(measure, float), np.asarray(gap, float), list(hyperparams)
    psi = granulated_tau(m, g, hps, axes)
    pgdl = pgdl_score(m, g, hps, axes)

    def psi_of(mm: Any, gg: Any, hh: Any) -> float:
        return granulated_tau(mm, gg, hh, axes)["Psi"]

    def pgdl_of(mm: Any, gg: Any, hh: Any) -> float:
        return pgdl_score(mm, gg, hh, axes)["score"]

    return {
        "n": int(m.size),
        "tau": kendall_tau(m, g),
        "tau_ci": list(bootstrap_ci(kendall_tau, m, g, n_boot=n_boot, seed=seed)),
        "psi": {a: psi[a] for a in axes},
        "Psi": psi["Psi"],
        "Psi_ci": list(bootstrap_ci(psi_of, m, g, hps, n_boot=nb, seed=seed)),
        "pgdl": pgdl["score"],
        "pgdl_pairs": pgdl["pairs"],
        "pgdl_ci": list(bootstrap_ci(pgdl_of, m, g, hps, n_boot=nb_pgdl, seed=seed)),
    }


def _usable(models: Sequence[Mapping[str, Any]], values: Mapping[str, Mapping[str, Any]],
            name: str) -> list[int]:
    return [i for i, r in enumerate(models)
            if not r["diverged"] and math.isfinite(values[r["id"]][name]["value"])]


def statistics_table(models: Sequence[Mapping[str, Any]],
                     values: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str],
                     axes: Sequence[str], *, n_boot: int, seed: int,
                     n_boot_grouped: int | None = None,
                     n_boot_pgdl: int | None = None) -> dict[str, Any]:
    """``{task: {measure: row}}`` (:func:`measure_row`, plus the measure's ``kind``)."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["hyperparameters"]["task"] for r in models):
        in_task = [r for r in models if r["hyperparameters"]["task"] == task]
        rows = {}
        for name, kind in kinds.items():
            idx = _usable(in_task, values, name)
            if len(idx) < 3:
                continue
            sel = [in_task[i] for i in idx]
            rows[name] = {"kind": kind, **measure_row(
                [values[r["id"]][name]["value"] for r in sel], [r["gap"] for r in sel],
                [r["hyperparameters"] for r in sel], axes, n_boot=n_boot, seed=seed,
                n_boot_grouped=n_boot_grouped, n_boot_pgdl=n_boot_pgdl)}
        out[task] = rows
    return out


def attack_table(models: Sequence[Mapping[str, Any]],
                 values: Mapping[str, Mapping[str, Any]],
                 attacked: Mapping[str, Mapping[str, Any]], names: Sequence[str],
                 kinds: Sequence[str], strengths: Sequence[float]) -> dict[str, Any]:
    """``{task: {measure: {attack: AdversaryResult.to_dict()}}}``: the adversary picks one
    strength per model (or none) from the cached attacked values."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["hyperparameters"]["task"] for r in models):
        in_task = [r for r in models if r["hyperparameters"]["task"] == task]
        rows: dict[str, Any] = {}
        for name in names:
            sel = [in_task[i] for i in _usable(in_task, values, name)]
            if len(sel) < 3:
                continue
            gap = [r["gap"] for r in sel]
            base = [values[r["id"]][name]["value"] for r in sel]
            rows[name] = {}
            for kind in kinds:
                def table(i: int, c: float, kind: str = kind, name: str = name,
                          sel: list[Mapping[str, Any]] = sel) -> float:
                    value = attacked[sel[i]["id"]][kind][repr(float(c))][name]
                    return math.nan if value is None else value  # undefined: never picked

                res = adversary(table, gap, list(strengths), base).to_dict()
                rows[name][kind] = res
        out[task] = rows
    return out


def bias_table(models: Sequence[Mapping[str, Any]], sharp: Mapping[str, Mapping[str, Any]],
               values: Mapping[str, Mapping[str, Any]], ggn_measures: Mapping[str, str], *,
               n_boot: int, seed: int) -> dict[str, Any]:
    """``{task: {metric: {quantity: compare(...)}}}`` over the models that did not diverge:
    Euclidean and own-metric sharpness from ``sharp``, the GGN metric from the function-metric
    measures named in ``ggn_measures`` (quantity → measure name)."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["hyperparameters"]["task"] for r in models):
        sel = [r for r in models if r["hyperparameters"]["task"] == task and not r["diverged"]]
        opts = [r["hyperparameters"]["optimizer"] for r in sel]
        if "adam" not in opts or not ({"sgd", "momentum"} & set(opts)):
            continue
        res: dict[str, Any] = {}
        for metric in ("euclidean", "own"):
            quantities = ("trace", "max_eig") + (("lr_max_eig",) if metric == "own" else ())
            res[metric] = {q: compare(opts, [sharp[r["id"]][metric][q] for r in sel],
                                      n_boot=n_boot, seed=seed) for q in quantities}
        res["ggn"] = {q: compare(opts, [values[r["id"]][name]["value"] for r in sel],
                                 n_boot=n_boot, seed=seed)
                      for q, name in ggn_measures.items()}
        out[task] = res
    return out
