r"""Matrix-free, stochastic flatness measures at network scale (docs/math.md §4–5).

All measures are spectral quantities of the shape operator E = G⁻¹ Hess, applied matrix-free:
one Hessian-vector product (with the connection term, or the pullback fast path) and one
metric solve per product. E is self-adjoint in the G-inner product, so Lanczos and stochastic
Lanczos quadrature run in that inner product (``covariant.linalg``) and need no G^{-1/2}.

- trace: Hutchinson, Hutch++ or XTrace (:func:`covariant.linalg.hutchinson`, ...), with a
  standard error;
- max_eig, min_eig, top_eigs: thick-restart Lanczos, with residuals;
- logdet, spectral_density: stochastic Lanczos quadrature (SLQ) of log|λ| and of the
  Gaussian-broadened spectrum.

**Submersion charts** (weight norm). G_Ψ is singular along the gauge directions ker J, and
G⁺ is the pseudo-inverse on the horizontal space. The problem is then posed on the horizontal
space, in the coordinates u = J v of the chart's image: E_h u = J G⁺Hess J⁺ u, self-adjoint
in the inner product J⁺ᵀ G J⁺. Every product still uses the chart's own Hessian and metric;
the spectrum is exactly the nonzero spectrum of G⁺Hess (no gauge zeros), so the trace is
tr E and the log-determinant the pseudo-log-determinant (docs/math.md §5).

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: p.sum() ** 2 + (p**2).sum())   # Hess = 2·11ᵀ + 2I
>>> p = torch.zeros(8, dtype=torch.float64)
>>> r = cv.flatness(space, p, measures=("trace", "max_eig"), method="stochastic",
...                 num_probes=200, seed=0)
>>> abs(r["trace"].value - 32.0) < 3 * r["trace"].stderr
True
>>> round(r["max_eig"].value, 8), r["max_eig"].stderr is None
(18.0, True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from .. import autodiff, linalg
from .._fast import QuadraticForm, TaylorUnsupportedError
from .._fast import is_plain as _plain
from .._progress import progress_scope
from ..errors import NotConvergedError, SingularMetricError
from ..metrics import Euclidean, Pullback
from ..space import ParameterSpace
from .nulls import kernel_is_gauge, restrict_to_range, slq_pseudo_log_determinant
from .options import StochasticOptions, resolve_options
from .report import Measure
from .trace import factored_trace

__all__ = ["STOCHASTIC_MEASURES", "shape_operator_matvecs", "stochastic_flatness"]

STOCHASTIC_MEASURES = ("trace", "logdet", "max_eig", "min_eig", "top_eigs",
                       "spectral_density")

Matvec = Callable[[Tensor], Tensor]

#: SLQ probes per block of vmapped products with a data-dependent metric (unless
#: ``batch_size`` says otherwise): bounds the memory of one block; the numbers do not depend
#: on it (probes are drawn one by one).
SLQ_BLOCK = 16


class _Counter:
    """A matvec that counts its calls (and the columns of its block products, if any)."""

    def __init__(self, fn: Matvec) -> None:
        self.fn, self.count = fn, 0

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        return self.fn(v)

    def block(self) -> Matvec | None:
        """V ↦ A V on (d, b) blocks when the wrapped operator has ``matmat``, else None."""
        inner = getattr(self.fn, "matmat", None)
        if inner is None:
            return None

        def matmat(V: Tensor) -> Tensor:
            self.count += V.shape[1]
            return inner(V)

        return matmat


class _ShapeOperator:
    """u ↦ E u = G⁻¹Hess u for a full-rank metric, and ``matmat`` on (d, b) blocks: the
    Riemannian HVPs vmapped over the columns (the same products to rounding, about twice as
    fast on CPU), then one block solve where the metric keeps a factor (dense Cholesky or
    sample-space: one pass over the factor for all columns), per column otherwise."""

    def __init__(self, metric: Any, p: Tensor, hvp: Matvec) -> None:
        self.metric, self.p, self.hvp = metric, p, hvp

    def __call__(self, v: Tensor) -> Tensor:
        return self.metric.solve(self.p, self.hvp(v))

    def matmat(self, V: Tensor) -> Tensor:
        H = _columns(self.hvp, V)
        if self.metric.cholesky_factor(self.p) is not None \
                or self.metric.sample_space_factor(self.p) is not None:
            return self.metric.solve(self.p, H)
        return torch.stack([self.metric.solve(self.p, h) for h in H.T], 1)


def _columns(fn: Matvec, V: Tensor) -> Tensor:
    """fn applied to every column of V: vmapped, or one by one where vmap cannot batch."""
    try:
        return vmap(fn, in_dims=1, out_dims=1)(V)
    except Exception:  # no batching rule, or a real error that the loop raises again
        return torch.stack([fn(v) for v in V.T], 1)


def shape_operator_matvecs(
    space: ParameterSpace, p: Tensor, null_rtol: float | None = None
) -> tuple[Matvec, Matvec | None, int, int, Matvec | None]:
    """Matrix-free products for the spectral problem of E = G⁻¹ Hess at p.

    Returns
    -------
    matvec : u ↦ E u on a space of dimension ``dim``
    inner : u ↦ B u, the inner product in which ``matvec`` is self-adjoint (None: Euclidean)
    dim : the dimension of that space (the rank of G)
    num_gauge : number of gauge directions removed (dim ker J, or dim ker G)
    lift : maps a vector of that space back to the chart's coordinates (None: identity)

    For a submersion chart the problem is posed on the horizontal space in the coordinates
    of the chart's image, u = J v_h (dimension d = rank J): E_h u = J G⁺Hess J⁺ u with inner
    product J⁺ᵀ G J⁺. Its spectrum is exactly the nonzero spectrum of G⁺Hess, computed from
    the chart's own Hessian and metric products, with no gauge eigenvalues at all.

    Any other singular metric is restricted to its range, as the dense method does
    (:func:`_range_restricted_matvecs`).
    """
    metric = space.metric
    hvp = space.hvp_operator(p)  # the gradient graph and G⁻¹∇L are shared by all products
    if isinstance(metric, Euclidean):
        return hvp, None, p.shape[0], 0, None

    e_matvec = _ShapeOperator(metric, p, hvp)
    d = p.shape[0]
    rank = metric.rank(p)
    if rank == d:
        return e_matvec, _MetricProduct(metric, p), d, 0, None
    h = space.chart
    if not kernel_is_gauge(space, p, rank):
        return _range_restricted_matvecs(space, p, hvp, rank, null_rtol)
    assert h is not None
    lin = h.linearize(p)  # the chart's per-point work (θ, weight norms) done once
    if isinstance(metric, Pullback) and metric.reparam is h:
        gmv, solve = metric.products(p, lin)
    else:
        def gmv(v: Tensor) -> Tensor:
            return metric.matvec(p, v)

        def solve(w: Tensor) -> Tensor:
            return metric.solve(p, w)

    def horizontal_matvec(u: Tensor) -> Tensor:
        return lin.jvp(solve(hvp(lin.inverse_jvp(u))))

    def horizontal_inner(u: Tensor) -> Tensor:
        return lin.inverse_vjp(gmv(lin.inverse_jvp(u)))

    return (horizontal_matvec, horizontal_inner, rank, d - rank,
            lambda u: h.inverse_jvp(p, u))


class _MetricProduct:
    """u ↦ G u, and ``matmat`` (the products vmapped over the columns of a block)."""

    def __init__(self, metric: Any, p: Tensor) -> None:
        self.metric, self.p = metric, p

    def __call__(self, v: Tensor) -> Tensor:
        return self.metric.matvec(self.p, v)

    def matmat(self, V: Tensor) -> Tensor:
        return _columns(self, V)


class _RangeRestricted:
    """u ↦ E_r u = Λ⁻¹ Qᵀ Hess Q u on range(G) = span(Q), with the null threshold's
    round-off floor of this restricted problem."""

    def __init__(self, hvp: Matvec, Q: Tensor, lam: Tensor, null_floor: float) -> None:
        self.hvp, self.Q, self.lam, self.null_floor = hvp, Q, lam, null_floor

    def __call__(self, u: Tensor) -> Tensor:
        return (self.Q.T @ self.hvp(self.Q @ u)) / self.lam


def _range_restricted_matvecs(
    space: ParameterSpace, p: Tensor, hvp: Matvec, rank: int, null_rtol: float | None
) -> tuple[Matvec, Matvec, int, int, Matvec]:
    """E on the range of a singular metric that is not a chart's pullback (docs/math.md §4.2).

    G = Q Λ Qᵀ (with Λ > 0 and ker G = span(K)) is found densely, so only up to
    ``space.max_dense_dim``. E is defined on the quotient by ker G when Hess vanishes there
    (checked, one product per kernel vector), and in the coordinates u of range(G) it is
    E_r u = Λ⁻¹ Qᵀ Hess Q u, self-adjoint in the inner product Λ: the dense method's
    restricted problem, matrix-free in Hess.
    """
    d = p.shape[0]
    try:
        G = space.metric.dense(p, max_dim=space.max_dense_dim)
    except Exception as err:
        raise SingularMetricError(
            f"flatness: the metric has rank {rank} < {d} and its kernel is not the gauge space "
            "of this space's chart; finding it needs the dense metric, which failed "
            f"({err}). Damp the metric in a way that keeps invariance (--damping, or "
            "metrics.Damped(G, lam, reference=...)) (docs/math.md §4.2)."
        ) from err
    rng = restrict_to_range(space, p, G, rank,
                            lambda K: torch.stack([hvp(k) for k in K.T], 1), null_rtol)
    Q, lam = rng.basis, rng.eigenvalues
    matvec = _RangeRestricted(hvp, Q, lam, rng.null_floor)

    def inner(u: Tensor) -> Tensor:
        return lam * u

    return matvec, inner, rank, d - rank, lambda u: Q @ u


def _euclidean_matmat(space: ParameterSpace, p: Tensor, matvec: Matvec
                      ) -> Matvec | None:
    """Batched Hessian products for the Euclidean metric on CUDA or a data-parallel space, or
    None.

    On a GPU the probes go through one batched second backward per chunk
    (:func:`~covariant.autodiff.hvp_matmat_operator`, chunks sized to the free device
    memory), which amortizes the kernel launches of a per-probe loop. On CPU a loop of
    products that share one gradient graph is faster, and a batch's memory grows with the
    probe count (benchmarks/), so None. On a data-parallel space (``covariant.distributed``,
    any device) the block is the shard's products and **one** all-reduce of the (k, d) block
    (``RankSumLoss.hvp_matmat``): the ranks meet once per block instead of once per probe.
    ``matvec`` (the per-probe operator) is checked
    against the batched one on one probe; any failure (an operation without a batching rule)
    also gives None.
    """
    if not isinstance(space.metric, Euclidean) or not _plain(p):
        return None
    shard_block = getattr(space.loss_function, "hvp_matmat", None)
    if shard_block is not None:
        rows = shard_block(p)  # a data-parallel loss: one all-reduce per block of probes
        return lambda V: rows(V.T).T
    if p.device.type == "cpu":
        return None
    try:
        matmat = autodiff.hvp_matmat_operator(space.loss_function, p)
        z = torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)
        one, ref = matmat(z)[:, 0], matvec(z[:, 0])
        if not bool((one - ref).norm() <= 1e-4 * ref.norm() + 1e-12):
            return None
    except Exception:  # pragma: no cover - ops without batching rules (GPU only)
        return None
    return matmat


def _quadratic_form(space: ParameterSpace, p: Tensor, mode: str) -> tuple[Matvec | None, str]:
    """Taylor-mode quadratic forms of the Euclidean Hessian, or None (and why) to use HVPs."""
    if mode == "hvp":
        return None, "hvp"
    if not _plain(p):
        if mode == "taylor":
            raise TaylorUnsupportedError("flatness: Taylor mode needs a plain tensor point "
                                         "(not inside torch.func transforms)")
        return None, "hvp (point inside a torch.func transform)"
    try:
        return QuadraticForm(space.loss_function, p), "taylor"
    except TaylorUnsupportedError as err:
        if mode == "taylor":
            raise
        return None, f"hvp ({err})"
    except Exception as err:  # tracing failed (data-dependent code, custom ops): HVPs work
        if mode == "taylor":
            raise TaylorUnsupportedError(f"flatness: the loss could not be traced: {err}") \
                from err
        return None, f"hvp (the loss could not be traced: {type(err).__name__})"


def _lift(vectors: Tensor, lift: Matvec | None) -> Tensor:
    """Apply ``lift`` to each column of ``vectors`` (None: leave them)."""
    if lift is None:
        return vectors
    return torch.stack([lift(v) for v in vectors.T], 1)


def _in_parent_chart(space: ParameterSpace, p: Tensor, measures: Sequence[str], k: int,
                     options: StochasticOptions, null_rtol: float | None
                     ) -> dict[str, Measure]:
    """The measures of a pulled-back space, computed in its parent's chart at θ = h(ψ)."""
    h, parent = space.chart, space.parent
    assert h is not None and parent is not None
    theta = h.forward(p).detach()
    out = stochastic_flatness(parent, theta, measures, k=k, options=options,
                              null_rtol=null_rtol)
    d = int(p.shape[0])
    for m in out.values():
        rank = int(m.info.get("rank", theta.shape[0]))  # rank of E, found by the parent
        m.info.update(dim=d, rank=rank, num_gauge_directions=d - rank)
        m.info.setdefault("computed_in", "parent chart (pulled-back metric, same spectrum)")
        if "pseudo" in m.info:
            m.info["pseudo"] = d > rank or m.info.get("num_null", 0) >= 0.5
        if m.vectors is not None:  # horizontal lift of the parent's eigenvectors
            m.vectors = _lift(m.vectors, lambda u: h.inverse_jvp(p, u))
    return out


def _trace_estimate(space: ParameterSpace, p: Tensor, ops: Callable[[], tuple[Any, ...]],
                    dim: int, opts: StochasticOptions) -> Any:
    """tr E by ``opts.trace_method`` from products with E (a ``linalg`` trace estimate)."""
    e_mv, inner = ops()[:2]
    matmat = _euclidean_matmat(space, p, e_mv) if inner is None else None
    common: dict[str, Any] = {"seed": opts.seed, "dtype": p.dtype, "device": p.device,
                              "matmat": matmat, "progress": opts.progress}
    if opts.trace_method == "hutchinson":
        return linalg.hutchinson(e_mv, dim, num_probes=opts.num_probes,
                                 batch_size=opts.batch_size, **common)
    if opts.trace_method == "hutchpp":
        return linalg.hutchpp(e_mv, dim, num_matvecs=opts.trace_num_matvecs(), **common)
    if inner is not None:
        raise ValueError("flatness: trace_method='xtrace' needs a symmetric "
                         "operator (Euclidean metric); use 'hutchpp' for G⁻¹Hess")
    return linalg.xtrace(e_mv, dim, num_matvecs=opts.trace_num_matvecs(), **common)


def _trace_measure(space: ParameterSpace, p: Tensor, ops: Callable[[], tuple[Any, ...]],
                   dim: int, opts: StochasticOptions, info: dict[str, Any]) -> Measure:
    """"trace": tr E with its standard error.

    Hutchinson's trace of a Euclidean Hessian takes zᵀ∇²L z by Taylor mode when
    ``opts.quadratic_forms`` allows it (no operator products at all), except on CUDA with
    ``quadratic_forms="auto"``, where batched HVPs (:func:`_euclidean_matmat`) are faster;
    with a full-rank metric whose solve keeps a Cholesky factor G = LLᵀ, Hutchinson takes
    uᵀHess u with u = L⁻ᵀz (:func:`~covariant.flatness.trace.factored_trace`); every other
    case applies E.
    """
    qform, products, est = None, "hvp", None
    euclidean_hutchinson = isinstance(space.metric, Euclidean) \
        and opts.trace_method == "hutchinson"
    if euclidean_hutchinson and p.device.type == "cuda" and opts.quadratic_forms == "auto":
        products = "hvp (batched backward on the GPU)"  # faster there than per-probe Taylor
    elif euclidean_hutchinson:
        qform, products = _quadratic_form(space, p, opts.quadratic_forms)
    elif opts.trace_method == "hutchinson" and dim == p.shape[0]:
        est = factored_trace(space, p, num_probes=opts.num_probes, seed=opts.seed,
                             quadratic_forms=opts.quadratic_forms, progress=opts.progress)
    if est is not None:  # uᵀHess u with u = L⁻ᵀz by quadratic forms (flatness/trace.py)
        products = "cholesky + quadratic forms" if space.metric.cholesky_factor(p) \
            is not None else "sample-space (Woodbury) factor + quadratic forms"
    elif qform is not None:  # zᵀ∇²L z by Taylor mode; the matvec is never called
        est = linalg.hutchinson(lambda v: v, dim, num_probes=opts.num_probes, seed=opts.seed,
                                dtype=p.dtype, device=p.device, progress=opts.progress,
                                quadratic_form=qform)
    else:
        est = _trace_estimate(space, p, ops, dim, opts)
    return Measure("trace", float(est.value), float(est.stderr), int(est.num_matvecs), True,
                   "stochastic", {**info, "estimator": opts.trace_method, "products": products})


def _eig_measures(p: Tensor, measures: Sequence[str], k: int,
                  ops: Callable[[], tuple[Any, ...]], opts: StochasticOptions,
                  info: dict[str, Any]) -> dict[str, Measure]:
    """"max_eig", "top_eigs" (the ``k`` largest, at most the rank) and "min_eig" by one
    Lanczos run.

    Each carries the largest relative residual of its eigenpairs in ``residual`` and every
    pair's residual in ``info["residuals"]``.
    """
    if not any(m in measures for m in ("max_eig", "min_eig", "top_eigs")):
        return {}
    which = "largest"
    if "min_eig" in measures:
        which = "both" if ("max_eig" in measures or "top_eigs" in measures) else "smallest"
    e_mv, inner, dim, _, lift = ops()
    kk = min(k, dim) if "top_eigs" in measures else 1
    if kk < k and "top_eigs" in measures:  # capped at the rank, as the dense method does
        info = {**info, "k_requested": k, "k": kk}
    counter = _Counter(e_mv)
    res = linalg.lanczos(counter, dim, kk, which=which, inner_matvec=inner,
                         num_steps=opts.lanczos_steps, max_restarts=opts.max_restarts,
                         tol=opts.lanczos_tol, seed=opts.seed, dtype=p.dtype, device=p.device,
                         progress=opts.progress)
    evals, resid = res.eigenvalues, res.residual
    conv = bool(torch.as_tensor(res.converged).all())
    if opts.require_convergence and not conv:
        raise NotConvergedError(
            f"flatness: Lanczos did not converge for {which} eigenvalues after "
            f"{counter.count} products (largest residual {float(resid.max()):.2e}). "
            "Raise lanczos_steps or max_restarts, or loosen lanczos_tol."
        )
    info = {**info, "residuals": resid.tolist()}

    def measure(name: str, value: Any, residual: float, vectors: Tensor | None = None
                ) -> Measure:
        return Measure(name, value, None, counter.count, conv, "stochastic", info,
                       residual=residual, vectors=vectors)

    out: dict[str, Measure] = {}
    if "max_eig" in measures:
        out["max_eig"] = measure("max_eig", float(evals[0]), float(resid[0]))
    if "top_eigs" in measures:
        out["top_eigs"] = measure("top_eigs", evals[:kk].tolist(), float(resid[:kk].max()),
                                  _lift(res.eigenvectors[:, :kk], lift))
    if "min_eig" in measures:
        out["min_eig"] = measure("min_eig", float(evals[-1]), float(resid[-1]))
    return out


def _density_measure(res: Any, num_matvecs: int, opts: StochasticOptions,
                     info: dict[str, Any], dtype: torch.dtype) -> Measure:
    """"spectral_density": the Gaussian-broadened spectrum from SLQ's nodes and weights."""
    nodes, weights = res.nodes, res.weights
    grid = opts.density_grid
    if grid is None:
        lo, hi = float(nodes.min()), float(nodes.max())
        pad = 0.05 * (hi - lo + 1e-12)
        grid = torch.linspace(lo - pad, hi + pad, 400, dtype=dtype)
    sigma = opts.density_sigma or 0.01 * float(grid[-1] - grid[0])
    dens = linalg.spectral_density(nodes, weights, grid, sigma)
    return Measure("spectral_density", dens.tolist(), None, num_matvecs, True, "stochastic",
                   {**info, "grid": grid.tolist(), "sigma": sigma, "nodes": nodes.tolist(),
                    "weights": weights.tolist()})


def _slq_measures(p: Tensor, measures: Sequence[str], ops: Callable[[], tuple[Any, ...]],
                  opts: StochasticOptions, info: dict[str, Any],
                  null_rtol: float | None) -> dict[str, Measure]:
    """"logdet" (log|det E| over the eigenvalues that are not numerically null, with its
    standard error) and "spectral_density", by one SLQ run of ``opts.slq_num_probes()``
    probes.

    The log-determinant follows :mod:`~covariant.flatness.nulls`: null nodes add nothing,
    their estimated count is ``info["num_null"]``, and ``converged`` is False when quadrature
    weight sits on nodes that Lanczos has not resolved against the null threshold.
    """
    if "logdet" not in measures and "spectral_density" not in measures:
        return {}
    e_mv, inner, dim, num_gauge, _ = ops()
    floor = e_mv.null_floor if isinstance(e_mv, _RangeRestricted) else 0.0
    counter = _Counter(e_mv)
    nprobe = opts.slq_num_probes()
    matmat = counter.block()  # all probes' Lanczos runs in lockstep, one block product a step
    inner_matmat = getattr(inner, "matmat", None) if matmat is not None else None
    res = linalg.slq(counter, dim, num_probes=nprobe, num_steps=min(opts.slq_steps, dim),
                     fn=lambda x: x, seed=opts.seed,
                     inner_matvec=inner, dtype=p.dtype, device=p.device, matmat=matmat,
                     inner_matmat=inner_matmat, batch_size=opts.batch_size or SLQ_BLOCK,
                     progress=opts.progress)
    out: dict[str, Measure] = {}
    if "logdet" in measures:
        pld = slq_pseudo_log_determinant(res.nodes, res.weights, res.residuals, dim, null_rtol,
                                         floor)
        out["logdet"] = Measure(
            "logdet", pld.value, pld.stderr, counter.count, pld.resolved, "stochastic",
            {**info, "probes": nprobe, "steps": opts.slq_steps,
             "pseudo": num_gauge > 0 or pld.num_null >= 0.5,
             "num_null": pld.num_null, "null_threshold": pld.threshold,
             "unresolved_weight": pld.unresolved_weight,
             "of": "log|pdet E|" if pld.num_null >= 0.5 else "log|det E|"})
    if "spectral_density" in measures:
        out["spectral_density"] = _density_measure(res, counter.count, opts, info, p.dtype)
    return out


def stochastic_flatness(
    space: ParameterSpace,
    p: Tensor,
    measures: Sequence[str],
    *,
    k: int = 5,
    options: StochasticOptions | None = None,
    null_rtol: float | None = None,
    **kwargs: Any,
) -> dict[str, Measure]:
    """Stochastic estimates of the spectral measures of E = G⁻¹ Hess (see module docstring).

    Parameters
    ----------
    space, p
        The space and the point.
    measures : sequence of str
        Any of :data:`STOCHASTIC_MEASURES`.
    k : int
        Number of eigenvalues for "top_eigs".
    null_rtol : float, optional
        Eigenvalues below ``null_rtol · max|λ|`` are numerically null and dropped from
        "logdet" (:mod:`~covariant.flatness.nulls`).
    options : StochasticOptions, optional
        Every setting (probe counts, trace estimator, Lanczos and SLQ); default
        ``StochasticOptions()``.
    **kwargs
        Fields of :class:`StochasticOptions` set on top of ``options`` (``num_probes=...,
        seed=...``); any other name raises ``TypeError``.

    For a space made by ``reparametrize`` whose metric is the pulled-back one, the tensor
    rules make E = G⁻¹Hess at ψ similar to the parent's E at θ = h(ψ) (on the horizontal
    space for a submersion: E_h = J G⁺Hess J⁺ = E_Θ), so every measure here is the
    parent's. Unless ``in_chart=True`` they are computed there, without chart products, and
    eigenvectors are lifted back with J⁺; a stochastic estimate is then the same number in
    every chart, not only the same quantity. (In chart, a submersion's horizontal problem
    uses the same probes as the parent and agrees to rounding; a bijection's probes live in
    ψ, so its estimates agree within their error bars.)
    """
    opts = resolve_options(options, kwargs)
    unknown = [m for m in measures if m not in STOCHASTIC_MEASURES]
    if unknown:
        raise ValueError(
            f"flatness: unknown stochastic measure(s) {unknown}; choose from "
            f"{STOCHASTIC_MEASURES} (the full 'spectrum' needs method='dense')"
        )
    if not opts.in_chart and space.is_pullback and space.chart is not None \
            and space.parent is not None and _plain(p):
        return _in_parent_chart(space, p, measures, k, opts, null_rtol)
    ops = functools.cache(lambda: shape_operator_matvecs(space, p, null_rtol))  # on first use
    with progress_scope(opts.progress):  # nested work (a dense metric's build) shows bars too
        if isinstance(space.metric, Euclidean):  # a Euclidean trace may need no operator
            dim, num_gauge = int(p.shape[0]), 0
        else:
            _, _, dim, num_gauge, _ = ops()
        info = {"dim": int(p.shape[0]), "rank": dim, "num_gauge_directions": num_gauge}
        out: dict[str, Measure] = {}
        if "trace" in measures:
            out["trace"] = _trace_measure(space, p, ops, dim, opts, info)
        out.update(_eig_measures(p, measures, k, ops, opts, info))
        out.update(_slq_measures(p, measures, ops, opts, info, null_rtol))
    return out
