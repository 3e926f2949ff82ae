r"""The population of trained networks of the generalization study (issue 14, part 1).

**Grid.** :func:`grid` expands the blocks of :mod:`.settings`: per block, the base point, each
axis varied one at a time around it, and the full factorial of the ``joint`` axes (duplicates
kept once, in that order). :func:`axis_groups` returns, for one axis, the groups of models that
agree on every other axis (and the task): the groups Jiang et al.'s granulated τ averages over.

**Training.** ReLU MLPs (:class:`covariant.zoo.architectures.MLP`, ``hidden = [width] * depth``)
in float32, mini-batch SGD, SGD with momentum or Adam, with L2 weight decay (PyTorch's
``weight_decay``, added to the gradient), until the full-batch train cross-entropy is at most
``target_ce`` or ``max_epochs`` epochs have run (``reached_target`` records which). The
initialization is seeded by the ``seed`` axis (:func:`init_seed`; models that differ only in
lr, batch size, weight decay or optimizer start from the same weights), the data order by the
same seed.

**Generalization gap** (Jiang et al. 2020): ``gap = train accuracy − test accuracy``, i.e. the
test error minus the train error. The loss gap ``test CE − train CE`` is recorded as
``gap_loss``.

**Files**, under ``<out>/models/``, one set per model id, each written atomically:
``<id>.pt`` (the trained model, :func:`covariant.zoo.checkpoints.save_checkpoint`, loads with
``weights_only=True``), ``<id>.init.pt`` (its initialization), ``<id>.adam.pt`` (Adam only:
the optimizer's final ``state_dict()``, with ``exp_avg_sq`` and ``step``; it builds
:class:`covariant.metrics.AdamMetric` directly) and, last, ``<id>.json`` (the record). A model
whose record exists with the same hyperparameters, training and data settings is finished and
is skipped, so a killed run loses at most the model it was training.

Example
-------
>>> hps = grid([{"task": "t", "base": {"a": 0, "b": 0}, "one_at_a_time": {"a": [1, 2]},
...              "joint": {"a": [0, 1], "b": [0, 1]}}])
>>> [(h["a"], h["b"]) for h in hps]
[(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
>>> [[(hps[i]["a"], hps[i]["b"]) for i in g] for g in axis_groups(hps, "a", ("a", "b"))]
[[(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1)]]
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._io import atomic_save_torch, atomic_write_json, read_json
from ..._progress import progress_bar
from ...zoo.architectures import MLP
from ...zoo.checkpoints import load_checkpoint, save_checkpoint
from ...zoo.data import Dataset, load_digits, load_mnist1d

__all__ = [
    "axis_groups",
    "build_model",
    "evaluate",
    "grid",
    "init_seed",
    "load_adam_state",
    "load_data",
    "load_model",
    "model_id",
    "train_model",
    "train_population",
]


def grid(blocks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The hyperparameters of every model: per block the base, the one-at-a-time variants,
    then the joint factorial; each point once, in first-seen order. Each dict holds ``task``
    and one value per axis."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()

    def add(hp: dict[str, Any]) -> None:
        key = tuple(sorted((k, repr(v)) for k, v in hp.items()))
        if key not in seen:
            seen.add(key)
            out.append(hp)

    for block in blocks:
        base = {"task": block["task"], **block["base"]}
        add(dict(base))
        for axis, values in block["one_at_a_time"].items():
            for v in values:
                add({**base, axis: v})
        joint = block["joint"]
        for combo in itertools.product(*joint.values()):
            add({**base, **dict(zip(joint, combo, strict=True))})
    return out


def axis_groups(hps: Sequence[Mapping[str, Any]], axis: str,
                axes: Sequence[str]) -> list[list[int]]:
    """Indices of the models that agree on the task and every axis but ``axis``, for each such
    group of at least two models that differ in ``axis``; groups in first-seen order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, hp in enumerate(hps):
        key = (hp.get("task"), *(repr(hp[a]) for a in axes if a != axis))
        groups.setdefault(key, []).append(i)
    return [g for g in groups.values()
            if len(g) >= 2 and len({repr(hps[i][axis]) for i in g}) >= 2]


def model_id(hp: Mapping[str, Any]) -> str:
    """A readable, file-name-safe id, unique per hyperparameter point."""
    return (f"{hp['task']}-w{hp['width']}-d{hp['depth']}-lr{hp['lr']:g}-b{hp['batch_size']}"
            f"-wd{hp['weight_decay']:g}-{hp['optimizer']}-s{hp['seed']}")


def init_seed(hp: Mapping[str, Any]) -> int:
    """The seed of a model's initialization: a function of the task, architecture and seed
    axis only, so that models differing in the optimization axes share their start."""
    return zlib.crc32(f"{hp['task']}|{hp['width']}|{hp['depth']}|{hp['seed']}".encode())


def load_data(task: str, data_cfg: Mapping[str, Any]) -> Dataset:
    """The task's dataset (float32), generated or bundled, never downloaded."""
    cfg = dict(data_cfg[task])
    if task == "mnist1d":
        return load_mnist1d(cfg["num_samples"], seed=cfg["seed"],
                            train_split=cfg["train_split"])
    if task == "digits":
        return load_digits(seed=cfg["seed"])
    raise ValueError(f"unknown task {task!r}; choose 'mnist1d' or 'digits'")


def _optimizer(hp: Mapping[str, Any], params: Any, base_lr: Mapping[str, float],
               momentum: float) -> torch.optim.Optimizer:
    name = hp["optimizer"]
    lr = float(base_lr[name]) * float(hp["lr"])
    wd = float(hp["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd', 'momentum' or 'adam'")


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(X, y)``, full batch."""
    logits = model(X.to(next(model.parameters()).dtype))
    return (float((logits.argmax(-1) == y).double().mean()),
            float(F.cross_entropy(logits.double(), y)))


def build_model(hp: Mapping[str, Any], in_features: int, num_classes: int) -> nn.Module:
    """The float32 ReLU MLP of ``hp`` at its initialization (seeded by :func:`init_seed`,
    drawn in float32 whatever the default dtype; the global RNG is left untouched)."""
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(hp))
            return MLP(in_features, num_classes, hidden=[int(hp["width"])] * int(hp["depth"]),
                       activation="relu")
    finally:
        torch.set_default_dtype(old)


def train_model(hp: Mapping[str, Any], data: Dataset, cfg: Mapping[str, Any]
                ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Train one model: ``(model, init, optimizer, log)``; ``log`` has ``epochs``,
    ``reached_target``, ``diverged`` and the per-epoch train cross-entropy ``train_ce``."""
    train = cfg["train"]
    model = build_model(hp, data.num_features, data.num_classes)
    init = copy.deepcopy(model)
    opt = _optimizer(hp, model.parameters(), cfg["base_lr"], cfg["momentum"])
    order_gen = torch.Generator().manual_seed(int(hp["seed"]))
    X, y = data.X_train, data.y_train
    curve: list[float] = []
    reached = diverged = False
    for _ in range(int(train["max_epochs"])):
        model.train()
        for idx in torch.split(torch.randperm(len(X), generator=order_gen), hp["batch_size"]):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        ce = evaluate(model.eval(), X, y)[1]
        curve.append(ce)
        if not math.isfinite(ce):
            diverged = True
            break
        if ce <= train["target_ce"]:
            reached = True
            break
    model.eval()
    log = {"epochs": len(curve), "reached_target": reached, "diverged": diverged,
           "train_ce": curve}
    return model, init, opt, log


def _record(hp: Mapping[str, Any], cfg: Mapping[str, Any], model: nn.Module, data: Dataset,
            log: Mapping[str, Any], files: Mapping[str, str]) -> dict[str, Any]:
    train_acc, train_loss = evaluate(model, data.X_train, data.y_train)
    test_acc, test_loss = evaluate(model, data.X_test, data.y_test)
    return {
        "id": model_id(hp), "hyperparameters": dict(hp), "init_seed": init_seed(hp),
        "actual_lr": float(cfg["base_lr"][hp["optimizer"]]) * float(hp["lr"]),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train": dict(cfg["train"]), "data": dict(cfg["data"][hp["task"]]),
        "epochs": log["epochs"], "reached_target": log["reached_target"],
        "diverged": log["diverged"], "train_ce_curve": log["train_ce"],
        "train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss,
        "test_loss": test_loss, "gap": train_acc - test_acc, "gap_loss": test_loss - train_loss,
        "files": dict(files),
    }


def _finished(path: Path, hp: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` if it belongs to ``hp`` trained with ``cfg``, and its files exist."""
    if not path.exists():
        return None
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        return None
    same = (rec.get("hyperparameters") == dict(hp) and rec.get("train") == dict(cfg["train"])
            and rec.get("data") == dict(cfg["data"][hp["task"]]))
    if not same or not all((path.parent / f).exists() for f in rec.get("files", {}).values()):
        return None
    return rec


def train_population(out: Path, cfg: Mapping[str, Any], *, progress: bool = False
                     ) -> list[dict[str, Any]]:
    """Train every model of the grid not yet finished under ``out/models``; return all records
    in grid order."""
    folder = Path(out) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, Dataset] = {}
    records = []
    for hp in progress_bar(grid(cfg["blocks"]), enabled=progress, desc="train"):
        mid = model_id(hp)
        rec = _finished(folder / f"{mid}.json", hp, cfg)
        if rec is None:
            if hp["task"] not in datasets:
                datasets[hp["task"]] = load_data(hp["task"], cfg["data"])
            data = datasets[hp["task"]]
            t0 = time.perf_counter()
            model, init, opt, log = train_model(hp, data, cfg)
            files = {"checkpoint": f"{mid}.pt", "init": f"{mid}.init.pt"}
            meta = {"id": mid, "hyperparameters": dict(hp)}
            save_checkpoint(folder / files["checkpoint"], model, metadata=meta)
            save_checkpoint(folder / files["init"], init, metadata=meta)
            if hp["optimizer"] == "adam":
                files["adam_state"] = f"{mid}.adam.pt"
                atomic_save_torch(folder / files["adam_state"], opt.state_dict())
            rec = _record(hp, cfg, model, data, log, files)
            rec["seconds"] = time.perf_counter() - t0
            atomic_write_json(folder / f"{mid}.json", rec, indent=1)
        records.append(rec)
    return records


def load_model(out: Path, record: Mapping[str, Any], which: str = "checkpoint",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a record (``which="checkpoint"``) or its initialization (``"init"``),
    read with ``weights_only=True``, in ``dtype``."""
    model, _ = load_checkpoint(Path(out) / "models" / record["files"][which])
    return model.to(dtype)


def load_adam_state(out: Path, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The saved Adam ``state_dict()`` of a record (``None`` for SGD models), loaded with
    ``weights_only=True``; pass it to :class:`covariant.metrics.AdamMetric`."""
    name = record["files"].get("adam_state")
    if name is None:
        return None
    return torch.load(Path(out) / "models" / name, weights_only=True)
