"""Invariant damped-GGN trace vs the Euclidean trace, at the same probes (issue 10's headline).

The README's headline command measures tr(G⁻¹Hess) with G = GGN + λI pulled back to a
weight-norm chart. This script times that trace against the Euclidean one (same model, data,
probes, seed) and reports the ratio, the quantity whose target is ≤ 10×. Medians over
``--repeats`` interleaved rounds, one thread, each on freshly built spaces (every factor is
rebuilt and timed), after ``--warmup`` untimed rounds on the demo model: the first
``torch.func.jvp`` of a process imports torch._dynamo (~2.5 s), which no timed round should pay.

Usage::

    python benchmarks/bench_ggn_trace.py                 # demo-size MLP (1,268 params in ψ)
    python benchmarks/bench_ggn_trace.py --model mlp-80k --samples 512 --probes 4 30 100 \
        --out benchmarks/results/ggn_trace_mlp80k_n512_cpu.json

``--model demo`` is the 40-24-10 MLP of the README (d = 1,234 in θ: the dense-factor path);
``--model mlp-80k`` the zoo preset 40-256-256-10 (d = 78,858): there ``Damped`` solves in
sample space (the Woodbury identity with the m × m matrix λI + BBᵀ, m = samples × 9 softmax
directions, factored once per point; :mod:`covariant.metrics.sample_space`). Where that does
not apply (m > 20,000), ``--nystrom-rank ℓ`` preconditions the CG solves.

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
           nystrom_rank: int = 0, nystrom_samples: int = 0, sample_space: bool = True):
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
                                                 nystrom_samples=nystrom_samples or None,
                                                 sample_space=sample_space))
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


def _round(args, probes: int) -> dict[str, tuple[float, float, float]]:
    """One timed round of both rows, on fresh spaces and metrics (every cache rebuilt, as in
    a new run; building them is not timed)."""
    eu, theta, wn, psi = spaces(args.samples, args.hidden, args.damping, args.model,
                                args.nystrom_rank, args.nystrom_samples,
                                not args.no_sample_space)
    return {"euclidean": timed_trace(eu, theta, probes),
            "ggn_weight_norm": timed_trace(wn, psi, probes),
            "dims": (int(theta.shape[0]), int(psi.shape[0]), 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "mlp-80k"), default="demo")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--probes", type=int, nargs="+", default=[30],
                    help="probe counts (one row each; 100 is the CLI's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds of both rows on the demo model first")
    ap.add_argument("--nystrom-rank", type=int, default=0,
                    help="precondition CG solves by a rank-ℓ Nyström approximation of the "
                         "GGN where no exact factor applies (0: none, the default)")
    ap.add_argument("--nystrom-samples", type=int, default=0,
                    help="build that approximation from this many samples (0: all)")
    ap.add_argument("--no-sample-space", action="store_true",
                    help="solve by conjugate gradients above the dense size (the code before "
                         "the sample-space factor; Damped(..., sample_space=False))")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "ggn_trace_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for _ in range(args.warmup):  # process-wide one-time costs (the torch._dynamo import)
        eu, theta, wn, psi = spaces(200, 8, args.damping)
        timed_trace(eu, theta, 2)
        timed_trace(wn, psi, 2)
    load_before = _loadavg()
    rows = []
    for probes in args.probes:
        times: dict[str, list[float]] = {"euclidean": [], "ggn_weight_norm": []}
        values: dict[str, float] = {}
        stderrs: dict[str, float] = {}
        for _ in range(args.repeats):
            got = _round(args, probes)
            dims = got.pop("dims")
            for name, (dt, val, err) in got.items():
                times[name].append(dt)
                values[name], stderrs[name] = val, err
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["ggn_weight_norm"] / med["euclidean"]
        rows.append({"probes": probes, "seconds": times, "median_seconds": med,
                     "ratio_ggn_to_euclidean": ratio, "trace_values": values,
                     "trace_stderrs": stderrs})
        print(f"{args.model}: d(θ)={dims[0]} d(ψ)={dims[1]} N={args.samples} probes={probes}: "
              f"euclidean {med['euclidean']:.2f} s, damped GGN in the weight-norm chart "
              f"{med['ggn_weight_norm']:.2f} s, ratio {ratio:.1f}x (target <= 10x)", flush=True)
    result = {"model": args.model, "dim_theta": dims[0], "dim_psi": dims[1],
              "samples": args.samples, "repeats": args.repeats,
              "nystrom_rank": args.nystrom_rank, "nystrom_samples": args.nystrom_samples,
              "sample_space": not args.no_sample_space, "warmup_rounds": args.warmup,
              "loadavg_before": load_before,
              "loadavg_after": _loadavg(), "rows": rows, "target_ratio": 10.0,
              "torch": torch.__version__, "threads": 1}
    atomic_write_json(args.out, result)
    print(f"# results written to {args.out}")


if __name__ == "__main__":
    main()
