"""One damped-GGN solve on mlp-80k: plain CG against Nyström-preconditioned CG (issue 10).

Solves (GGN + λI) x = ∇L at the seeded initial point of the zoo preset mlp-80k (40-256-256-10,
d = 78,858, 2,000 MNIST-1D samples, float64, one thread), the system behind every solve of
the invariant damped-GGN trace on that model, with ``Metric.solve``'s tolerance (cg's float64
default, true residual <= 1e-10·‖b‖). For each Nyström rank ℓ (0: plain CG) it records the
time and products of the build (ℓ GGN products, vmapped in chunks) and of the solve, how many
of the Nyström eigenvalues lie above 10⁻², 10⁻³ (= λ), and how far the solution is from the
plain-CG one. It also times one GGN product alone and vmapped in chunks.

Usage::

    python benchmarks/bench_nystrom_solve.py --ranks 0 100 200 400 --samples 0 250

Writes ``benchmarks/results/nystrom_solve_mlp80k_cpu.json`` (atomically) unless ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_ggn_trace import _loadavg, spaces

from covariant._io import atomic_write_json
from covariant.linalg import cg
from covariant.metrics.nystrom import data_subsample, nystrom_preconditioner


def product_times(G, p: torch.Tensor, chunks=(1, 8, 16)) -> dict[str, float]:
    """Seconds per GGN product, one at a time (chunk 1) and vmapped in chunks."""
    out = {}
    for c in chunks:
        V = torch.randn(c, p.shape[0], dtype=p.dtype)
        f = torch.func.vmap(lambda x: G.matvec(p, x))
        f(V)
        t = time.perf_counter()
        f(V)
        out[str(c)] = (time.perf_counter() - t) / c
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 100, 200, 400])
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, nargs="+", default=[0],
                    help="build each Nyström row from this many samples too (0: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                    / "nystrom_solve_mlp80k_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, theta, wn, _ = spaces(2000, 24, args.damping, "mlp-80k")
    damped = wn.parent.metric  # Damped(GGN, λ) in θ, where the trace runs
    G, p = damped.metric, theta.detach()
    grad = wn.parent.grad(p)
    result = {"model": "mlp-80k", "dim": int(p.shape[0]), "damping": args.damping,
              "loadavg_before": _loadavg(), "seconds_per_product": product_times(G, p),
              "rows": [], "torch": torch.__version__, "threads": 1}
    x0 = None
    for ell, m in [(e, m) for e in args.ranks for m in (args.samples if e else [0])]:
        count = [0]

        def A(x: torch.Tensor, count: list[int] = count) -> torch.Tensor:
            count[0] += 1
            return damped.matvec(p, x)

        t = time.perf_counter()
        source = data_subsample(G, m) if m else G
        P = None if ell == 0 else nystrom_preconditioner(source, p, ell, args.damping)
        build = time.perf_counter() - t
        t = time.perf_counter()
        res = cg(A, grad, maxiter=10 * p.shape[0], preconditioner=P)
        row = {"rank": ell, "build_samples": m or 2000, "build_s": build, "build_products": ell,
               "solve_s": time.perf_counter() - t, "solve_products": count[0],
               "loadavg": _loadavg()}
        if P is not None:
            lam = P.eigenvalues
            row.update(nystrom_top5=lam[:5].tolist(), nystrom_last=float(lam[-1]),
                       above_1e_2=int((lam > 1e-2).sum()), above_1e_3=int((lam > 1e-3).sum()))
        if x0 is None:
            x0 = res.x
        else:
            row["rel_diff_vs_first_row"] = float((res.x - x0).norm() / x0.norm())
        print(row, flush=True)
        result["rows"].append(row)
    result["loadavg_after"] = _loadavg()
    atomic_write_json(args.out, result)
    print(f"# results written to {args.out}")


if __name__ == "__main__":
    main()
