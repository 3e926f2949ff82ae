"""covariant.distributed: 2 gloo processes on 127.0.0.1 agree with one process on the full data.

Each test spawns 2 CPU processes (torch.multiprocessing) with a timeout, so a hang fails the
test instead of blocking CI.
"""

from __future__ import annotations

import datetime
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
from covariant.distributed.space import OVERLAP_BLOCKS
from covariant.errors import DistributedError
from covariant.flatness import StochasticOptions

from . import distributed_cases as C

TIMEOUT_S = 60.0
#: The agreement run computes about 60 quantities on 3 models in each rank.
AGREEMENT_TIMEOUT_S = 240.0
RTOL = 1e-12


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_model = C.mlp  # the same float64 MLP in every process
_batches = C.batches  # uneven shards: rank 0 gets batches of 7 and 5, rank 1 of 6 and a last 2


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _agreement_worker(rank: int, port: int, out: str) -> None:
    """Every compared quantity (distributed_cases.compute_all) and the traffic, per rank."""
    _init(rank, port)
    try:
        _bad_launches(rank, out)
        _taylor_refusal(rank, out)
        _monte_carlo_refusal(rank, out)
        torch.save(C.compute_all(True), os.path.join(out, f"rank{rank}.pt"))
        torch.save(C.traffic(), os.path.join(out, f"traffic{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def agreement(tmp_path_factory: Any) -> dict[str, Any]:
    """One spawn of 2 ranks for the module; the single process on the full data."""
    out = tmp_path_factory.mktemp("ranks")
    _spawn(_agreement_worker, str(out), AGREEMENT_TIMEOUT_S)
    torch.set_num_threads(1)
    return {"single": C.compute_all(False), "out": out,
            "ranks": [torch.load(out / f"rank{r}.pt") for r in range(2)],
            "traffic": [torch.load(out / f"traffic{r}.pt") for r in range(2)]}


def _check(agreement: dict[str, Any], prefix: str, rtol: float = RTOL) -> list[str]:
    names = [n for n in agreement["single"] if n.startswith(prefix)]
    for row in C.agreement({n: agreement["single"][n] for n in names}, agreement["ranks"]):
        assert row["rel_diff"] <= rtol, row
    return names


def _bad_launches(rank: int, out: str) -> None:
    """Three bad launches in a row: other parameters, another seed, bad data on rank 1."""
    # the group stays usable after each: every rank raises after the all-gather
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
    with open(os.path.join(out, f"bad{rank}.txt"), "w") as f:
        f.write("\n".join(results))


def _taylor_refusal(rank: int, out: str) -> None:
    """quadratic_forms="taylor" on a distributed space: the same typed error on every rank."""
    space, theta = C.model_space(_model(), _batches(), True)
    opts = StochasticOptions(num_probes=2, seed=0, quadratic_forms="taylor")
    try:
        cv.flatness(space.with_loss(lambda p: space.loss(p) + (p ** 2).sum()), theta,
                    ("trace",), method="stochastic", options=opts)
        result = "no error"
    except cv.errors.CovariantError as err:
        result = f"{type(err).__name__}: {err}"
    with open(os.path.join(out, f"taylor{rank}.txt"), "w") as f:
        f.write(result)


def _monte_carlo_refusal(rank: int, out: str) -> None:
    """A Monte-Carlo metric in data-parallel RiemannianGD: a ValueError naming the option."""
    model = _model()
    results = []
    for kwargs in ({"metric": "fisher", "metric_kwargs": {"mc_samples": 1}},
                   {"metric": "kfac", "metric_kwargs": {"fisher_type": "mc"}}):
        try:
            cv.optim.RiemannianGD(model.parameters(), lr=0.1, model=model, loss_fn=nn.MSELoss(),
                                  data=_batches()[0], data_parallel=True, **kwargs)
            results.append("no error")
        except ValueError as err:
            results.append(f"ValueError: {err}")
    with open(os.path.join(out, f"mc{rank}.txt"), "w") as f:
        f.write("\n".join(results))


def _spawn(worker: Any, out: str, timeout: float = TIMEOUT_S) -> None:
    ctx = mp.start_processes(worker, args=(_free_port(), out), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2 ranks did not finish within {timeout} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def test_two_ranks_agree_with_one_process(agreement: dict[str, Any]) -> None:
    """Loss, gradient, HVPs (one, and 3 batched by vmap), GGN matvec and dense, a seeded
    Hutchinson trace and the top-3 eigenvalues, with uneven shards."""
    names = _check(agreement, "mlp/", RTOL)
    assert {"mlp/loss", "mlp/grad", "mlp/hvp", "mlp/hvp_batched_vmap", "mlp/hvp_matmat",
            "mlp/ggn_matmat", "mlp/ggn_matvec", "mlp/taylor_trace",
            "mlp/hutchinson_trace", "mlp/top3_eigs"} <= set(names)


def test_model_metrics_of_the_binding_agree(agreement: dict[str, Any]) -> None:
    """space.with_metric on the distributed space: the GGN's own solve, rank and log det,
    the Riemannian Hessian with the GGN and a damped GGN (connection terms; one-off and
    operator forms), the empirical Fisher, the seeded
    MC Fisher and K-FAC with fisher_type="mc" (Gaussian and categorical draws: the same
    labels as one process), K-FAC, EK-FAC, the dense Hessian; and ReducedMetric around a
    shard's own GGN (matvec, solve, rank, log det, Riemannian HVP)."""
    names = _check(agreement, "metrics/", RTOL)
    assert len(names) == 19
    assert float(agreement["single"]["metrics/ggn_rank"]) == 8
    assert float(agreement["single"]["metrics/reduced_metric_rank"]) == 8


def test_riemannian_gd_and_laplace_agree(agreement: dict[str, Any]) -> None:
    """Five data-parallel RiemannianGD steps (damped GGN, momentum; K-FAC and EK-FAC with
    factors refreshed and averaged on the ranks), and the Laplace log
    evidence and a covariance product for structures full, diag, kron and lowrank
    (regression), and the evidence of a classification posterior (kron, diag)."""
    assert _check(agreement, "optim/", RTOL) == ["optim/riemannian_gd_5_steps",
                                                  "optim/kfac_5_steps", "optim/ekfac_5_steps"]
    assert len(_check(agreement, "laplace/", RTOL)) == 11


@pytest.mark.parametrize("model", ["batchnorm", "attention", "parametrized"])
def test_batch_norm_attention_and_parametrized_models_agree(agreement: dict[str, Any],
                                                            model: str) -> None:
    names = _check(agreement, f"{model}/", RTOL)
    assert len(names) == 12


def test_one_all_reduce_per_product(agreement: dict[str, Any]) -> None:
    """A d-vector per product, k of them stacked for k probes batched by vmap (which
    rebuilds the loss and gradient once); a scalar for the loss; the K-FAC factors of a pass
    in one all-reduce of all their entries."""
    d = 32
    kfac = 3 * 3 + 5 * 5 + 5 * 5 + 2 * 2 + d  # A (in²) and B (out²) per layer, a d-diagonal
    for traffic in agreement["traffic"]:
        assert traffic["loss"] == [()]
        assert traffic["grad"] == [(), (d,)]
        assert traffic["hvp_operator"] == [(d,)]
        assert traffic["hvp_batched_3"] == [(), (d,), (3, d)]  # loss, gradient, 3 products
        assert traffic["hvp_matmat_3"] == [(1, d)] * 3  # local graph, 3 products in 3 blocks
        assert traffic["ggn_matmat_3"] == [(3, d)]
        assert traffic["taylor_form"] == [()]  # the local form, summed: one scalar
        # a Hutchinson trace of 4 probes by HVPs: besides the loss and the gradient of the
        # report, the 4 products in row blocks (at most OVERLAP_BLOCKS, each reduced while
        # the next is computed), 4 d-vectors in all, and no per-probe (d,) all-reduce
        # (before: 4 more all-reduces of (d,))
        hutch = traffic["hutchinson_hvp_4"]
        blocks = [s for s in hutch if len(s) == 2]
        assert sorted(s for s in hutch if len(s) < 2) == [(), (), (d,)]
        assert sum(b[0] for b in blocks) == 4 and {b[1] for b in blocks} == {d}
        assert len(blocks) <= OVERLAP_BLOCKS
        assert traffic["hvp_matmat_8"] == [(2, d)] * 4  # 8 probes: 4 blocks of 2 rows
        assert traffic["ggn_matvec"] == [(d,)]
        assert traffic["ggn_dense"] == [(d, d)]
        assert traffic["kfac_factors"] == [(kfac,)]
        # tanh layer, d = 8, GGN metric: each rank's Euclidean HVP minus its connection
        # terms (two directional derivatives of its G_r, one gradient of vᵀG_r r), summed in
        # one all-reduce (before: 9, each product of G reduced by itself)
        assert traffic["riemannian_hvp_operator"] == [(8,)]


def test_bad_launches_raise_on_every_rank(agreement: dict[str, Any]) -> None:
    """Run first in the agreement ranks, whose group then still computes everything."""
    for rank in range(2):
        params, seed, data = (agreement["out"] / f"bad{rank}.txt").read_text().split("\n")
        for line in (params, seed):
            assert "DistributedError" in line and "disagree" in line, (rank, line)
            assert "[[0], [1]]" in line, (rank, line)
        if rank == 1:  # the rank with the bad data raises its own error, the other one too
            assert data.startswith("data: ShapeMismatchError"), data
        else:
            assert data.startswith("data: DistributedError") and "rank 1 failed" in data, data


def test_taylor_mode_refuses_a_sum_over_ranks(agreement: dict[str, Any]) -> None:
    """Taylor mode cannot trace the all-reduce (it would see the reduced loss as a constant
    and trace only the rest, here a penalty): it raises on every rank, and "auto" falls back
    to HVPs (laplace/posterior_trace_auto agrees with one process's Taylor forms)."""
    for rank in range(2):
        text = (agreement["out"] / f"taylor{rank}.txt").read_text()
        assert text.startswith("TaylorUnsupportedError") and "ranks" in text, text
    _check(agreement, "laplace/posterior_trace_auto", RTOL)


def test_monte_carlo_metrics_are_refused_data_parallel(agreement: dict[str, Any]) -> None:
    """Their labels are drawn per batch: the ranks' draws would not be one process's."""
    for rank in range(2):
        lines = (agreement["out"] / f"mc{rank}.txt").read_text().split("\n")
        assert len(lines) == 2
        for line in lines:
            assert line.startswith("ValueError") and "Monte-Carlo" in line, line


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
