"""Data-parallel Hutchinson trace: P = 1 vs P = 2 gloo processes (issue 13's benchmark).

Workload: the HVP-bound Hutchinson trace of the Euclidean Hessian of mlp-80k (seeded
initialization, float32) on one batch of ``--batch`` (4096) MNIST-1D training examples,
``--probes`` (20) Rademacher probes, ``quadratic_forms="hvp"`` (one Hessian-vector product per
probe; the distributed rows compute the 20 probes' local products, then all-reduce them as
one (20, d) block: ``RankSumLoss.hvp_matmat``). Every process runs
with ``torch.set_num_threads(1)``. One run spawns one 2-rank gloo group on 127.0.0.1 (a
free port) and measures every row in it:

  plain          rank 0 alone, ``ParameterSpace.from_module`` on the full batch (reference)
  dist-P1        rank 0 alone, ``distributed_space`` in a group of world size 1
  dist-P2        both ranks, ``distributed_space`` on the world group, half the batch each
  shard-only-P2  both ranks, a plain (unreduced) space on each half, concurrently: the
                 compute-only ceiling that shows how much parallelism the machine gave

The rows run in turn, round by round (a warm-up round with 2 probes, then ``--repeats`` (3)
timed rounds), each between world barriers; a rank that takes no part in a row waits at the
barrier (a waiting gloo rank uses no CPU). Medians are reported. One more trace per
distributed row counts the all-reduces (``torch.distributed.all_reduce`` wrapped in the
worker): calls and bytes per trace, and per HVP product (``hvp_operator(θ)(v)``).
``allreduce_alone`` times one all-reduce of a float32 d-vector by itself, the communication
term of the cost model in docs/scale.md. The trace values of plain, dist-P1 and dist-P2
agree up to float32 round-off (the same seed draws the same probes on every rank).

Usage::

    python benchmarks/bench_distributed.py                 # batch 4096, 20 probes, 3 repeats
    python benchmarks/bench_distributed.py --repeats 5 --out /tmp/d.json

The spawned group has a timeout (``--timeout``, 900 s), so nothing hangs. Writes
``benchmarks/results/distributed_cpu.json`` atomically unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
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
ROWS = ("plain", "dist-P1", "dist-P2", "shard-only-P2")


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


def _time_allreduce(d: int, group: Any, member: bool) -> list[float]:
    """Seconds of one all-reduce of a float32 d-vector in ``group``, ALLREDUCE_REPS times
    (after 5 warm-up calls); a rank outside the group only joins the world barriers."""
    v = torch.ones(d, dtype=torch.float32)
    times = []
    for i in range(ALLREDUCE_REPS + 5):
        dist.barrier()
        if member:
            t0 = time.perf_counter()
            dist.all_reduce(v, group=group)
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return times


def _spaces(rank: int, cfg: dict[str, Any], solo: Any) -> dict[str, Any]:
    """Each row's (space, θ) on this rank; None where the rank takes no part in the row."""
    model, X, y = _model_and_batch(cfg["batch"], cfg["seed"])
    loss = nn.CrossEntropyLoss()
    half = X.shape[0] // 2
    local = shard_batches([(X[:half], y[:half]), (X[half:], y[half:])], rank, 2)
    spaces: dict[str, Any] = {"plain": None, "dist-P1": None}
    if rank == 0:
        spaces["plain"] = cv.ParameterSpace.from_module(model, loss, [(X, y)])
        spaces["dist-P1"] = distributed_space(model, loss, [(X, y)], group=solo, seed=0)
    spaces["dist-P2"] = distributed_space(model, loss, local, seed=0)
    spaces["shard-only-P2"] = cv.ParameterSpace.from_module(model, loss, local)
    spaces["local_examples"] = sum(len(b[0]) for b in local)
    return spaces


def _rounds(spaces: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds: plain, dist-P1, dist-P2, shard-only-P2 in turn, each timed between
    world barriers (a rank that takes no part waits at the barrier)."""
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    values: dict[str, list[float]] = {row: [] for row in ROWS}
    loadavg = []
    for i in range(cfg["repeats"] + 1):  # round 0 is the warm-up (2 probes)
        loadavg.append(list(os.getloadavg()))
        for row in ROWS:
            dist.barrier()
            if spaces[row] is not None:
                t0 = time.perf_counter()
                value = _trace(*spaces[row], cfg["probes"] if i else 2)
                if row in ("dist-P2", "shard-only-P2"):
                    dist.barrier()  # P = 2 ends when both ranks are done
                if i:
                    times[row].append(time.perf_counter() - t0)
                    values[row].append(value)
            elif row in ("dist-P2", "shard-only-P2"):
                dist.barrier()
    return {"seconds": times, "trace_values": values, "loadavg_per_round": loadavg}


def _worker(rank: int, port: int, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=cfg["timeout"]))
    try:
        solo = dist.new_group([0])  # P = 1: a group of world size 1 (rank 1 waits)
        spaces = _spaces(rank, cfg, solo)
        res = _rounds(spaces, cfg)
        theta = spaces["dist-P2"][1]
        counts: dict[str, Any] = {}
        for row in ("dist-P1", "dist-P2"):
            dist.barrier()
            if spaces[row] is not None:
                space, _ = spaces[row]
                _, counts[row] = _count_allreduces(
                    lambda s=space: _trace(s, theta, cfg["probes"]))
                op = space.hvp_operator(theta, riemannian=False)  # the per-probe product
                _, counts[row + " one product"] = _count_allreduces(
                    lambda o=op: o(torch.ones_like(theta)))
        d = int(theta.shape[0])
        res.update(rank=rank, d=d, local_examples=spaces["local_examples"],
                   allreduce_bytes=counts, threads=torch.get_num_threads(),
                   allreduce_alone_seconds={"dist-P1": _time_allreduce(d, solo, rank == 0),
                                            "dist-P2": _time_allreduce(d, None, True)})
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _spawn(cfg: dict[str, Any], out: str) -> list[dict[str, Any]]:
    ctx = mp.start_processes(_worker, args=(_free_port(), cfg, out), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + cfg["timeout"]
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2 ranks did not finish in {cfg['timeout']} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def _row(row: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    r0, d_bytes = ranks[0], 4 * ranks[0]["d"]
    secs = r0["seconds"][row]
    out: dict[str, Any] = {
        "row": row, "processes": 2 if row.endswith("P2") else 1, "threads_per_process": 1,
        "d": r0["d"], "median_s": statistics.median(secs), "seconds": secs,
        "trace": r0["trace_values"][row][0], "trace_values": r0["trace_values"][row]}
    if row.endswith("P2"):
        out["ranks_agree"] = ranks[1]["trace_values"][row] == r0["trace_values"][row]
        out["local_examples"] = [r["local_examples"] for r in ranks]
    if row.startswith("dist"):
        sizes = r0["allreduce_bytes"][row]
        out.update({
            "allreduce_calls_per_trace": len(sizes), "allreduce_bytes_per_trace": sum(sizes),
            # d-vectors moved in all (a (k, d) block of probes counts k), and calls of one
            "allreduce_d_vectors_per_trace": sum(s // d_bytes for s in sizes),
            "allreduce_calls_of_d_vectors_per_trace": sum(s >= d_bytes for s in sizes),
            "allreduce_bytes_one_hvp_product": r0["allreduce_bytes"][row + " one product"],
            "allreduce_alone_median_s": statistics.median(r0["allreduce_alone_seconds"][row]),
            "allreduce_alone_reps": len(r0["allreduce_alone_seconds"][row])})
    return out


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
    with tempfile.TemporaryDirectory() as out:
        ranks = _spawn(cfg, out)
    rows = {row: _row(row, ranks) for row in ROWS}
    med = {row: r["median_s"] for row, r in rows.items()}
    ref = rows["plain"]["trace"]
    summary = {
        "speedup_P1_over_P2": med["dist-P1"] / med["dist-P2"],
        "speedup_plain_over_P2": med["plain"] / med["dist-P2"],
        "overhead_P1_over_plain": med["dist-P1"] / med["plain"],
        "speedup_plain_over_shard_only_P2": med["plain"] / med["shard-only-P2"],
        "target_speedup": 1.7,
        "trace_rel_diff_vs_plain": {row: abs(r["trace"] - ref) / abs(ref)
                                    for row, r in rows.items() if row != "shard-only-P2"},
        "allreduce_bytes_one_hvp_product_P2": rows["dist-P2"]["allreduce_bytes_one_hvp_product"],
        "allreduce_calls_per_trace_P2": rows["dist-P2"]["allreduce_calls_per_trace"],
        "allreduce_d_vectors_per_trace_P2": rows["dist-P2"]["allreduce_d_vectors_per_trace"],
        "allreduce_calls_of_d_vectors_per_trace_P2":
            rows["dist-P2"]["allreduce_calls_of_d_vectors_per_trace"],
        "allreduce_alone_median_s": {row: rows[row]["allreduce_alone_median_s"]
                                     for row in ("dist-P1", "dist-P2")},
        "ring_bytes_sent_per_rank_per_product_P2": 4 * rows["dist-P2"]["d"] * 2 * (2 - 1) / 2,
        "loadavg_per_round": ranks[0]["loadavg_per_round"],
    }
    result = {"benchmark": "bench_distributed", "model": MODEL, "config": cfg,
              "workload": "Hutchinson trace of the Euclidean Hessian, quadratic_forms='hvp', "
                          "CrossEntropyLoss (mean), float32, seeded init, gloo on 127.0.0.1",
              "machine": info, "loadavg_at_end": list(os.getloadavg()),
              "rows": list(rows.values()), "summary": summary}
    atomic_write_json(args.out, result)
    for row, r in rows.items():
        print(f"{row:14s} {r['median_s']:.3f} s  trace {r['trace']:.8g}")
    print(json.dumps({k: v for k, v in summary.items() if k != "loadavg_per_round"}, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
