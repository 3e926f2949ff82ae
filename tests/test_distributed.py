"""covariant.distributed: 2 gloo processes on 127.0.0.1 agree with one process on the full data.

Each test spawns 2 CPU processes (torch.multiprocessing) with a timeout, so a hang fails the
test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import covariant as cv
from covariant.distributed import check_process_group, distributed_space, shard_batches
from covariant.errors import DistributedError
from covariant.flatness import StochasticOptions
from covariant.optim.functional import riemannian_gd

TIMEOUT_S = 60.0
RTOL = 1e-12


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model() -> nn.Module:
    """The same float64 MLP in every process (whatever the default dtype and seed)."""
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64))
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uneven shards for 2 ranks: rank 0 gets batches of 7 and 5, rank 1 of 6 and a last 2."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    cuts = [0, 7, 12, 18, 20]
    return [(X[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]


def _vectors(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(d, generator=g, dtype=torch.float64), \
        torch.randn(d, generator=g, dtype=torch.float64)


def _products(space: cv.ParameterSpace, theta: torch.Tensor,
              ggn: cv.ParameterSpace) -> dict[str, Any]:
    v, _ = _vectors(theta.shape[0])
    opts = StochasticOptions(num_probes=8, seed=3)
    report = cv.flatness(space, theta, ("trace", "top_eigs"), method="stochastic", k=3,
                         options=opts)
    return {
        "loss": space.loss(theta),
        "grad": space.grad(theta),
        "hvp": space.hvp(theta, v),
        "hvp_euclidean": space.hvp(theta, v, riemannian=False),
        "hvp_operator": space.hvp_operator(theta)(v),
        "ggn_matvec": ggn.metric.matvec(theta, v),
        "ggn_dense": ggn.metric.dense(theta),
        "hutchinson_trace": torch.tensor(report["trace"].value, dtype=torch.float64),
        "top3_eigs": torch.as_tensor(report["top_eigs"].value, dtype=torch.float64),
        "gd_5_steps": riemannian_gd(space, theta, lr=0.1, steps=5)[-1],
    }


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _agreement_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        local = shard_batches(_batches(), rank, 2)
        space, theta = distributed_space(_model(), nn.MSELoss(), local, seed=3)
        ggn, _ = distributed_space(_model(), nn.MSELoss(), local, "ggn", seed=3)
        torch.save(_products(space, theta, ggn), os.path.join(out, f"rank{rank}.pt"))
        torch.save(_traffic(space, theta, ggn), os.path.join(out, f"traffic{rank}.pt"))
        try:  # the Riemannian Hessian of a data-dependent metric needs connection terms
            cv.flatness(ggn, theta, ("trace",), method="stochastic")
            result = "no error"
        except DistributedError as err:
            result = f"DistributedError: {err}"
        with open(os.path.join(out, f"ggn{rank}.txt"), "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


def _traffic(space: cv.ParameterSpace, theta: torch.Tensor,
             ggn: cv.ParameterSpace) -> dict[str, list[int]]:
    """The sizes of the all-reduces of each product (counted by wrapping dist.all_reduce)."""
    sizes: list[int] = []
    all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    v, _ = _vectors(theta.shape[0])
    op = space.hvp_operator(theta)
    products = {"loss": lambda: space.loss(theta), "grad": lambda: space.grad(theta),
                "hvp_operator": lambda: op(v), "ggn_matvec": lambda: ggn.metric.matvec(theta, v)}
    out = {}
    dist.all_reduce = counting
    try:
        for name, product in products.items():
            sizes.clear()
            product()
            out[name] = list(sizes)
    finally:
        dist.all_reduce = all_reduce
    return out


def _bad_launch_worker(rank: int, port: int, out: str) -> None:
    """Three bad launches in a row: other parameters, another seed, bad data on rank 1."""
    _init(rank, port)
    try:
        local = shard_batches(_batches(), rank, 2)
        model = _model()
        if rank == 1:
            with torch.no_grad():
                model[0].bias[0] += 1e-9
        bad_data = [(X, y[:-1]) for X, y in local] if rank == 1 else local
        cases = {"parameters": (model, local, 3), "seed": (_model(), local, 3 + rank),
                 "data": (_model(), bad_data, 3)}
        results = []
        for name, (m, data, seed) in cases.items():
            try:
                distributed_space(m, nn.MSELoss(), data, seed=seed)
                results.append(f"{name}: no error")
            except cv.errors.CovariantError as err:
                results.append(f"{name}: {type(err).__name__}: {err}")
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(results))
    finally:
        dist.destroy_process_group()


def _spawn(worker: Any, out: str) -> None:
    ctx = mp.start_processes(worker, args=(_free_port(), out), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2 ranks did not finish within {TIMEOUT_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def test_two_ranks_agree_with_one_process(tmp_path: Any) -> None:
    _spawn(_agreement_worker, str(tmp_path))
    space, theta = cv.ParameterSpace.from_module(_model(), nn.MSELoss(), _batches())
    ggn = space.with_metric("ggn")
    ref = _products(space, theta, ggn)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(ref)
        for name, want in ref.items():
            err = float((got[name] - want).norm() / want.norm())
            assert err <= RTOL, (rank, name, err, got[name], want)
        d = theta.shape[0]  # one all-reduce of a d-vector per product (a scalar for the loss)
        assert torch.load(tmp_path / f"traffic{rank}.pt") == {
            "loss": [1], "grad": [1, d], "hvp_operator": [d], "ggn_matvec": [d]}
        ggn_flatness = (tmp_path / f"ggn{rank}.txt").read_text()
        assert ggn_flatness.startswith("DistributedError") and "connection" in ggn_flatness


def test_bad_launches_raise_on_every_rank(tmp_path: Any) -> None:
    _spawn(_bad_launch_worker, str(tmp_path))
    for rank in range(2):
        params, seed, data = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        for line in (params, seed):
            assert "DistributedError" in line and "disagree" in line, (rank, line)
            assert "[[0], [1]]" in line, (rank, line)
        if rank == 1:  # the rank with the bad data raises its own error, the other one too
            assert data.startswith("data: ShapeMismatchError"), data
        else:
            assert data.startswith("data: DistributedError") and "rank 1 failed" in data, data


def test_no_process_group_is_a_typed_error() -> None:
    assert not dist.is_initialized()
    with pytest.raises(DistributedError, match="torchrun"):
        check_process_group()
    with pytest.raises(DistributedError, match="init_process_group"):
        distributed_space(_model(), nn.MSELoss(), _batches())


def test_shards_cover_the_batches_in_order() -> None:
    batches = _batches()
    for world in (1, 2, 3, 4):
        shards = [shard_batches(batches, r, world) for r in range(world)]
        flat = [b for s in shards for b in s]
        assert [id(X) for X, _ in flat] == [id(X) for X, _ in batches]
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="cannot give each"):
        shard_batches(batches, 0, 5)
