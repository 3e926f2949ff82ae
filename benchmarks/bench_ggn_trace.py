"""Invariant damped-GGN trace vs the Euclidean trace, at the same probes (issue 10's headline).

The README's headline command measures tr(G⁻¹Hess) with G = GGN + λI pulled back to a
weight-norm chart. Every probe needs a solve with G; this script times that trace against
the Euclidean one (same model, data, probes, seed) and reports the ratio, the quantity whose
target is ≤ 10×. Medians over ``--repeats`` interleaved rounds, one thread, after one untimed
round of both rows (``--warmup``): the first ``torch.func.jvp`` of a process imports
torch._dynamo (~2.5 s), which no timed round should pay.

Usage::

    python benchmarks/bench_ggn_trace.py                 # demo-size MLP (1,268 params in ψ)
    python benchmarks/bench_ggn_trace.py --probes 30 --repeats 3 --out X.json
    python benchmarks/bench_ggn_trace.py --model mlp-80k --probes 2 --repeats 1
    python benchmarks/bench_ggn_trace.py --model mlp-80k --probes 4 --nystrom-rank 400

``--model demo`` is the 40-24-10 MLP of the README (d = 1,234 in θ: the dense-factor path);
``--model mlp-80k`` the zoo preset 40-256-256-10 (d = 78,858: no dense factor, conjugate
gradients per solve; ``--nystrom-rank ℓ`` preconditions them, ``Damped(..., nystrom_rank=ℓ)``).

Writes ``benchmarks/results/ggn_trace_cpu.json`` (atomically) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import covariant as cv
from covariant._io import atomic_write_json
from covariant.zoo.architectures import build, preset
from covariant.zoo.data import load_mnist1d


def spaces(samples: int, hidden: int, damping: float, model_name: str = "demo",
           nystrom_rank: int = 0, nystrom_samples: int = 0):
    torch.manual_seed(0)
    ds = load_mnist1d(4000)
    X, y = ds.X_train.double()[:samples], ds.y_train[:samples]
    if model_name == "demo":
        model = build("mlp", X.shape[1], 10, hidden=(hidden,)).double()
    else:
        model = preset(model_name).double()
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y), "ggn")
    damped = space.with_metric(cv.metrics.Damped(space.metric, damping,
                                                 nystrom_rank=nystrom_rank or None,
                                                 nystrom_samples=nystrom_samples or None))
    wn = damped.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    return space.with_metric(cv.metrics.Euclidean()), theta, wn, wn.chart.inverse(theta)


def timed_trace(space, p, probes: int) -> tuple[float, float, float]:
    t = time.perf_counter()
    r = cv.flatness(space, p, measures=("trace",), method="stochastic", num_probes=probes,
                    seed=0)
    return time.perf_counter() - t, r["trace"].value, r["trace"].stderr


def _loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (the machine may be shared), or None."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "mlp-80k"), default="demo")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--nystrom-rank", type=int, default=0,
                    help="precondition the CG solves (d > 2048) by a rank-ℓ Nyström "
                         "approximation of the GGN (0: plain CG, the default)")
    ap.add_argument("--nystrom-samples", type=int, default=0,
                    help="build that approximation from this many samples (0: all)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "ggn_trace_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = _loadavg()
    times: dict[str, list[float]] = {"euclidean": [], "ggn_weight_norm": []}
    values: dict[str, float] = {}
    stderrs: dict[str, float] = {}
    for rnd in range(args.warmup + args.repeats):
        # fresh spaces and metrics each round (untimed): every cache is rebuilt, as in a new run
        eu, theta, wn, psi = spaces(args.samples, args.hidden, args.damping, args.model,
                                    args.nystrom_rank, args.nystrom_samples)
        for name, s, p in (("euclidean", eu, theta), ("ggn_weight_norm", wn, psi)):
            dt, val, err = timed_trace(s, p, args.probes)
            if rnd >= args.warmup:
                times[name].append(dt)
            values[name], stderrs[name] = val, err
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ggn_weight_norm"] / med["euclidean"]
    result = {"model": args.model, "dim_theta": int(theta.shape[0]), "dim_psi": int(psi.shape[0]),
              "samples": args.samples, "probes": args.probes, "repeats": args.repeats,
              "nystrom_rank": args.nystrom_rank, "nystrom_samples": args.nystrom_samples,
              "warmup_rounds": args.warmup, "loadavg_before": load_before,
              "loadavg_after": _loadavg(),
              "seconds": times, "median_seconds": med, "ratio_ggn_to_euclidean": ratio,
              "target_ratio": 10.0, "trace_values": values,
              "trace_stderrs": stderrs, "torch": torch.__version__,
              "threads": 1}
    print(f"{args.model}: d(θ)={theta.shape[0]} d(ψ)={psi.shape[0]} probes={args.probes}: "
          f"euclidean "
          f"{med['euclidean']:.2f} s, damped GGN in the weight-norm chart "
          f"{med['ggn_weight_norm']:.2f} s, ratio {ratio:.1f}x (target <= 10x)")
    atomic_write_json(args.out, result)
    print(f"# results written to {args.out}")


if __name__ == "__main__":
    main()
