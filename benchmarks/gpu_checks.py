"""CUDA against CPU: the same float64 computations on both devices (run where a GPU exists).

CI has no GPU, so the test suite never runs covariant on CUDA. This script is the check that
does, in one short run on a GPU machine: every quantity below is computed in float64 on the
CPU and on ``cuda``, from the same weights, data and seeds, and the relative difference
‖cuda − cpu‖ / ‖cpu‖ is recorded (agreement to ~1e-10 or better is expected; reductions run
in a different order on the GPU).

- ``kfac_*``: K-FAC (type-2 GGN) on a 1-D CNN (Conv1d + Linear): a matvec, the damped solve,
  the log-determinant.
- ``laplace_kron_*``: ``laplace(..., structure="kron")`` log evidence, and S Sᵀ for the square
  root S of its covariance that the posterior draws use.
- ``trace_euclidean``: a seeded stochastic Hutchinson trace (on CUDA the probes are batched
  with ``vmap``); ``trace_ggn_metric``: the invariant trace tr(G⁻¹Hess) with the GGN metric
  (connection terms, solves) on a small MLP.
- ``distributed_gloo_cuda``: 2 gloo processes holding CUDA tensors on the same GPU against one
  process on the full data (loss, gradient, HVP, GGN matvec).
- ``distributed_nccl_1``: an NCCL process group of one rank (one GPU: NCCL cannot put two ranks
  on one device) against the plain space.

Usage::

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu_checks_cuda.json

Without CUDA it exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
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

CPU = torch.device("cpu")


def _rel(a: Any, b: Any) -> float:
    a = torch.as_tensor(a, dtype=torch.float64).cpu()
    b = torch.as_tensor(b, dtype=torch.float64).cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _cnn(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, -1)), nn.Conv1d(1, 4, 5, stride=2), nn.ReLU(),
                          nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(1), nn.Linear(6 * 14, 16),
                          nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(48, 36, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    return model.to(device).eval(), X.to(device), y.to(device)


def _kfac(device: torch.device) -> dict[str, Any]:
    from covariant.laplace import laplace, posterior_space

    model, X, y = _cnn(device)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    K = cv.metrics.KFAC.from_space(space, damping=1e-2).factors(theta)
    v = torch.randn(theta.shape[0], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(device)
    post, p_map = posterior_space(model, (X, y), likelihood="classification",
                                  prior_precision=1.0)
    lap = laplace(post, p_map, riemannian=False, structure="kron")
    return {"kfac_matvec": K.matmat(v[:, None])[:, 0], "kfac_solve": K.solve(v),
            "kfac_logdet": torch.tensor(float(K.logdet()), dtype=torch.float64),
            "laplace_kron_log_evidence": torch.tensor(float(lap.log_evidence), dtype=torch.float64),
            "laplace_kron_sqrt_gram": _gram(lap.covariance_operator, theta)}


def _gram(cov: Any, theta: torch.Tensor) -> torch.Tensor:
    """S Sᵀ of the covariance's square root S (= Σ): the draws S z themselves differ between
    devices, since S = Q Λ^{-1/2} depends on the sign choices of each eigendecomposition."""
    S = cov.sqrt_matmat(torch.eye(theta.shape[0], dtype=theta.dtype, device=theta.device))
    return S @ S.T


def _traces(device: torch.device) -> dict[str, Any]:
    from covariant.flatness import StochasticOptions

    model, X, y = _cnn(device)
    opts = StochasticOptions(num_probes=16, seed=4)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    eu = cv.flatness(space, theta, ("trace",), method="stochastic", options=opts)
    ggn, t2 = cv.ParameterSpace.from_module(_mlp().to(device), nn.MSELoss(), _batches(device),
                                            "ggn")
    inv = cv.flatness(ggn, t2, ("trace",), method="stochastic",
                      options=StochasticOptions(num_probes=8, seed=4))
    return {"trace_euclidean": torch.tensor(eu["trace"].value, dtype=torch.float64),
            "trace_ggn_metric": torch.tensor(inv["trace"].value, dtype=torch.float64)}


def _mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(20, 2, generator=g, dtype=torch.float64).to(device)
    return [(X[a:b], y[a:b]) for a, b in ((0, 7), (7, 12), (12, 18), (18, 20))]


def _dist_products(space: cv.ParameterSpace, theta: torch.Tensor,
                   ggn: cv.ParameterSpace) -> dict[str, torch.Tensor]:
    v = torch.randn(theta.shape[0], generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64).to(theta.device)
    return {"loss": space.loss(theta).detach(), "grad": space.grad(theta),
            "hvp": space.hvp(theta, v, riemannian=False), "ggn_matvec": ggn.metric.matvec(theta, v)}


def _single(device: torch.device) -> dict[str, torch.Tensor]:
    model = _mlp().to(device)
    space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), _batches(device))
    ggn, _ = cv.ParameterSpace.from_module(model, nn.MSELoss(), _batches(device), "ggn")
    return {k: v.cpu() for k, v in _dist_products(space, theta, ggn).items()}


def _gloo_worker(rank: int, port: int, out: str) -> None:
    from covariant.distributed import distributed_space, shard_batches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        dev = torch.device("cuda")
        local = shard_batches(_batches(dev), rank, 2)
        space, theta = distributed_space(_mlp().to(dev), nn.MSELoss(), local, seed=3)
        ggn, _ = distributed_space(_mlp().to(dev), nn.MSELoss(), local, "ggn", seed=3)
        res = {k: v.cpu() for k, v in _dist_products(space, theta, ggn).items()}
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distributed() -> dict[str, float]:
    from covariant.distributed import distributed_space

    ref = _single(CPU)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_gloo_worker, args=(_free_port(), tmp), nprocs=2,
                           start_method="spawn", join=True)
        for r in range(2):
            got = torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True)
            for k, v in got.items():
                out[f"distributed_gloo_cuda.{k}.rank{r}"] = _rel(v, ref[k])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("nccl", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        dev = torch.device("cuda")
        space, theta = distributed_space(_mlp().to(dev), nn.MSELoss(), _batches(dev), seed=3)
        ggn, _ = distributed_space(_mlp().to(dev), nn.MSELoss(), _batches(dev), "ggn", seed=3)
        for k, v in _dist_products(space, theta, ggn).items():
            out[f"distributed_nccl_1.{k}"] = _rel(v, ref[k])
    finally:
        dist.destroy_process_group()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_checks_cuda.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_checks: CUDA is not available here; nothing to check", file=sys.stderr)
        return 2
    cuda = torch.device("cuda")
    result: dict[str, Any] = {"machine": C.machine_info(cuda), "rel_diff": {}, "errors": {}}
    for name, fn in (("kfac", _kfac), ("traces", _traces)):
        t0 = time.perf_counter()
        try:
            ref, got = fn(CPU), fn(cuda)
            for k in ref:
                result["rel_diff"][k] = _rel(got[k], ref[k])
        except Exception as err:  # record and go on: one failure must not hide the others
            result["errors"][name] = f"{type(err).__name__}: {err}"
        result[f"seconds_{name}"] = time.perf_counter() - t0
    try:
        result["rel_diff"].update(_distributed())
    except Exception as err:
        result["errors"]["distributed"] = f"{type(err).__name__}: {err}"
    for k, v in result["rel_diff"].items():
        print(f"{k:48s} {v:.2e}")
    for k, v in result["errors"].items():
        print(f"ERROR {k}: {v}")
    atomic_write_json(args.out, result)
    print(f"# results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
