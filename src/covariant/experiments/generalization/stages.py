r"""The per-model stages of the generalization study, each cached in one JSON file per model
(written atomically, reused when its settings match): the measures, the measures under every
attack and strength, and the optimizer-bias sharpness.

Files under ``out_dir``: ``measures/<id>.json``, ``attacks/<id>.<kind>.json``,
``sharpness/<id>.json``; each holds ``{"key": <the settings it was computed with>, ...}``,
and a file whose key differs is recomputed. Wall times go to ``"seconds"`` in each file, and
the runner keeps them out of the results' comparable part.

Example
-------
>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "m.json"
>>> cached_json(path, {"a": 1}, lambda: {"value": 2.0})["value"]
2.0
>>> cached_json(path, {"a": 1}, lambda: {"value": 3.0})["value"]   # reused: same key
2.0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._io import atomic_write_json, read_json, to_jsonable
from ...errors import CovariantError
from ...zoo.data import Dataset
from .attacks import attack
from .measures import MEASURES, MeasureContext, default_names, evaluate
from .optimizer_bias import model_sharpness
from .population import load_adam_state, load_model

__all__ = ["attack_values", "cached_json", "measure_data", "measure_values", "sharpness_values"]


def cached_json(path: Path, key: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The dict stored at ``path`` if it was made with ``key``; else ``compute()``, stored with
    ``key`` (and its wall time under ``"seconds"``) atomically, and returned."""
    key = to_jsonable(key, nonfinite="string")
    if path.exists():
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("key") == key:
            return old
    t0 = time.perf_counter()
    result = to_jsonable(compute())
    result["key"] = key
    result["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=1)
    return read_json(path)


def measure_data(data: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training examples in float64: the data every measure sees."""
    return data.X_train[:n].to(torch.float64), data.y_train[:n]


def _context(out: Path, record: Mapping[str, Any], cfg: Mapping[str, Any],
             chart: Any = None) -> MeasureContext:
    init = load_model(out, record, "init", torch.float64)
    return MeasureContext(init={k: v.detach() for k, v in init.state_dict().items()},
                          chart=chart, seed=int(cfg["seed"]), **cfg["measures"]["context"])


def _values(model: nn.Module, data: Any, ctx: MeasureContext,
            names: Any) -> dict[str, dict[str, Any]]:
    return {k: v.to_dict() for k, v in evaluate(model, data, ctx, names).items()}


def _values_where_defined(model: nn.Module, data: Any, ctx: MeasureContext, names: Any
                          ) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each measure's value, or None where it is undefined at this point in this chart (a
    :class:`~covariant.errors.CovariantError`, e.g. a weight-norm chart at a dead unit, whose
    weight row is 0: the pulled-back metric is singular there); the reasons by measure."""
    names = default_names(ctx) if names is None else names
    values: dict[str, float | None] = {}
    why: dict[str, str] = {}
    for name in names:
        try:
            values[name] = float(MEASURES[name](model, data, ctx).value)
        except CovariantError as err:
            values[name], why[name] = None, f"{type(err).__name__}: {err}"[:300]
    return values, why


def measure_values(out: Path, record: Mapping[str, Any], data: Any,
                   cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every measure of one trained model (cached in ``measures/<id>.json``)."""
    mcfg = cfg["measures"]
    key = {"record": record["id"], "measures": mcfg, "seed": cfg["seed"],
           "train": record["train"], "data": record["data"]}

    def compute() -> dict[str, Any]:
        model = load_model(out, record, dtype=torch.float64)
        return {"values": _values(model, data, _context(out, record, cfg), mcfg["names"])}

    return cached_json(out / "measures" / f"{record['id']}.json", key, compute)


def attack_values(out: Path, record: Mapping[str, Any], data: Any,
                  cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The measures of one model after each attack kind and strength:
    ``{"values": {kind: {strength: {measure: value}}}, "seconds": total}``.

    Each kind is cached in its own file, ``attacks/<id>.<kind>.json``, so that adding a kind
    to the settings computes only that kind."""
    acfg = cfg["attacks"]
    table: dict[str, Any] = {}
    seconds = 0.0
    for kind in acfg["kinds"]:
        key = {"record": record["id"], "measures": cfg["measures"], "kind": kind,
               "strengths": acfg["strengths"], "attacked": acfg["measures"],
               "seed": cfg["seed"], "train": record["train"], "data": record["data"]}

        def compute(kind: str = kind) -> dict[str, Any]:
            model = load_model(out, record, dtype=torch.float64)
            seed = int(cfg["seed"]) + int(record["init_seed"])  # per-neuron scales per model
            by_strength: dict[str, dict[str, float | None]] = {}
            undefined: dict[str, dict[str, str]] = {}
            for c in acfg["strengths"]:
                attacked, chart = attack(kind, model, c, seed=seed)
                ctx = _context(out, record, cfg, chart)  # the init is not attacked
                vals, why = _values_where_defined(attacked, data, ctx, acfg["measures"])
                by_strength[repr(float(c))] = vals
                if why:
                    undefined[repr(float(c))] = why
            return {"values": by_strength, "undefined": undefined}

        cached = cached_json(out / "attacks" / f"{record['id']}.{kind}.json", key, compute)
        table[kind] = cached["values"]
        seconds += float(cached["seconds"])
    return {"values": table, "seconds": seconds}


def sharpness_values(out: Path, record: Mapping[str, Any], data: Any,
                     cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer-bias sharpness of one model in the Euclidean metric and its optimizer's
    own metric (cached in ``sharpness/<id>.json``)."""
    bcfg = cfg["bias"]
    key = {"record": record["id"], "bias": bcfg, "seed": cfg["seed"], "train": record["train"],
           "data": record["data"]}

    def compute() -> dict[str, Any]:
        model = load_model(out, record, dtype=torch.float64)
        hp = record["hyperparameters"]
        return {"values": model_sharpness(
            model, data, hp["optimizer"], record["actual_lr"], load_adam_state(out, record),
            method=bcfg["method"], num_probes=bcfg["num_probes"], seed=int(cfg["seed"]))}

    return cached_json(out / "sharpness" / f"{record['id']}.json", key, compute)
