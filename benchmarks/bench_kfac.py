"""K-FAC: covariant vs curvlinops and vs exact-GGN conjugate gradients (issue 12's table).

Rows (one model, one batch, side by side in one run, medians over ``--repeats`` interleaved
rounds; CPU, ``--threads`` threads, 1 by default):

  factors   K-FAC factor construction (type-2 GGN, K-FAC-expand): ``KFAC.factors(θ)`` vs
            curvlinops ``KFACLinearOperator.compute_kronecker_factors()`` on the same loss
            and batch; ratio = curvlinops seconds / ours (target ≥ 1). curvlinops 3.0.1 has
            no Conv1d, so it runs on the Conv2d twin of a 1-D CNN (``conv2d_twin``: the same
            function, weights and factors). The two operators are compared on random vectors
            in the same run (``rel_diff``).
  solve     a damped K-FAC solve (K + λI)⁻¹g, closed form (factors + eigendecompositions +
            solve, and the solve alone with the factors cached), vs an exact damped-GGN
            conjugate-gradient solve of (G + λI)x = g to relative residual ``--cg-rtol``
            (1e-3); ratio = CG seconds / K-FAC seconds (target ≥ 20).
  laplace   ``laplace(..., structure="kron")`` log evidence + ``--samples`` (1000) posterior
            draws on the same model (``--laplace-threads``, 2 by default; target < 30 s).

Usage::

    python benchmarks/bench_kfac.py                        # cnn-1m, batch 512
    python benchmarks/bench_kfac.py --model mlp-80k --repeats 5
    python benchmarks/bench_kfac.py --rows factors,solve --quick

curvlinops is optional (``bash benchmarks/install_peers.sh``); without it the ``factors``
row reports ours alone. Writes ``benchmarks/results/kfac_cpu.json`` atomically unless ``--out``
says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

import covariant as cv  # noqa: E402
from covariant._io import atomic_write_json  # noqa: E402

ROWS = ("factors", "solve", "laplace")


def _model_and_batch(name: str, batch: int, seed: int, trained: bool, device: torch.device
                     ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The model (trained briefly with Adam as in bench_flatness.py, cached, unless
    ``trained`` is False: then at its seeded initialization), in eval mode, and a batch."""
    cache = C.default_cache_dir()
    ds = C.load_model_data(name, cache)
    if trained:
        model, desc = C.trained_model(name, ds, epochs=C.model_spec(name).epochs, seed=seed,
                                      cache=cache, device=device)
    else:
        torch.manual_seed(seed)
        model, desc = C.build_model(name), {"preset": name, "trained": False}
    return (model.to(device).eval(), ds.X_train[:batch].float().to(device),
            ds.y_train[:batch].to(device), desc)


def conv2d_twin(model: nn.Module) -> nn.Module:
    """The same network with every ``nn.Conv1d`` written as an ``nn.Conv2d`` of height 1
    (curvlinops 3.0.1's K-FAC knows Linear and Conv2d only): inputs (N, L) → (N, 1, 1, L),
    kernels (1, k), the same weights, the same flattening order, hence the same function and
    the same K-FAC factors. Any other module is shared, not copied."""
    import copy

    feats: list[nn.Module] = [nn.Unflatten(1, (1, 1, -1))]
    for m in model.features:
        if isinstance(m, nn.Conv1d):
            c = nn.Conv2d(m.in_channels, m.out_channels, (1, m.kernel_size[0]),
                          stride=(1, m.stride[0]), padding=(0, m.padding[0]),
                          bias=m.bias is not None)
            with torch.no_grad():
                c.weight.copy_(m.weight.unsqueeze(2))
                if m.bias is not None:
                    c.bias.copy_(m.bias)
            feats.append(c)
        else:
            feats.append(m)
    return nn.Sequential(*feats, nn.Flatten(1), copy.deepcopy(model.head))


def _peer_model(model: nn.Module) -> nn.Module:
    has_conv1d = any(isinstance(m, nn.Conv1d) for m in model.modules())
    device = next(model.parameters()).device
    return conv2d_twin(model).to(device) if has_conv1d else model


def _curvlinops_factors(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> Any:
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)],
                            fisher_type="type-2", check_deterministic=False,
                            num_data=X.shape[0], num_per_example_loss_terms=1)
    op.compute_kronecker_factors()
    return op


def row_factors(model: nn.Module, X: torch.Tensor, y: torch.Tensor, repeats: int,
                device: torch.device) -> dict[str, Any]:
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))

    def ours() -> Any:
        return cv.metrics.KFAC.from_space(space).factors(theta)

    fns = {"covariant": ours}
    have_peer = importlib.util.find_spec("curvlinops") is not None
    peer_model = _peer_model(model)
    if have_peer:
        fns["curvlinops"] = lambda: _curvlinops_factors(peer_model, X, y)
    times = C.interleaved(fns, repeats, device)
    med = {k: C.median(v) for k, v in times.items()}
    out: dict[str, Any] = {"seconds": times, "median_seconds": med}
    if have_peer:
        out["speed_ratio"] = med["curvlinops"] / med["covariant"]
        with torch.no_grad():
            same = float((peer_model(X) - model(X)).abs().max())
        out["peer_model"] = ("the Conv2d twin (Conv1d as height-1 Conv2d; outputs differ by "
                             f"{same:.1e})") if peer_model is not model else "the same model"
        K, op = ours(), _curvlinops_factors(peer_model, X, y)
        V = torch.randn(theta.shape[0], 3, generator=torch.Generator().manual_seed(0)).to(theta)
        ours_mv = K.matmat(V)
        peer_mv = op @ V  # a flat (d, k) tensor, in the order of model.parameters()
        out["rel_diff"] = float((ours_mv - peer_mv).norm() / peer_mv.norm())
    return out


def row_solve(model: nn.Module, X: torch.Tensor, y: torch.Tensor, damping: float,
              cg_rtol: float, repeats: int, device: torch.device) -> dict[str, Any]:
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y), "ggn")
    g = space.grad(theta).detach()
    ggn = space.metric
    cached = cv.metrics.KFAC.from_space(space, damping=damping).factors(theta)
    cached.solve(g)  # eigendecompositions once, outside the timing of the cached row
    iters: list[int] = []

    def kfac_total() -> torch.Tensor:
        return cv.metrics.KFAC.from_space(space, damping=damping).factors(theta).solve(g)

    def exact_cg() -> torch.Tensor:
        res = cv.linalg.cg(lambda v: ggn.matvec(theta, v) + damping * v, g, rtol=cg_rtol,
                           maxiter=2000, raise_on_failure=False)
        iters.append(int(res.num_matvecs))
        return res.x

    fns = {"kfac_total": kfac_total, "kfac_solve_cached": lambda: cached.solve(g),
           "exact_ggn_cg": exact_cg}
    times = C.interleaved(fns, repeats, device, warmup={"exact_ggn_cg": lambda: None})
    med = {k: C.median(v) for k, v in times.items()}
    return {"damping": damping, "cg_rtol": cg_rtol, "cg_matvecs": iters, "seconds": times,
            "median_seconds": med,
            "speedup_total": med["exact_ggn_cg"] / med["kfac_total"],
            "speedup_solve_cached": med["exact_ggn_cg"] / med["kfac_solve_cached"]}


def row_laplace(model: nn.Module, X: torch.Tensor, y: torch.Tensor, samples: int,
                threads: int, prior_precision: float) -> dict[str, Any]:
    from covariant.laplace import laplace, posterior_space

    torch.set_num_threads(threads)
    cuda = X.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(X.device)
    C.sync(X.device)
    t0 = time.perf_counter()
    space, theta = posterior_space(model, (X, y), likelihood="classification",
                                   prior_precision=prior_precision)
    res = laplace(space, theta, riemannian=False, structure="kron")
    C.sync(X.device)
    t1 = time.perf_counter()
    draws = res.sample(samples)
    C.sync(X.device)
    t2 = time.perf_counter()
    return {"threads": threads, "samples": samples, "prior_precision": prior_precision,
            "seconds_evidence": t1 - t0, "seconds_samples": t2 - t1, "seconds_total": t2 - t0,
            "log_evidence": res.log_evidence, "draws_shape": list(draws.shape),
            "device": str(X.device), "target_seconds": 30.0,
            **({"peak_memory_gib": torch.cuda.max_memory_allocated(X.device) / 2**30}
               if cuda else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn-1m")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--cg-rtol", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--laplace-threads", type=int, default=2)
    ap.add_argument("--prior-precision", type=float, default=1.0)
    ap.add_argument("--untrained", action="store_true",
                    help="the model at initialization instead of briefly trained")
    ap.add_argument("--quick", action="store_true", help="mlp-80k, batch 128, 1 repeat")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (model, data, products)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/kfac_<device>.json)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.repeats = "mlp-80k", 128, 1
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {ROWS}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available in this torch build / machine")
    if args.out is None:
        args.out = HERE / "results" / f"kfac_{device.type}.json"
    model, X, y, desc = _model_and_batch(args.model, args.batch, seed=0,
                                         trained=not args.untrained, device=device)
    d = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {"model": args.model, "model_info": desc, "dim": d,
                              "batch": args.batch,
                              "repeats": args.repeats, "threads": args.threads,
                              "machine": C.machine_info(device), "rows": {}}
    print(f"# {args.model}: d = {d:,}, batch {args.batch}, {args.threads} thread(s), "
          f"medians of {args.repeats}")
    if "factors" in rows:
        r = row_factors(model, X, y, args.repeats, device)
        result["rows"]["factors"] = r
        med = r["median_seconds"]
        peer = (f", curvlinops {med['curvlinops']:.3f} s, ratio {r['speed_ratio']:.2f}x "
                f"(target >= 1), rel. diff {r['rel_diff']:.1e}") if "curvlinops" in med else ""
        print(f"factors: covariant {med['covariant']:.3f} s{peer}")
    if "solve" in rows:
        r = row_solve(model, X, y, args.damping, args.cg_rtol, args.repeats, device)
        result["rows"]["solve"] = r
        med = r["median_seconds"]
        print(f"solve (λ={args.damping:g}): K-FAC {med['kfac_total']:.3f} s with factors, "
              f"{med['kfac_solve_cached']:.4f} s cached; exact-GGN CG to {args.cg_rtol:g} "
              f"{med['exact_ggn_cg']:.2f} s ({r['cg_matvecs'][-1]} products): "
              f"{r['speedup_total']:.0f}x / {r['speedup_solve_cached']:.0f}x (target >= 20x)")
    if "laplace" in rows:
        r = row_laplace(model, X, y, args.samples, args.laplace_threads, args.prior_precision)
        result["rows"]["laplace"] = r
        print(f"laplace kron: evidence {r['seconds_evidence']:.2f} s + {args.samples} samples "
              f"{r['seconds_samples']:.2f} s = {r['seconds_total']:.2f} s on "
              f"{args.laplace_threads} threads, {r['device']} (target < 30 s on 2 CPU cores)")
    atomic_write_json(args.out, result)
    print(f"# results written to {args.out}")


if __name__ == "__main__":
    main()
