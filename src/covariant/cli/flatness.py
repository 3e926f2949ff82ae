"""``covariant flatness``: invariant vs naive curvature of a saved model.

Loads a checkpoint (``torch.load(..., weights_only=True)`` only) into an architecture of
:mod:`covariant.zoo.architectures`, takes a slice of a bundled or generated dataset, and reports the
measures of E = G⁻¹Hess in the chosen chart and metric next to the naive numbers (G = I in that
chart). With ``--out DIR`` it writes a spectral-density plot; with ``--json`` every number.
Every numeric flag is checked by argparse (:mod:`covariant.cli.arguments`); a checkpoint that
cannot be read, or a problem the library reports, ends with ``covariant flatness: error: …``
and exit status 2, with the fix stated in terms of the flags. Under ``torchrun`` (or with
``--distributed``) the examples are split over the ranks and rank 0 alone reports
(:mod:`covariant.cli.launch`, docs/scale.md).

Example (shell)::

    covariant flatness model.pt --dataset mnist1d --chart weightnorm:10 --metric euclidean \\
        --measures trace,max_eig --num-probes 50 --out out/ --json

Example
-------
>>> _fmt({"value": 1.5, "stderr": float("nan")})
'1.5 ± n/a'
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import metrics, reparam
from .._io import atomic_write_json, dumps_json, save_figure
from ..distributed import distributed_space, shard_batches
from ..errors import (
    ArchitectureMismatchError,
    CovariantError,
    DistributedError,
    NotConvergedError,
    SingularMetricError,
    require,
)
from ..flatness import flatness, format_value
from ..linalg import spectral_density
from ..space import ParameterSpace
from ..zoo.checkpoints import load_checkpoint
from ..zoo.data import load_dataset
from . import arguments as a
from .flatness_flags import DEFAULT_MEASURES, PROBES, SAMPLES, add_arguments, resolve_quick
from .launch import TorchrunEnv, agree, resolve_device

__all__ = ["DEFAULT_MEASURES", "PROBES", "SAMPLES", "add_arguments", "analyse", "cli_message",
           "distributed_problem", "print_table", "run_flatness"]

def _chart(space: Any, theta: torch.Tensor, spec: str) -> tuple[Any, torch.Tensor]:
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("none", "w", ""):
        return space, theta
    if kind == "weightnorm":
        new = space.reparametrize({"*.weight": reparam.WeightNorm()})
        psi = new.chart.inverse(theta)
        scale = float(arg) if arg else 1.0  # > 0, checked by arguments.chart_spec
        if scale != 1.0:
            psi = psi.clone()
            v_slices = new.chart.new_layout.slices
            for name in new.chart.blocks:
                psi[v_slices[f"{name}.v"]] *= scale
        return new, psi
    if kind == "scale":
        if not arg:
            raise ValueError("--chart scale:A needs a value A, e.g. scale:0.1")
        new = space.reparametrize(reparam.Scale(float(arg)))
        return new, new.chart.inverse(theta)
    raise ValueError(f"--chart: unknown chart {spec!r}; use none, weightnorm[:S] or scale:A")


def _inputs(args: argparse.Namespace, device: torch.device
            ) -> tuple[nn.Module, dict[str, Any], torch.Tensor, torch.Tensor]:
    """The model (in the dtype and on the device of the flags), its metadata and the data."""
    dtype = torch.float32 if args.float32 else torch.float64
    ds = load_dataset(args.dataset)
    resolve_quick(args)
    kwargs = a.parse_kwargs(args.arch_kwargs)
    kwargs.setdefault("in_features", ds.num_features)
    kwargs.setdefault("num_classes", ds.num_classes)
    model, meta = load_checkpoint(args.checkpoint, arch=args.arch, **kwargs)
    model = model.to(device=device, dtype=dtype)
    if args.samples > ds.X_train.shape[0]:
        raise ValueError(f"--samples {args.samples} exceeds the {ds.X_train.shape[0]} training "
                         f"examples of {args.dataset}; pass at most that many")
    X = ds.X_train[: args.samples].to(device=device, dtype=dtype)
    y = ds.y_train[: args.samples].to(device)
    return model, meta, X, y


def distributed_problem(args: argparse.Namespace) -> str | None:
    """Why the flags cannot run data-parallel (docs/api.md, "Data-parallel spaces"), or None.

    >>> distributed_problem(argparse.Namespace(method="dense", metric="ggn")) is None
    True
    >>> distributed_problem(argparse.Namespace(method="stochastic", metric="kfac"))[:44]
    'covariant flatness --distributed supports --'
    """
    if args.metric not in _DISTRIBUTED_METRICS:
        return ("covariant flatness --distributed supports --metric "
                f"{', '.join(_DISTRIBUTED_METRICS)} (with --method stochastic or dense, any "
                f"--chart and --damping), got --metric {args.metric}: the Kronecker factors "
                "of a K-FAC metric are not differentiated over ranks yet (its connection "
                "terms)")
    return None


#: The metrics ``covariant flatness --distributed`` takes (each agrees with one process).
_DISTRIBUTED_METRICS = ("euclidean", "ggn", "fisher", "empirical_fisher")


def _shard(args: argparse.Namespace, launch: TorchrunEnv, device: torch.device
           ) -> tuple[nn.Module, dict[str, Any], Any]:
    """Every rank's model and its contiguous share of the examples (one batch per rank),
    agreed across the ranks: a failure or other flags on any rank raise on every rank."""
    error: BaseException | None = None
    model: Any = None
    meta: dict[str, Any] = {}
    local: Any = ()
    try:
        model, meta, X, y = _inputs(args, device)
        P = launch.world_size
        batches = list(zip(X.tensor_split(P), y.tensor_split(P), strict=True))
        local = shard_batches(batches, launch.rank, P)
    except Exception as err:  # reported to every rank by agree, so that none hangs
        error = err
    agree({f"--{k.replace('_', '-')}": v for k, v in sorted(vars(args).items())}, error)
    return model, meta, local


def analyse(args: argparse.Namespace, *, progress: bool,
            launch: TorchrunEnv | None = None) -> dict[str, Any]:
    """Run the analysis described by parsed CLI arguments; return every number. Under a
    torchrun ``launch`` (process group initialized), data-parallel over its ranks."""
    device = resolve_device(getattr(args, "device", "cpu"), launch)
    metric_name = args.metric.lower()
    extra: dict[str, Any] = {}
    if launch is None:
        model, meta, X, y = _inputs(args, device)
        space, theta = ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y),
                                                  metric=metric_name)
    else:
        model, meta, local = _shard(args, launch, device)
        space, theta = distributed_space(model, nn.CrossEntropyLoss(), local, metric_name,
                                         seed=args.seed)
        extra["distributed"] = {"world_size": launch.world_size,
                                "backend": str(torch.distributed.get_backend())}
    if args.damping > 0:
        space = space.with_metric(metrics.Damped(space.metric, args.damping))
    chart_space, p = _chart(space, theta, args.chart)
    naive_space = chart_space.with_metric(metrics.Euclidean())
    measures = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    opts: dict[str, Any] = {"measures": measures, "method": args.method, "k": args.k}
    if args.method == "stochastic":
        opts.update(num_probes=args.num_probes, seed=args.seed, progress=progress)
        if args.slq_steps is not None:
            opts["slq_steps"] = args.slq_steps
    t0 = time.perf_counter()
    invariant = flatness(chart_space, p, **opts, **(
        {"in_chart": True} if args.in_chart and args.method == "stochastic" else {}))
    t1 = time.perf_counter()
    naive = flatness(naive_space, p, **opts)
    t2 = time.perf_counter()
    return {
        "checkpoint": str(args.checkpoint), "arch": meta["arch"],
        "arch_kwargs": meta["arch_kwargs"], "dataset": args.dataset,
        "samples": args.samples, "dim": int(theta.shape[0]), "chart_dim": int(p.shape[0]),
        "chart": args.chart, "metric": metric_name, "damping": args.damping,
        "method": args.method, "device": str(device), **extra,
        "invariant": invariant.to_dict(), "naive": naive.to_dict(),
        "seconds": {"invariant": t1 - t0, "naive": t2 - t1},
    }


def _fmt(m: dict[str, Any]) -> str:
    text = format_value(m["value"], 5)
    stderr = m.get("stderr")
    if stderr is not None and not isinstance(m["value"], list):
        finite = isinstance(stderr, int | float) and math.isfinite(stderr)
        text += f" ± {stderr:.2g}" if finite else " ± n/a"
    if not m.get("converged", True):
        text += " (NOT converged)"
    return text


def print_table(result: dict[str, Any], stream: Any = sys.stdout) -> None:
    inv, naive = result["invariant"], result["naive"]
    names = [k for k in inv if k != "info"]
    print(f"{result['arch']} ({result['dim']} parameters, chart {result['chart']} with "
          f"{result['chart_dim']} coordinates), {result['samples']} {result['dataset']} "
          f"examples, metric {result['metric']}, {result['method']}", file=stream)
    shown = [k for k in names if k != "spectral_density"]
    w = max(30, *(len(_fmt(r[k])) + 2 for k in shown for r in (inv, naive)))
    print(f"{'measure':14s}{'invariant (G⁻¹Hess)':>{w}s}{'naive (G = I in chart)':>{w}s}",
          file=stream)
    for k in names:
        if k == "spectral_density":
            continue
        print(f"{k:14s}{_fmt(inv[k]):>{w}s}{_fmt(naive[k]):>{w}s}", file=stream)
    unconverged = [k for k in names if not inv[k].get("converged", True)
                   or not naive[k].get("converged", True)]
    unresolved = [k for k in unconverged if k == "logdet"]
    others = [k for k in unconverged if k != "logdet"]
    if unresolved:
        print("warning: logdet: Lanczos did not resolve the smallest eigenvalues from the null "
              "ones, so its error bar does not cover the quadrature error; raise --slq-steps "
              "or use --method dense on small models", file=stream)
    if others:
        print(f"warning: {', '.join(others)} did not converge; raise --num-probes or use "
              "--method dense on small models", file=stream)


def _plot_density(result: dict[str, Any], path: Path) -> Path:
    plt = require("matplotlib.pyplot", "plots")

    fig, ax = plt.subplots(figsize=(7, 4))
    nodes = {k: torch.tensor(result[k]["spectral_density"]["info"]["nodes"])
             for k in ("invariant", "naive")}
    lo = min(float(n.min()) for n in nodes.values())
    hi = max(float(n.max()) for n in nodes.values())
    pad = 0.05 * (hi - lo + 1e-12)
    grid = torch.linspace(lo - pad, hi + pad, 600, dtype=torch.float64)
    sigma = 0.01 * float(grid[-1] - grid[0])  # one broadening for both curves
    for kind, style in (("invariant", "-"), ("naive", "--")):
        weights = torch.tensor(result[kind]["spectral_density"]["info"]["weights"])
        dens = spectral_density(nodes[kind].double(), weights.double(), grid, sigma)
        ax.plot(grid, dens.clamp_min(1e-12), style, label=kind)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"spectral density, chart {result['chart']}, metric {result['metric']}")
    ax.legend()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def cli_message(err: BaseException) -> str:
    """The message of ``err`` with its fix stated as flags rather than Python calls.

    >>> cli_message(SingularMetricError("the metric has rank 3 < 5. Damp it (metrics.Damped)"))
    'the metric has rank 3 < 5; add --damping λ > 0 (e.g. --damping 1e-3) or use --metric euclidean'
    """
    text = str(err)
    if isinstance(err, SingularMetricError):
        first = text.split(". ")[0].rstrip(".")
        return (f"{first}; add --damping λ > 0 (e.g. --damping 1e-3) or use "
                "--metric euclidean")
    if isinstance(err, NotConvergedError):
        return f"{text}; raise --num-probes, or use --method dense on a small model"
    if isinstance(err, ArchitectureMismatchError):
        text = text.replace("pass arch=... and its kwargs",
                            "pass --arch NAME and --arch-kwargs 'key=value;...'")
    return text


def _report_error(err: BaseException, launch: TorchrunEnv | None) -> None:
    """``covariant flatness: error: …`` on stderr. Under torchrun every rank but 0 keeps quiet
    about a DistributedError: such errors are raised on every rank together, and rank 0
    reports them."""
    where = ""
    if launch is not None and launch.world_size > 1:
        if launch.rank != 0 and isinstance(err, DistributedError):
            return
        where = f" (rank {launch.rank} of {launch.world_size})"
    print(f"covariant flatness: error{where}: {cli_message(err)}", file=sys.stderr)


def run_flatness(args: argparse.Namespace, *, progress: bool,
                 launch: TorchrunEnv | None = None) -> int:
    """Entry point of ``covariant flatness``; returns the exit status. Under a torchrun
    ``launch`` every rank computes and only rank 0 prints and writes."""
    if launch is not None and (problem := distributed_problem(args)) is not None:
        _report_error(DistributedError(problem), launch)
        return 2
    if args.out is not None and args.method == "stochastic" and "spectral_density" not in \
            args.measures:
        args.measures += ",spectral_density"
    try:
        result = analyse(args, progress=progress, launch=launch)
    except (ArchitectureMismatchError, CovariantError, ValueError, OSError) as err:
        _report_error(err, launch)
        return 2
    if launch is not None and launch.rank != 0:
        return 0
    stream = sys.stderr if (args.json and args.out is None) else sys.stdout
    print_table(result, stream)
    if args.out is not None:
        files = []
        if "spectral_density" in result["invariant"]:
            files.append(str(_plot_density(result, Path(args.out) / "spectral_density.png")))
        if args.json:
            files.append(str(atomic_write_json(Path(args.out) / "flatness.json", result)))
        if files:
            print("wrote " + ", ".join(files), file=stream)
    elif args.json:
        sys.stdout.write(dumps_json(result) + "\n")
    return 0
