"""K-FAC natural gradient vs SGD vs Adam on MNIST-1D with a 1-D CNN (issue 12's training row).

Steps and wall-clock seconds to 90% test accuracy, each optimizer with its own learning rate
tuned on a small grid. One CPU thread, fixed seeds, mini-batches.

Protocol
--------
- Data: MNIST-1D generated locally by the ``mnist1d`` package (``covariant.zoo.data.
  load_mnist1d(5000, seed=42)``: the published 4000 / 1000 split, no download). The last
  500 training examples are held out as a validation set for tuning; the models train on the
  other 3500, and the reported accuracy is on the 1000 test examples.
- Model: ``covariant.zoo.architectures.CNN1D(40, 10, channels=(32, 32, 32), kernel_size=5,
  stride=2)`` (three Conv1d + ReLU, flatten, one Linear; 12,106 parameters), float32.
- Optimizers: ``torch.optim.SGD`` (momentum 0.9), ``torch.optim.Adam`` (default betas) and
  ``covariant.optim.RiemannianGD(metric="kfac")`` (K-FAC natural gradient, type-2 factors on
  each step's mini-batch, refreshed every ``--kfac-every`` steps with the default running
  average, momentum 0.9) with exact damping K + λI (``kfac``) and with K-FAC's factored
  Tikhonov damping (``kfac-factored``, ``kfac_damping="factored"``), mini-batches of 100,
  shuffled by the run's seed.
- Tuning: each point of the optimizer's grid (:data:`GRIDS`: learning rates; for K-FAC
  (learning rate, damping) pairs) is run with seed 0 against 90% *validation* accuracy; the
  chosen point reaches it in the fewest steps (if none reaches it, the one with the best
  validation accuracy). The grid and the choice are recorded.
- Measurement: the chosen rate, seeds 1..``--repeats``, evaluated every ``--eval-every``
  steps on the test set; a run stops when it reaches 90% test accuracy or after
  ``--budget-steps`` steps. Wall-clock counts the training steps only (forward, backward,
  optimizer step, K-FAC refreshes included), not the evaluations. Medians over seeds; a run
  that misses the target counts as not reached and its best accuracy is recorded. The
  optimizers' runs are interleaved seed by seed, and their cost per step is also timed side by
  side in short round-robin chunks (``ms/step*``), since a shared machine's load changes
  during the long runs.

Usage::

    python benchmarks/bench_kfac_training.py            # the full run (< 10 min, 1 core)
    python benchmarks/bench_kfac_training.py --quick    # smoke run (~1 min)

Writes ``benchmarks/results/kfac_training_cpu.json`` atomically (``--out`` to change it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covariant._io import atomic_write_json
from covariant.errors import NonFiniteError, SingularMetricError
from covariant.optim import RiemannianGD
from covariant.zoo.architectures import CNN1D, num_parameters
from covariant.zoo.data import load_mnist1d

#: Hyperparameter grids: learning rates, and for K-FAC (learning rate, damping) pairs (with
#: mini-batches the damping bounds the step g/λ along directions the factors see as flat, so it
#: is tuned with the learning rate).
GRIDS: dict[str, list[dict[str, float]]] = {
    "sgd": [{"lr": lr} for lr in (0.01, 0.03, 0.05, 0.1, 0.2, 0.3)],
    "adam": [{"lr": lr} for lr in (1e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2)],
    "kfac": [{"lr": lr, "damping": lam}
             for lr, lam in ((0.01, 0.1), (0.03, 0.1), (0.1, 0.1), (0.03, 0.3), (0.1, 0.3),
                             (0.3, 0.3), (0.1, 1.0), (0.3, 1.0), (1.0, 1.0), (0.3, 3.0),
                             (1.0, 3.0))],
    "kfac-factored": [{"lr": lr, "damping": lam}
                      for lr, lam in ((0.01, 0.1), (0.03, 0.03), (0.03, 0.1), (0.05, 0.1),
                                      (0.03, 0.3), (0.1, 0.3), (0.1, 1.0), (0.3, 1.0))],
}
QUICK_GRIDS = {"sgd": [{"lr": 0.1}], "adam": [{"lr": 1e-2}],
               "kfac": [{"lr": 0.03, "damping": 0.1}],
               "kfac-factored": [{"lr": 0.03, "damping": 0.1}]}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CNN1D(40, 10, channels=(32, 32, 32), kernel_size=5, stride=2)


def make_optimizer(name: str, model: nn.Module, hp: dict[str, float], args: argparse.Namespace,
                   batch: tuple[torch.Tensor, torch.Tensor]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), hp["lr"], momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), hp["lr"])
    return RiemannianGD(model.parameters(), hp["lr"], "kfac", model=model,
                        loss_fn=nn.CrossEntropyLoss(), data=batch, damping=hp["damping"],
                        momentum=0.9, kfac_update_every=args.kfac_every,
                        kfac_damping="factored" if name == "kfac-factored" else "exact")


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(X).argmax(-1) == y).double().mean())


def train(name: str, hp: dict[str, float], seed: int, data: dict[str, torch.Tensor],
          eval_on: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run: steps and training seconds until ``eval_on`` accuracy >= target."""
    X, y = data["X_train"], data["y_train"]
    Xe, ye = data[f"X_{eval_on}"], data[f"y_{eval_on}"]
    model = make_model(seed)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    n, bs = X.shape[0], args.batch_size
    opt = make_optimizer(name, model, hp, args, (X[:bs], y[:bs]))
    seconds, step, best, reached = 0.0, 0, 0.0, None
    curve: list[tuple[int, float]] = []
    diverged = False
    while step < args.budget_steps and reached is None and not diverged:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i : i + bs]
            xb, yb = X[idx], y[idx]
            t0 = time.perf_counter()
            if isinstance(opt, RiemannianGD):
                opt.data = (xb, yb)  # K-FAC's factors on this step's mini-batch
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            try:
                opt.step()
            except (NonFiniteError, SingularMetricError):
                # a NaN/Inf gradient, or factors blown up so far (condition number > 1e10)
                # that even K + λI counts as singular: the run diverged
                diverged = True
            seconds += time.perf_counter() - t0
            step += 1
            if diverged or not torch.isfinite(loss):
                diverged = True
                break
            if step % args.eval_every == 0:
                acc = accuracy(model, Xe, ye)
                curve.append((step, acc))
                best = max(best, acc)
                if acc >= args.target:
                    reached = {"steps": step, "seconds": seconds}
                    break
            if step >= args.budget_steps:
                break
    return {"optimizer": name, "hyperparameters": hp, "seed": seed, "eval_on": eval_on,
            "reached": reached is not None,
            "steps_to_target": None if reached is None else reached["steps"],
            "seconds_to_target": None if reached is None else reached["seconds"],
            "steps_run": step, "train_seconds": seconds, "best_accuracy": best,
            "diverged": diverged, "seconds_per_step": seconds / max(step, 1),
            "curve": curve}


def tune(name: str, grid: list[dict[str, float]], data: dict[str, torch.Tensor],
         args: argparse.Namespace) -> tuple[dict[str, float], list[dict[str, Any]]]:
    runs = [train(name, hp, 0, data, "val", args) for hp in grid]
    for r in runs:
        print(f"  tune {name:5s} {_hp(r['hyperparameters']):22s} val: "
              + (f"90% at step {r['steps_to_target']}" if r["reached"]
                 else f"best {r['best_accuracy']:.3f}") + f" ({r['train_seconds']:.1f} s)",
              flush=True)
    reached = [r for r in runs if r["reached"]]
    if reached:
        best = min(reached, key=lambda r: (r["steps_to_target"], r["seconds_to_target"]))
    else:
        best = max(runs, key=lambda r: r["best_accuracy"])
    return best["hyperparameters"], runs


def _hp(hp: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in hp.items())


def step_cost(chosen: dict[str, dict[str, float]], data: dict[str, torch.Tensor],
              args: argparse.Namespace, chunk: int = 30, rounds: int = 5) -> dict[str, float]:
    """Milliseconds per training step of each optimizer, timed side by side: ``rounds``
    round-robin chunks of ``chunk`` steps (K-FAC's refreshes included, one per T steps),
    median over the rounds. Less exposed to the machine's load changing during the long runs
    than their own seconds."""
    X, y, bs = data["X_train"], data["y_train"], args.batch_size
    loss_fn = nn.CrossEntropyLoss()
    state = {}
    for name, hp in chosen.items():
        model = make_model(0)
        state[name] = (model, make_optimizer(name, model, hp, args, (X[:bs], y[:bs])))
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, opt) in state.items():
            t0 = time.perf_counter()
            for k in range(chunk):
                i = (k * bs) % (X.shape[0] - bs)
                xb, yb = X[i : i + bs], y[i : i + bs]
                if isinstance(opt, RiemannianGD):
                    opt.data = (xb, yb)
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
            if r > 0:
                times[name].append(1e3 * (time.perf_counter() - t0) / chunk)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_or_none(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if len(vals) * 2 > len(xs) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one learning rate per optimizer, one seed, 300 steps (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--kfac-every", type=int, default=10)
    ap.add_argument("--no-opt-einsum", action="store_true",
                    help="torch.backends.opt_einsum.enabled = False: skips opt_einsum's path "
                         "search in the three-operand einsums of KroneckerFactored's solve "
                         "(a what-if for its cost; the default run keeps torch's default)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "kfac_training_cpu.json")
    ap.add_argument("--chosen-from", type=Path, default=None, metavar="JSON",
                    help="skip tuning: take each optimizer's chosen hyperparameters from an "
                         "earlier results JSON")
    ap.add_argument("--first-seed", type=int, default=1,
                    help="measure seeds first-seed .. first-seed + repeats - 1 (default 1)")
    args = ap.parse_args()
    grids = QUICK_GRIDS if args.quick else GRIDS
    if args.quick:
        args.repeats, args.budget_steps = 1, 300
    torch.set_num_threads(1)
    if args.no_opt_einsum:
        torch.backends.opt_einsum.enabled = False
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())

    ds = load_mnist1d(5000, seed=42)
    n_val = 500
    data = {"X_train": ds.X_train[:-n_val], "y_train": ds.y_train[:-n_val],
            "X_val": ds.X_train[-n_val:], "y_val": ds.y_train[-n_val:],
            "X_test": ds.X_test, "y_test": ds.y_test}

    chosen, tunings = {}, {}
    earlier = None if args.chosen_from is None else json.loads(args.chosen_from.read_text())
    for name, grid in grids.items():
        if earlier is not None:  # the earlier run's choice, its tuning runs kept for the record
            chosen[name] = earlier["results"][name]["chosen"]
            tunings[name] = earlier["results"][name]["tuning"]
        else:
            chosen[name], tunings[name] = tune(name, grid, data, args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in grids}
    order = list(grids)
    for seed in range(args.first_seed, args.first_seed + args.repeats):  # interleaved
        for name in order[seed % len(order):] + order[: seed % len(order)]:
            runs[name].append(train(name, chosen[name], seed, data, "test", args))
    step_ms = step_cost(chosen, data, args)
    results: dict[str, Any] = {}
    for name, grid in grids.items():
        rs = runs[name]
        steps = median_or_none([r["steps_to_target"] for r in rs])
        results[name] = {
            "grid": grid, "chosen": chosen[name], "tuning": tunings[name], "runs": rs,
            "reached": sum(r["reached"] for r in rs),
            "median_steps": steps,
            "median_seconds": median_or_none([r["seconds_to_target"] for r in rs]),
            "median_best_accuracy": statistics.median(r["best_accuracy"] for r in rs),
            "median_seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
            "interleaved_ms_per_step": step_ms[name],
            "steps_times_interleaved_seconds": (None if steps is None
                                                else steps * step_ms[name] / 1e3),
        }

    print(f"\nMNIST-1D, CNN1D ({num_parameters(make_model(0)):,} parameters), 1 thread, "
          f"target {args.target:.0%} test accuracy, budget {args.budget_steps} steps, "
          f"median over {args.repeats} seed(s)")
    print(f"{'optimizer':10s} {'chosen':22s} {'reached':>8s} {'steps':>7s} {'seconds':>8s} "
          f"{'ms/step':>8s} {'ms/step*':>9s} {'steps x ms*':>12s} {'best acc':>9s}")
    for name, r in results.items():
        steps = "-" if r["median_steps"] is None else f"{r['median_steps']:.0f}"
        secs = "-" if r["median_seconds"] is None else f"{r['median_seconds']:.2f}"
        est = ("-" if r["steps_times_interleaved_seconds"] is None
               else f"{r['steps_times_interleaved_seconds']:.2f} s")
        print(f"{name:10s} {_hp(r['chosen']):22s} {r['reached']:>4d}/{args.repeats:<3d} "
              f"{steps:>7s} {secs:>8s} {1e3 * r['median_seconds_per_step']:>8.2f} "
              f"{r['interleaved_ms_per_step']:>9.2f} {est:>12s} "
              f"{r['median_best_accuracy']:>9.3f}")
    print("# seconds, ms/step: measured in the runs themselves; ms/step*: side by side "
          "(interleaved chunks); steps x ms*: median steps times ms/step*")
    total = time.perf_counter() - t_start
    print(f"# total {total:.0f} s")
    record = {
        "benchmark": "kfac_training", "dataset": "mnist1d (generated, seed 42, 5000 samples; "
        "3500 train / 500 val / 1000 test)",
        "model": "CNN1D(40, 10, channels=(32, 32, 32), kernel_size=5, stride=2)",
        "num_parameters": num_parameters(make_model(0)), "threads": 1,
        "torch": torch.__version__, "options": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()},
        "protocol": "lr tuned per optimizer on seed 0 against validation accuracy (fewest "
                    "steps to target; else best accuracy); measured on seeds first_seed.. "
                    "first_seed+repeats-1 against test accuracy; seconds = training steps only"
                    + ("" if args.chosen_from is None else
                       f"; hyperparameters chosen by the earlier run {args.chosen_from.name}"),
        "results": results, "total_seconds": total,
        "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "opt_einsum_enabled": torch.backends.opt_einsum.enabled,
    }
    atomic_write_json(args.out, record)
    print(f"# results written to {args.out}")


if __name__ == "__main__":
    main()
