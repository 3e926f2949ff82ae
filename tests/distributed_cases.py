"""The quantities that tests/test_distributed*.py compare between 2 ranks and one process.

Every function here runs twice: in each of 2 gloo ranks on its shard (``distributed=True``),
and in the test process on the full data (``distributed=False``); both sides call the same
code on the same seeded models and data, so only the data split differs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import vmap

import covariant as cv
from covariant._fast import QuadraticForm
from covariant.distributed import (
    ReducedMetric,
    distributed_posterior_space,
    distributed_space,
    hvp_matmat,
    metric_matmat,
    shard_batches,
)
from covariant.flatness import StochasticOptions
from covariant.laplace import posterior_space
from covariant.optim import RiemannianGD
from covariant.optim.functional import riemannian_gd

Batch = tuple[Tensor, Tensor]


def seeded(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """The same float64 parameters in every process (whatever the default seed)."""
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=g, dtype=torch.float64))
    return model


def mlp() -> nn.Module:
    return seeded(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))


def bn_model() -> nn.Module:
    """An MLP with batch norm in eval mode (running statistics set, not the defaults)."""
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)))
    bn = model[1]
    bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64))
    bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.1, 2.0], dtype=torch.float64))
    return model.eval()


class TinyAttention(nn.Module):
    """A tiny transformer encoder layer on 3 tokens of width 4, mean-pooled to 2 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, nhead=2, dim_feedforward=6, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x.reshape(x.shape[0], 3, 4)).mean(1))


def tanh_layer() -> nn.Module:
    """tanh(W x + b): a GGN that depends on θ (connection terms), with κ(G) ≈ 20, so that
    solves amplify the products' rounding by little."""
    return seeded(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), scale=0.5)


def attention_model() -> nn.Module:
    return seeded(TinyAttention(), scale=0.5).eval()


class _Symmetric(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: W = (A + Aᵀ)/2."""

    def forward(self, A: Tensor) -> Tensor:
        return 0.5 * (A + A.T)


def parametrized_model() -> nn.Module:
    """An MLP whose hidden layer already uses ``torch.nn.utils.parametrize`` (a symmetric
    5 × 5 weight): the space's parameters are the parametrization's ``original``."""
    model = seeded(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                                 nn.Linear(5, 2)))
    torch.nn.utils.parametrize.register_parametrization(model[2], "weight", _Symmetric())
    return model


def batches(n_in: int = 3, seed: int = 1) -> list[Batch]:
    """Uneven shards for 2 ranks: rank 0 gets batches of 7 and 5, rank 1 of 6 and a last 2."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, n_in, generator=g, dtype=torch.float64)
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    cuts = [0, 7, 12, 18, 20]
    return [(X[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]


def union(bs: list[Batch]) -> Batch:
    return torch.cat([X for X, _ in bs]), torch.cat([y for _, y in bs])


def vectors(d: int, k: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(k, d, generator=g, dtype=torch.float64)


def labels(data: list[Batch]) -> list[Batch]:
    """The same inputs with 3-class labels (uneven shards as in :func:`batches`)."""
    g = torch.Generator().manual_seed(7)
    return [(X, torch.randint(0, 3, (X.shape[0],), generator=g)) for X, _ in data]


def model_space(model: nn.Module, data: list[Batch], distributed: bool,
                metric: str = "euclidean", loss_fn: nn.Module | None = None, **kw: Any
                ) -> tuple[cv.ParameterSpace, Tensor]:
    loss_fn = nn.MSELoss() if loss_fn is None else loss_fn
    if distributed:
        local = shard_batches(data, dist.get_rank(), dist.get_world_size())
        return distributed_space(model, loss_fn, local, metric, seed=3, **kw)
    return cv.ParameterSpace.from_module(model, loss_fn, data, metric, **kw)


def classification_products(data: list[Batch], distributed: bool) -> dict[str, Tensor]:
    """Cross-entropy: the seeded categorical label draws of the MC Fisher and of K-FAC with
    fisher_type="mc" (uniforms per example, skipped past the lower ranks' targets)."""
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    space, theta = model_space(model, labels(data), distributed,
                               loss_fn=nn.CrossEntropyLoss())
    v = vectors(theta.shape[0])[0]
    return {
        "ce_fisher_mc_matvec": space.with_metric("fisher", mc_samples=2, seed=9).metric.matvec(
            theta, v),
        "ce_kfac_mc_dense": space.with_metric("kfac", fisher_type="mc", mc_samples=2,
                                              seed=9).metric.dense(theta),
        "ce_ggn_matvec": space.with_metric("ggn").metric.matvec(theta, v),
    }


def _tensor(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def products(model_fn: Callable[[], nn.Module], data: list[Batch], distributed: bool,
             full: bool = True) -> dict[str, Tensor]:
    """Loss, gradient, HVPs, model metrics and estimators of one model."""
    space, theta = model_space(model_fn(), data, distributed)
    V = vectors(theta.shape[0])
    v = V[0]
    ggn = space.with_metric("ggn")
    opts = StochasticOptions(num_probes=4, seed=3, quadratic_forms="hvp")
    report = cv.flatness(space, theta, ("trace", "top_eigs"), method="stochastic", k=3,
                         options=opts)
    op = space.hvp_operator(theta, False)
    out = {
        "loss": space.loss(theta),
        "grad": space.grad(theta),
        "hvp": space.hvp(theta, v, riemannian=False),
        "hvp_operator": op(v),
        "hvp_batched_vmap": vmap(op)(V),
        "hvp_matmat": hvp_matmat(space, theta)(V),
        "ggn_matvec": ggn.metric.matvec(theta, v),
        "ggn_matmat": metric_matmat(ggn.metric, theta)(V),
        "ggn_dense": ggn.metric.dense(theta),
        "hutchinson_trace": _tensor(report["trace"].value),
        "top3_eigs": _tensor(report["top_eigs"].value),
        "gd_5_steps_functional": riemannian_gd(space, theta, lr=0.1, steps=5)[-1],
    }
    if full:
        out.update(metric_products(space, theta, v))
    return out


def solve_products(data: list[Batch], distributed: bool) -> dict[str, Tensor]:
    """The GGN's own solve (CG), rank and log det, and the Riemannian Hessian with the GGN
    (connection terms; r = G⁻¹∇L), on :func:`tanh_layer`."""
    space, theta = model_space(tanh_layer(), data, distributed, "ggn")
    v, g = vectors(theta.shape[0])[0], space.grad(theta)
    # ReducedMetric around a GGN of the shard alone (no DataShard): its generic products
    b = space.binding
    local = cv.metrics.GGN(b.forward, b.loss_fn, b.batches, b.weights)
    G = ReducedMetric(local) if distributed else space.metric
    return {
        "ggn_solve": space.metric.solve(theta, g),
        "ggn_rank": _tensor(space.metric.rank(theta)),
        "ggn_logdet": space.metric.logdet(theta),
        "ggn_riemannian_hvp": space.hvp(theta, v),
        # the operator form sums each rank's HVP and connection terms in one all-reduce
        "ggn_riemannian_hvp_operator": space.hvp_operator(theta)(v),
        "damped_ggn_riemannian_hvp_operator": space.with_metric(
            cv.metrics.Damped(space.metric, 0.1)).hvp_operator(theta)(v),
        "reduced_metric_matvec": G.matvec(theta, v),
        "reduced_metric_solve": G.solve(theta, g),
        "reduced_metric_rank": _tensor(G.rank(theta)),
        "reduced_metric_logdet": G.logdet(theta),
        "reduced_metric_riemannian_hvp": space.with_metric(G).hvp(theta, v),
    }


def metric_products(space: cv.ParameterSpace, theta: Tensor, v: Tensor) -> dict[str, Tensor]:
    """The model metrics of the binding: the empirical Fisher, the MC Fisher, K-FAC,
    EK-FAC and the dense Hessian."""
    return {
        "empirical_fisher_matvec": space.with_metric("empirical_fisher").metric.matvec(theta, v),
        "fisher_mc_matvec": space.with_metric("fisher", mc_samples=3, seed=5).metric.matvec(
            theta, v),
        "kfac_dense": space.with_metric("kfac").metric.dense(theta),
        "ekfac_matvec": space.with_metric("ekfac").metric.matvec(theta, v),
        "dense_hessian": space.hessian(theta, riemannian=False),
    }


def gd_steps(data: list[Batch], distributed: bool, steps: int = 5) -> Tensor:
    """Five RiemannianGD steps with the damped GGN, one batch per rank (7+5 | 6+2)."""
    model = mlp()
    if distributed:
        local = union(shard_batches(data, dist.get_rank(), dist.get_world_size()))
    else:
        local = union(data)
    opt = RiemannianGD(model.parameters(), lr=0.5, metric="ggn", model=model,
                       loss_fn=nn.MSELoss(), data=local, damping=1e-2, momentum=0.5,
                       cg_tol=1e-13, data_parallel=distributed)
    for _ in range(steps):
        opt.zero_grad()
        nn.MSELoss()(model(local[0]), local[1]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def kfac_steps(data: list[Batch], distributed: bool, kind: str, steps: int = 5) -> Tensor:
    """Five K-FAC (EK-FAC) RiemannianGD steps, one batch per rank (7+5 | 6+2), the factors
    refreshed at steps 0, 2, 4 and averaged: on the ranks they are reduced at each refresh."""
    model = mlp()
    if distributed:
        local = union(shard_batches(data, dist.get_rank(), dist.get_world_size()))
    else:
        local = union(data)
    opt = RiemannianGD(model.parameters(), lr=0.5, metric=kind, model=model,
                       loss_fn=nn.MSELoss(), data=local, damping=1e-2, kfac_update_every=2,
                       kfac_decay=0.5, data_parallel=distributed)
    for _ in range(steps):
        opt.zero_grad()
        nn.MSELoss()(model(local[0]), local[1]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def laplace_quantities(data: list[Batch], distributed: bool) -> dict[str, Tensor]:
    """Laplace log evidence and covariance products of a regression posterior."""
    model = mlp()
    kw = dict(likelihood="regression", sigma_noise=0.7, prior_precision=2.0)
    if distributed:
        local = union(shard_batches(data, dist.get_rank(), dist.get_world_size()))
        space, theta = distributed_posterior_space(model, local, seed=0, **kw)
    else:
        space, theta = posterior_space(model, union(data), **kw)
    v = vectors(theta.shape[0])[1]
    # quadratic_forms="auto": Taylor mode in one process; on the ranks the reduced likelihood
    # refuses to be traced and the forms run as HVPs (tracing only the prior would be wrong)
    trace = cv.flatness(space, theta, ("trace",), method="stochastic",
                        options=StochasticOptions(num_probes=3, seed=1))["trace"]
    out: dict[str, Tensor] = {"posterior_trace_auto": _tensor(trace.value)}
    cases = {"full": dict(structure="full", hessian="ggn"),
             "diag": dict(structure="diag", hessian="ggn"),
             "kron": dict(structure="kron"),
             "lowrank": dict(structure="lowrank", hessian="ggn", rank=4)}
    for name, options in cases.items():
        res = cv.laplace.laplace(space, theta, riemannian=False, **options)
        out[f"laplace_{name}_log_evidence"] = _tensor(res.log_evidence)
        out[f"laplace_{name}_covariance_matvec"] = res.covariance_operator.matvec(v)
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    if distributed:
        local = union(shard_batches(labels(data), dist.get_rank(), dist.get_world_size()))
        space, theta = distributed_posterior_space(model, local, prior_precision=1.5)
    else:
        space, theta = posterior_space(model, union(labels(data)), prior_precision=1.5)
    for name in ("kron", "diag"):
        res = cv.laplace.laplace(space, theta, riemannian=False, structure=name, hessian="ggn")
        out[f"classification_{name}_log_evidence"] = _tensor(res.log_evidence)
    return out


def compute_all(distributed: bool) -> dict[str, Tensor]:
    """Every compared quantity: the MLP (all products), five RiemannianGD steps, Laplace,
    and the batch-norm (eval) and attention models (products and estimators)."""
    data = batches()
    out = {f"mlp/{k}": v for k, v in products(mlp, data, distributed, full=False).items()}
    space, theta = model_space(mlp(), data, distributed)
    v = vectors(theta.shape[0])[0]
    taylor = StochasticOptions(num_probes=4, seed=3, quadratic_forms="taylor")
    out["mlp/taylor_trace"] = _tensor(cv.flatness(space, theta, ("trace",), method="stochastic",
                                                  options=taylor)["trace"].value)
    out.update({f"metrics/{k}": v for k, v in metric_products(space, theta, v).items()})
    out.update({f"metrics/{k}": v for k, v in solve_products(data, distributed).items()})
    out.update({f"metrics/{k}": v for k, v in classification_products(data, distributed).items()})
    out["optim/riemannian_gd_5_steps"] = gd_steps(data, distributed)
    for kind in ("kfac", "ekfac"):
        out[f"optim/{kind}_5_steps"] = kfac_steps(data, distributed, kind)
    out.update({f"laplace/{k}": v for k, v in laplace_quantities(data, distributed).items()})
    out.update({f"batchnorm/{k}": v
                for k, v in products(bn_model, data, distributed, full=False).items()})
    out.update({f"parametrized/{k}": v
                for k, v in products(parametrized_model, data, distributed, full=False).items()})
    out.update({f"attention/{k}": v
                for k, v in products(attention_model, batches(12), distributed,
                                     full=False).items()})
    return out


def traffic() -> dict[str, list[tuple[int, ...]]]:
    """The shapes of the all-reduces of each product (counted by wrapping dist.all_reduce)."""
    space, theta = model_space(mlp(), batches(), True)
    V = vectors(theta.shape[0])
    op = space.hvp_operator(theta, False)
    ggn = space.with_metric("ggn").metric
    kfac = space.with_metric("kfac").metric
    products = {"loss": lambda: space.loss(theta), "grad": lambda: space.grad(theta),
                "hvp_operator": lambda: op(V[0]), "hvp_batched_3": lambda: vmap(op)(V),
                "hvp_matmat_3": lambda: hvp_matmat(space, theta)(V),
                "hvp_matmat_8": lambda: hvp_matmat(space, theta)(torch.cat([V, V, V])[:8]),
                "ggn_matmat_3": lambda: metric_matmat(ggn, theta)(V),
                "ggn_matvec": lambda: ggn.matvec(theta, V[0]),
                "ggn_dense": lambda: ggn.dense(theta),
                "kfac_factors": lambda: kfac.factors(theta)}
    hutchinson = StochasticOptions(num_probes=4, seed=3, quadratic_forms="hvp")
    products["hutchinson_hvp_4"] = lambda: cv.flatness(space, theta, ("trace",),
                                                       method="stochastic", options=hutchinson)
    form = QuadraticForm(space.loss_function, theta)  # traces the local loss
    products["taylor_form"] = lambda: form(V[0])
    tanh, psi = model_space(tanh_layer(), batches(), True, "ggn")
    riemannian = tanh.hvp_operator(psi)  # r = G⁻¹∇L solved here, once
    products["riemannian_hvp_operator"] = lambda: riemannian(vectors(psi.shape[0])[0])
    shapes: list[tuple[int, ...]] = []
    all_reduce = dist.all_reduce

    def counting(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    out = {}
    dist.all_reduce = counting
    try:
        for name, product in products.items():
            shapes.clear()
            product()
            out[name] = list(shapes)
    finally:
        dist.all_reduce = all_reduce
    return out


def agreement(single: dict[str, Tensor], ranks: list[dict[str, Tensor]]) -> list[dict[str, Any]]:
    """Rows (quantity, single process, 2 processes, relative difference), worst rank."""
    rows = []
    for name, want in single.items():
        errs = [float((r[name] - want).norm() / want.norm()) for r in ranks]
        worst = max(range(len(ranks)), key=lambda i: errs[i])
        rows.append({"quantity": name, "single": _summary(want),
                     "two_ranks": _summary(ranks[worst][name]), "rel_diff": errs[worst]})
    return rows


def _summary(x: Tensor) -> float | str:
    """A scalar as itself, a tensor by its norm."""
    return float(x) if x.numel() == 1 else f"‖·‖ = {float(x.norm()):.15g}"
