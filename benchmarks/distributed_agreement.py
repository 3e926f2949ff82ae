"""The agreement table of issue 13: 2 gloo ranks against one process on the full data.

Runs the quantities of ``tests/distributed_cases.py`` (the same code the agreement tests run:
an MLP with uneven shards, its model metrics, a tanh layer's GGN solves and Riemannian
Hessian, five data-parallel RiemannianGD steps, Laplace "full" / "diag" / "kron" /
"lowrank", and a batch-norm (eval) and an attention model) in a 2-rank gloo group on
127.0.0.1 and in this process on the full data, all in float64, and writes one row per
quantity: the single-process value, the 2-rank value (the worse rank; tensors by their
norm) and the relative difference ‖a − b‖ / ‖b‖. Also the all-reduce shapes per product.

Usage::

    python benchmarks/distributed_agreement.py          # writes results/distributed_agreement.json
    python benchmarks/distributed_agreement.py --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from tests import distributed_cases as C  # noqa: E402


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=600))
    try:
        torch.save({"values": C.compute_all(True), "traffic": C.traffic()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "distributed_agreement.json"))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(port, tmp), nprocs=2, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    torch.set_num_threads(1)
    single = C.compute_all(False)
    rows = C.agreement(single, [r["values"] for r in ranks])
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "dtype": "float64", "backend": "gloo", "world_size": 2,
        "rows": rows, "max_rel_diff": max(r["rel_diff"] for r in rows),
        "traffic_rank0": {k: [list(s) for s in v] for k, v in ranks[0]["traffic"].items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| quantity | single process | 2 processes | relative difference |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['quantity']} | {r['single']} | {r['two_ranks']} | {r['rel_diff']:.1e} |")
    print(f"max relative difference: {result['max_rel_diff']:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
