"""Data-parallel Hutchinson trace: P = 1 vs P = 2 gloo processes (issue 13's benchmark).

Workload: the HVP-bound Hutchinson trace of the Euclidean Hessian of mlp-80k (seeded
initialization, float32) on one batch of ``--batch`` (4096) MNIST-1D training examples,
``--probes`` (20) Rademacher probes, ``quadratic_forms="hvp"`` (one Hessian-vector product per
probe; Taylor-mode quadratic forms are not reduced in the first slice). Every process runs
with ``torch.set_num_threads(1)``. Rows, all in one run of this script:

  plain     one process, ``ParameterSpace.from_module`` on the full batch (the reference)
  dist-P1   ``covariant.distributed.distributed_space`` in a gloo group of world size 1
  dist-P2   the same with 2 gloo processes on 127.0.0.1, each holding half the batch

Each row times the trace alone after a warm-up (a 2-probe trace), with a barrier before and
after, ``--repeats`` (3) times; medians are reported. One more trace per row counts the
all-reduces (``torch.distributed.all_reduce`` wrapped in the worker): calls and bytes per
trace and per product. ``allreduce_alone`` times one all-reduce of a d-vector (float32) by
itself, the communication term of the cost model in docs/scale.md, and ``shard_only`` times
the same trace on each rank's shard with a plain (unreduced) space, concurrently on every
rank: the compute-only ceiling that shows how much parallelism the machine gave. The trace
values of the rows agree up to float32 round-off (the same seed draws the same probes on
every rank).

Usage::

    python benchmarks/bench_distributed.py                 # batch 4096, 20 probes, 3 repeats
    python benchmarks/bench_distributed.py --repeats 5 --out /tmp/d.json

Every spawned group has a timeout (``--timeout``, 900 s), so nothing hangs. Writes
``benchmarks/results/distributed_cpu.json`` atomically unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

import covariant as cv  # noqa: E402
from covariant._io import atomic_write_json  # noqa: E402
from covariant.distributed import distributed_space, shard_batches  # noqa: E402

MODEL = "mlp-80k"
ALLREDUCE_REPS = 50


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_and_batch(batch: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """mlp-80k at its seeded initialization (the same in every process) and the first
    ``batch`` MNIST-1D training examples (generated locally, cached)."""
    from covariant.zoo.data import load_mnist1d

    n = max(4000, int(batch / 0.8) + 10)
    ds = load_mnist1d(n, seed=42, cache_dir=C.default_cache_dir())
    torch.manual_seed(seed)
    model = C.build_model(MODEL).float().eval()
    return model, ds.X_train[:batch].float(), ds.y_train[:batch]


def _trace(space: cv.ParameterSpace, theta: torch.Tensor, probes: int) -> float:
    report = cv.flatness(space, theta, ("trace",), method="stochastic", num_probes=probes,
                         seed=0, quadratic_forms="hvp")
    return float(report["trace"].value)


def _count_allreduces(fn: Any) -> tuple[Any, list[int]]:
    """Run ``fn`` with torch.distributed.all_reduce wrapped; the byte size of each call."""
    sizes: list[int] = []
    all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        return fn(), sizes
    finally:
        dist.all_reduce = all_reduce


def _time_allreduce(d: int) -> list[float]:
    """Seconds of one all-reduce of a float32 d-vector, ALLREDUCE_REPS times (after 5 warm)."""
    v = torch.ones(d, dtype=torch.float32)
    times = []
    for i in range(ALLREDUCE_REPS + 5):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(v)
        dt = time.perf_counter() - t0
        if i >= 5:
            times.append(dt)
    return times


def _timed_traces(space: cv.ParameterSpace, theta: torch.Tensor, cfg: dict[str, Any],
                  barrier: bool) -> tuple[list[float], list[float]]:
    """Warm up, then ``repeats`` timed traces (barriers around each when ``barrier``)."""
    _trace(space, theta, 2)
    times, values = [], []
    for _ in range(cfg["repeats"]):
        if barrier:
            dist.barrier()
        t0 = time.perf_counter()
        values.append(_trace(space, theta, cfg["probes"]))
        if barrier:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    return times, values


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=cfg["timeout"]))
    try:
        model, X, y = _model_and_batch(cfg["batch"], cfg["seed"])
        cuts = [round(i * X.shape[0] / world) for i in range(world + 1)]
        batches = [(X[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]
        local = shard_batches(batches, rank, world)
        space, theta = distributed_space(model, nn.CrossEntropyLoss(), local, seed=0)
        loadavg_before = list(os.getloadavg())
        times, values = _timed_traces(space, theta, cfg, barrier=True)
        loadavg_after = list(os.getloadavg())
        counted, sizes = _count_allreduces(lambda: _trace(space, theta, cfg["probes"]))
        shard_only, _ = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), local)
        local_times, _ = _timed_traces(shard_only, theta, cfg, barrier=True)
        op = space.hvp_operator(theta, riemannian=False)  # the per-probe product
        _, one_product = _count_allreduces(lambda: op(torch.ones_like(theta)))
        ar = _time_allreduce(theta.shape[0])
        res = {"rank": rank, "world_size": world, "local_examples": sum(len(b[0]) for b in local),
               "d": int(theta.shape[0]), "seconds": times, "trace_values": values,
               "counted_trace_value": counted, "allreduce_bytes": sizes,
               "allreduce_bytes_one_product": one_product, "shard_only_seconds": local_times,
               "allreduce_alone_seconds": ar, "loadavg_before": loadavg_before,
               "loadavg_after": loadavg_after, "threads": torch.get_num_threads()}
        with open(os.path.join(out, f"P{world}_rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cfg: dict[str, Any], out: str) -> list[dict[str, Any]]:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), cfg, out), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + cfg["timeout"]
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"P={world}: the ranks did not finish in {cfg['timeout']} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [json.loads(Path(out, f"P{world}_rank{r}.json").read_text()) for r in range(world)]


def _plain_row(cfg: dict[str, Any]) -> dict[str, Any]:
    """The single-process reference: ParameterSpace on the full batch, 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, X, y = _model_and_batch(cfg["batch"], cfg["seed"])
        space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), [(X, y)])
        loadavg_before = list(os.getloadavg())
        times, values = _timed_traces(space, theta, cfg, barrier=False)
        return {"row": "plain", "processes": 1, "threads_per_process": 1,
                "d": int(theta.shape[0]), "median_s": statistics.median(times),
                "seconds": times, "trace": values[0], "trace_values": values,
                "loadavg_before": loadavg_before, "loadavg_after": list(os.getloadavg())}
    finally:
        torch.set_num_threads(threads)


def _dist_row(world: int, ranks: list[dict[str, Any]], probes: int) -> dict[str, Any]:
    r0 = ranks[0]
    sizes = r0["allreduce_bytes"]
    d_bytes = 4 * r0["d"]
    vectors = [s for s in sizes if s == d_bytes]
    return {
        "row": f"dist-P{world}", "processes": world, "threads_per_process": 1, "d": r0["d"],
        "local_examples": [r["local_examples"] for r in ranks],
        "median_s": statistics.median(r0["seconds"]), "seconds": r0["seconds"],
        "trace": r0["trace_values"][0], "trace_values": r0["trace_values"],
        "ranks_agree": all(r["trace_values"] == r0["trace_values"] for r in ranks),
        "allreduce_calls_per_trace": len(sizes),
        "allreduce_bytes_per_trace": sum(sizes),
        "allreduce_d_vectors_per_trace": len(vectors),
        "allreduce_bytes_per_hvp_product": r0["allreduce_bytes_one_product"],
        "allreduce_outside_products_per_trace": {
            "d_vectors": len(vectors) - probes, "scalars": len(sizes) - len(vectors)},
        "allreduce_sizes_bytes": sorted(set(sizes)),
        "allreduce_alone_median_s": statistics.median(r0["allreduce_alone_seconds"]),
        "shard_only_median_s": statistics.median(r0["shard_only_seconds"]),
        "allreduce_alone_reps": len(r0["allreduce_alone_seconds"]),
        "loadavg_before": r0["loadavg_before"], "loadavg_after": r0["loadavg_after"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "distributed_cpu.json")
    args = ap.parse_args(argv)
    cfg = {"batch": args.batch, "probes": args.probes, "repeats": args.repeats,
           "seed": args.seed, "timeout": args.timeout}
    info = C.machine_info(torch.device("cpu"))
    rows = [_plain_row(cfg)]
    print(f"plain: {rows[0]['median_s']:.3f} s", flush=True)
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            rows.append(_dist_row(world, _spawn(world, cfg, out), cfg["probes"]))
            print(f"dist-P{world}: {rows[-1]['median_s']:.3f} s", flush=True)
    plain, p1, p2 = rows
    ref = plain["trace"]
    summary = {
        "speedup_P1_over_P2": p1["median_s"] / p2["median_s"],
        "speedup_plain_over_P2": plain["median_s"] / p2["median_s"],
        "overhead_P1_over_plain": p1["median_s"] / plain["median_s"],
        "target_speedup": 1.7,
        "speedup_shard_only_P1_over_P2": p1["shard_only_median_s"] / p2["shard_only_median_s"],
        "trace_rel_diff_vs_plain": {r["row"]: abs(r["trace"] - ref) / abs(ref) for r in rows},
        "allreduce_bytes_per_hvp_product": p2["allreduce_bytes_per_hvp_product"],
        "allreduce_d_vectors_per_trace": p2["allreduce_d_vectors_per_trace"],
        "allreduce_alone_P2_median_s": p2["allreduce_alone_median_s"],
        "ring_bytes_sent_per_rank_per_product_P2": 4 * p2["d"] * 2 * (2 - 1) / 2,
    }
    result = {"benchmark": "bench_distributed", "model": MODEL, "config": cfg,
              "workload": "Hutchinson trace of the Euclidean Hessian, quadratic_forms='hvp', "
                          "CrossEntropyLoss (mean), float32, seeded init, gloo on 127.0.0.1",
              "machine": info, "loadavg_at_end": list(os.getloadavg()),
              "rows": rows, "summary": summary}
    atomic_write_json(args.out, result)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
