"""Settings of the generalization study: the hyperparameter grid per task, training, measures.

A population is built from *blocks*. Each block names a task, a base point (one value per
axis of :data:`AXES`), values to vary **one at a time** around the base, and values to vary
**jointly** (their full factorial, the other axes at the base). Jiang et al.'s granulated τ
needs, for each axis, groups of models that differ in that axis only; the one-at-a-time lines
give one such group per axis and the factorial gives many.

The ``lr`` axis is a *factor* on the optimizer's base learning rate (:data:`BASE_LR`), so
that one value means the same relative step for SGD, SGD with momentum and Adam.

Example
-------
>>> q = settings(True, 0)
>>> q["quick"], q["blocks"][0]["task"], sorted(q["blocks"][0]["base"]) == sorted(AXES)
(True, 'mnist1d', True)
"""

from __future__ import annotations

from typing import Any

__all__ = ["AXES", "BASE_LR", "FIGURES", "JSON_NAME", "MOMENTUM", "settings", "tiny_settings"]

#: The hyperparameter axes of the grid (every model records a value for each).
AXES = ("width", "depth", "lr", "batch_size", "weight_decay", "optimizer", "seed")
#: Base learning rate per optimizer; the ``lr`` axis multiplies it.
BASE_LR = {"sgd": 0.1, "momentum": 0.02, "adam": 3e-3}
#: Momentum of the ``"momentum"`` optimizer (SGD with heavy-ball momentum).
MOMENTUM = 0.9
#: File name of the results, under ``out_dir``.
JSON_NAME = "generalization.json"
#: The figures, under ``out_dir``.
FIGURES = (
    "generalization_scatter.png",
    "generalization_attacks.png",
    "generalization_optimizer_bias.png",
)
_VERSION = 3

_BIAS = {"method": "stochastic", "num_probes": 40,
         "ggn_measures": {"trace": "ggn_trace", "max_eig": "ggn_max_eig",
                          "effective_dimension": "ggn_effdim"}}
#: The measures attacked in the quick run (the full run attacks every measure).
_QUICK_ATTACKED = ("hess_trace", "hess_max_eig", "inv_trace", "inv_max_eig", "ggn_trace",
                   "ggn_effdim", "adaptive_sharpness_avg", "fisher_rao_norm", "l2_norm",
                   "distance_to_init", "path_norm")
#: The attacks of the full run: three reparametrizations (per-layer ``Scale``, weight norm
#: with ‖v‖ = c‖w‖, the elementwise chart θ = sinh(cψ)/c) and two symmetries.
_FULL_ATTACKS = ("reparametrization", "weight_norm", "elementwise", "layerwise_alpha",
                 "per_neuron")
#: The attacks of the quick run (one reparametrization, two symmetries: it must fit 3 min).
_QUICK_ATTACKS = ("reparametrization", "layerwise_alpha", "per_neuron")
_BASE = {"width": 16, "depth": 1, "lr": 1.0, "batch_size": 32, "weight_decay": 0.0,
         "optimizer": "sgd", "seed": 0}


def _block(task: str, one: dict[str, list[Any]], joint: dict[str, list[Any]],
           **base: Any) -> dict[str, Any]:
    return {"task": task, "base": {**_BASE, **base}, "one_at_a_time": one, "joint": joint}


def settings(quick: bool, seed: int) -> dict[str, Any]:
    """Every setting of the study (``quick`` or full), the seed, and a version number.

    ``seed`` shifts the ``seed`` axis (initialization and data order) and the data draws.
    """
    train = {"target_ce": 0.1, "max_epochs": 300, "measure_samples": 128}
    data = {"mnist1d": {"num_samples": 2000, "train_split": 0.5, "seed": seed},
            "digits": {"seed": seed}}
    if quick:
        blocks = [_block(
            "mnist1d",
            {"width": [4, 16], "depth": [2, 3], "lr": [0.5, 2.0], "batch_size": [16, 64],
             "weight_decay": [1e-3], "optimizer": ["momentum", "adam"], "seed": [1]},
            {"width": [8, 16], "optimizer": ["sgd", "adam"], "lr": [1.0, 2.0]},
            width=8,
        )]
        train = {"target_ce": 0.15, "max_epochs": 60, "measure_samples": 64}
        data["mnist1d"] = {"num_samples": 1000, "train_split": 0.5, "seed": seed}
    else:  # widths up to 16: every net (d ≤ 1482) stays under the measures' dense limit
        blocks = [
            _block(
                "mnist1d",
                {"width": [4, 8], "depth": [2, 3], "lr": [0.5, 2.0], "batch_size": [16, 64],
                 "weight_decay": [1e-4, 1e-3], "optimizer": ["momentum", "adam"],
                 "seed": [1, 2]},
                {"width": [8, 16], "depth": [1, 2], "lr": [0.5, 2.0], "batch_size": [16, 64],
                 "weight_decay": [0.0, 1e-3], "optimizer": ["sgd", "adam"]},
            ),
            _block(
                "digits",
                {"width": [4, 8], "depth": [2], "lr": [0.5, 2.0], "batch_size": [64],
                 "weight_decay": [1e-3], "optimizer": ["momentum", "adam"], "seed": [1]},
                {"width": [8, 16], "optimizer": ["sgd", "adam"], "lr": [0.5, 2.0]},
            ),
        ]
    # dense up to d = 1600: the largest net (d = 1482) in the weight-norm chart has d = 1524
    measures = {"names": None, "context": {"method": "auto", "dense_max_dim": 1600,
                                           "num_probes": 20}}
    attacks = {"kinds": list(_FULL_ATTACKS), "strengths": [0.1, 10.0], "measures": None}
    if quick:
        attacks["kinds"] = list(_QUICK_ATTACKS)
        attacks["measures"] = list(_QUICK_ATTACKED)
    return {"version": _VERSION, "quick": bool(quick), "seed": int(seed), "blocks": blocks,
            "train": train, "data": data, "axes": list(AXES),
            "base_lr": dict(BASE_LR), "momentum": MOMENTUM, "measures": measures,
            "attacks": attacks, "bias": _BIAS, "n_boot": 100 if quick else 500,
            "n_boot_grouped": 20 if quick else 50, "n_boot_pgdl": 10}


def tiny_settings(seed: int = 0) -> dict[str, Any]:
    """A population of four tiny models (width 8, 300 MNIST-1D examples), a few measures and
    one attack strength, for the tests: one line along ``optimizer`` and one along ``width``
    through the base."""
    cfg = settings(True, seed)
    cfg["blocks"] = [_block("mnist1d", {"width": [12], "optimizer": ["adam", "momentum"]}, {},
                            width=8)]
    cfg["train"] = {"target_ce": 0.3, "max_epochs": 30, "measure_samples": 32}
    cfg["data"]["mnist1d"] = {"num_samples": 300, "train_split": 0.5, "seed": seed}
    cfg["measures"]["names"] = ["hess_trace", "inv_trace", "ggn_trace", "ggn_max_eig",
                                "ggn_effdim", "l2_norm", "distance_to_init", "path_norm"]
    cfg["attacks"] = {"kinds": ["reparametrization", "layerwise_alpha", "per_neuron"],
                      "strengths": [10.0], "measures": ["hess_trace", "inv_trace",
                                                        "ggn_effdim", "l2_norm"]}
    cfg["n_boot"], cfg["n_boot_grouped"], cfg["n_boot_pgdl"] = 20, 5, 5
    return cfg
