r"""Matrix-free, stochastic flatness measures at network scale (MATH.md §4–5).

All measures are spectral quantities of the shape operator E = G⁻¹ Hess, applied matrix-free:
one Hessian-vector product (with the connection term, or the pullback fast path) and one
metric solve per product. E is self-adjoint in the G-inner product, so Lanczos and stochastic
Lanczos quadrature run in that inner product (``covariant.linalg``) and need no G^{-1/2}.

**Submersion charts** (weight norm). G_Ψ is singular along the gauge directions ker J, and
G⁺ is the pseudo-inverse on the horizontal space. The problem is then posed on the horizontal
space, in the coordinates u = J v of the chart's image: E_h u = J G⁺Hess J⁺ u, self-adjoint
in the inner product J⁺ᵀ G J⁺. Every product still uses the chart's own Hessian and metric;
the spectrum is exactly the nonzero spectrum of G⁺Hess (no gauge zeros), so the trace is
tr E and the log-determinant the pseudo-log-determinant (MATH.md §5).

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: p.sum() ** 2 + (p**2).sum())   # Hess = 2·11ᵀ + 2I
>>> p = torch.zeros(8, dtype=torch.float64)
>>> r = cv.flatness(space, p, measures=("trace", "max_eig"), method="stochastic",
...                 num_probes=200, seed=0)
>>> abs(r["trace"].value - 32.0) < 3 * r["trace"].stderr
True
>>> round(r["max_eig"].value, 8)
18.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from . import linalg
from ._fast import QuadraticForm, TaylorUnsupportedError
from ._fast import is_plain as _plain
from .errors import NotConvergedError, SingularMetricError
from .flatness import Measure
from .metrics import Euclidean, Pullback
from .space import ParameterSpace

__all__ = ["STOCHASTIC_MEASURES", "shape_operator_matvecs", "stochastic_flatness"]

STOCHASTIC_MEASURES = ("trace", "logdet", "max_eig", "min_eig", "top_eigs",
                       "spectral_density")


class _Counter:
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn, self.count = fn, 0

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        return self.fn(v)


def shape_operator_matvecs(
    space: ParameterSpace, p: Tensor
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None, int, int,
           Callable[[Tensor], Tensor] | None]:
    """Matrix-free products for the spectral problem of E = G⁻¹ Hess at p.

    Returns
    -------
    matvec : u ↦ E u on a space of dimension ``dim``
    inner : u ↦ B u, the inner product in which ``matvec`` is self-adjoint (None: Euclidean)
    dim : the dimension of that space (the rank of G)
    num_gauge : number of gauge directions removed (dim ker J)
    lift : maps a vector of that space back to the chart's coordinates (None: identity)

    For a submersion chart the problem is posed on the horizontal space in the coordinates
    of the chart's image, u = J v_h (dimension d = rank J): E_h u = J G⁺Hess J⁺ u with inner
    product J⁺ᵀ G J⁺. Its spectrum is exactly the nonzero spectrum of G⁺Hess, computed from
    the chart's own Hessian and metric products, with no gauge eigenvalues at all.
    """
    metric = space.metric
    hvp = space.hvp_operator(p)  # the gradient graph and G⁻¹∇L are shared by all products
    if isinstance(metric, Euclidean):
        return hvp, None, p.shape[0], 0, None

    def e_matvec(v: Tensor) -> Tensor:
        return metric.solve(p, hvp(v))

    d = p.shape[0]
    rank = metric.rank(p)
    if rank == d:
        return e_matvec, lambda v: metric.matvec(p, v), d, 0, None
    h = space.chart
    if h is None or h.is_bijection or h.forward(p).shape[0] != rank:
        raise SingularMetricError(
            f"flatness: the metric has rank {rank} < {d} and its kernel is not the gauge space "
            "of this space's chart. Damp it in a way that keeps invariance "
            "(metrics.Damped(G, lam, reference=...)) or use the pulled-back metric of a "
            "submersion chart (MATH.md §5)."
        )

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


def _euclidean_matmat(space: ParameterSpace, p: Tensor) -> Callable[[Tensor], Tensor] | None:
    """Batched Hessian products (vmap over probes) for the Euclidean metric on CUDA.

    On CPU a loop of products that share one gradient graph is faster, and the batched
    version's memory grows with the probe count (benchmarks/), so it is used on GPUs only.
    """
    if not isinstance(space.metric, Euclidean) or p.device.type == "cpu":
        return None

    def matmat(V: Tensor) -> Tensor:
        return vmap(lambda v: space._euclidean_hvp(p, v), in_dims=1, out_dims=1)(V)

    try:
        matmat(torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device))
    except Exception:  # pragma: no cover - ops without batching rules
        return None
    return matmat


def _quadratic_form(space: ParameterSpace, p: Tensor, mode: str
                    ) -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """Taylor-mode quadratic forms of the Euclidean Hessian, or None (and why) to use HVPs."""
    if mode == "hvp":
        return None, "hvp"
    if not _plain(p):
        if mode == "taylor":
            raise TaylorUnsupportedError("flatness: Taylor mode needs a plain tensor point "
                                         "(not inside torch.func transforms)")
        return None, "hvp (point inside a torch.func transform)"
    try:
        return QuadraticForm(space._loss, p), "taylor"
    except TaylorUnsupportedError as err:
        if mode == "taylor":
            raise
        return None, f"hvp ({err})"
    except Exception as err:  # tracing failed (data-dependent code, custom ops): HVPs work
        if mode == "taylor":
            raise TaylorUnsupportedError(f"flatness: the loss could not be traced: {err}") \
                from err
        return None, f"hvp (the loss could not be traced: {type(err).__name__})"


def _in_parent_chart(space: ParameterSpace, p: Tensor, measures: Sequence[str],
                     **options: Any) -> dict[str, Measure]:
    """The measures of a pulled-back space, computed in its parent's chart at θ = h(ψ)."""
    h, parent = space.chart, space.parent
    assert h is not None and parent is not None
    theta = h.forward(p).detach()
    out = stochastic_flatness(parent, theta, measures, **options)
    d = int(p.shape[0])
    for m in out.values():
        rank = int(m.extras.get("rank", theta.shape[0]))  # rank of E, found by the parent
        m.extras.update(dim=d, rank=rank, num_gauge_directions=d - rank)
        m.extras.setdefault("computed_in", "parent chart (pulled-back metric, same spectrum)")
        if "pseudo" in m.extras:
            m.extras["pseudo"] = d > rank
        if m.vectors is not None:  # horizontal lift of the parent's eigenvectors
            m.vectors = _lift(m.vectors, lambda u: h.inverse_jvp(p, u))
    return out


def _lift(vectors: Tensor, lift: Callable[[Tensor], Tensor] | None) -> Tensor:
    if lift is None:
        return vectors
    return torch.stack([lift(v) for v in vectors.T], 1)


def stochastic_flatness(
    space: ParameterSpace,
    p: Tensor,
    measures: Sequence[str],
    *,
    k: int = 5,
    num_probes: int = 100,
    seed: int = 0,
    progress: bool = False,
    trace_method: str = "hutchinson",
    lanczos_steps: int | None = None,
    lanczos_tol: float | None = None,
    slq_probes: int | None = None,
    slq_steps: int = 40,
    density_grid: Tensor | None = None,
    density_sigma: float | None = None,
    batch_size: int | None = None,
    max_restarts: int = 30,
    require_convergence: bool = False,
    quadratic_forms: str = "auto",
    in_chart: bool = False,
) -> dict[str, Measure]:
    """Stochastic estimates of the spectral measures of E = G⁻¹ Hess (see module docstring).

    Parameters
    ----------
    trace_method : {"hutchinson", "hutchpp", "xtrace"}
        Hutchinson (unbiased, any square E); Hutch++ (Meyer et al. 2021, any square E);
        XTrace (Epperly et al. 2024; symmetric operators only, so used for the Euclidean
        metric only). ``num_probes`` is the matvec budget.
    lanczos_steps, lanczos_tol
        Basis size and tolerance of Lanczos for max_eig / min_eig / top_eigs.
    slq_probes, slq_steps
        Stochastic Lanczos quadrature for logdet and spectral_density (default
        ``max(4, num_probes // 10)`` probes).
    density_grid, density_sigma
        Grid and Gaussian width of the spectral density (default: 400 points spanning the
        Ritz values, σ = 1% of the span).
    max_restarts : int
        Thick restarts allowed to Lanczos.
    require_convergence : bool
        Raise :class:`~covariant.errors.NotConvergedError` instead of returning
        ``converged=False`` when Lanczos stops before its tolerance.
    quadratic_forms : {"auto", "taylor", "hvp"}
        How Hutchinson's trace of a Euclidean Hessian gets its zᵀ∇²L z: "taylor" by
        second-order Taylor mode (``covariant._fast.QuadraticForm``, four matrix
        products per linear layer instead of six, no gradient graph; raises if the loss uses
        an operation without a rule), "hvp" by Hessian-vector products, "auto" Taylor mode
        when the loss traces and falls back to products otherwise. ``extras["products"]``
        says which was used.
    in_chart : bool
        For a space made by ``reparametrize`` whose metric is the pulled-back one, the tensor
        rules make E = G⁻¹Hess at ψ similar to the parent's E at θ = h(ψ) (on the horizontal
        space for a submersion: E_h = J G⁺Hess J⁺ = E_Θ), so every measure here is the
        parent's. By default they are computed there, without chart products, and
        eigenvectors are lifted back with J⁺; a stochastic estimate is then the same number
        in every chart, not only the same quantity. (In chart, a submersion's horizontal
        problem uses the same probes as the parent and agrees to rounding; a bijection's
        probes live in ψ, so its estimates agree within their error bars.)
        ``in_chart=True`` computes every product in this chart instead (Hess_Ψ and G_Ψ
        through the chart's Jacobian products): the generic path, e.g. to check the rules.
        ``extras["computed_in"]`` says which was used.
    """
    unknown = [m for m in measures if m not in STOCHASTIC_MEASURES]
    if unknown:
        raise ValueError(
            f"flatness: unknown stochastic measure(s) {unknown}; choose from "
            f"{STOCHASTIC_MEASURES} (the full 'spectrum' needs method='dense')"
        )
    if quadratic_forms not in ("auto", "taylor", "hvp"):
        raise ValueError(f"flatness: quadratic_forms must be 'auto', 'taylor' or 'hvp', got "
                         f"{quadratic_forms!r}")
    if not in_chart and space._scalar_pullback and space.chart is not None \
            and space.parent is not None and _plain(p):
        return _in_parent_chart(
            space, p, measures, k=k, num_probes=num_probes, seed=seed, progress=progress,
            trace_method=trace_method, lanczos_steps=lanczos_steps, lanczos_tol=lanczos_tol,
            slq_probes=slq_probes, slq_steps=slq_steps, density_grid=density_grid,
            density_sigma=density_sigma, batch_size=batch_size, max_restarts=max_restarts,
            require_convergence=require_convergence, quadratic_forms=quadratic_forms)
    dtype, device = p.dtype, p.device
    euclidean = isinstance(space.metric, Euclidean)
    operators: list[Any] = []  # built on first use: a Euclidean trace may need none

    def ops() -> tuple[Any, ...]:
        if not operators:
            operators.extend(shape_operator_matvecs(space, p))
        return tuple(operators)

    if euclidean:
        d, num_gauge = int(p.shape[0]), 0
    else:
        _, _, d, num_gauge, _ = ops()
    out: dict[str, Measure] = {}
    base_extras = {"dim": int(p.shape[0]), "rank": d, "num_gauge_directions": num_gauge}

    if "trace" in measures:
        qform, products = None, "hvp"
        if euclidean and trace_method == "hutchinson":
            qform, products = _quadratic_form(space, p, quadratic_forms)
        if qform is not None:  # zᵀ∇²L z by Taylor mode; the matvec is never called
            est = linalg.hutchinson(lambda v: v, d, num_probes=num_probes, seed=seed, dtype=dtype,
                                    device=device, progress=progress, quadratic_form=qform)
        else:
            e_mv, inner = ops()[:2]
            counter = _Counter(e_mv)
            matmat = _euclidean_matmat(space, p) if inner is None else None
            if trace_method == "hutchinson":
                est = linalg.hutchinson(counter, d, num_probes=num_probes, seed=seed, dtype=dtype,
                                        device=device, matmat=matmat, batch_size=batch_size,
                                        progress=progress)
            elif trace_method == "hutchpp":
                est = linalg.hutchpp(counter, d, num_matvecs=num_probes, seed=seed, dtype=dtype,
                                     device=device, matmat=matmat, progress=progress)
            elif trace_method == "xtrace":
                if inner is not None:
                    raise ValueError("flatness: trace_method='xtrace' needs a symmetric "
                                     "operator (Euclidean metric); use 'hutchpp' for G⁻¹Hess")
                est = linalg.xtrace(counter, d, num_matvecs=num_probes, seed=seed, dtype=dtype,
                                    device=device, matmat=matmat, progress=progress)
            else:
                raise ValueError(f"flatness: trace_method must be hutchinson, hutchpp or "
                                 f"xtrace, got {trace_method!r}")
        out["trace"] = Measure("trace", float(est.value), float(est.stderr),
                               int(est.num_matvecs), True, "stochastic",
                               {**base_extras, "estimator": trace_method,
                                "products": products})

    wants_eigs = [m for m in ("max_eig", "min_eig", "top_eigs") if m in measures]
    if wants_eigs:
        which = "largest"
        if "min_eig" in measures:
            which = "both" if ("max_eig" in measures or "top_eigs" in measures) else "smallest"
        kk = k if "top_eigs" in measures else 1
        e_mv, inner, _, _, lift = ops()
        counter = _Counter(e_mv)
        res = linalg.lanczos(counter, d, kk, which=which, inner_matvec=inner,
                             num_steps=lanczos_steps, max_restarts=max_restarts,
                             tol=lanczos_tol, seed=seed, dtype=dtype, device=device,
                             progress=progress)
        evals = res.eigenvalues
        resid = res.residuals
        extras = {**base_extras, "residuals": resid.tolist()}
        conv = bool(torch.as_tensor(res.converged).all())
        if require_convergence and not conv:
            raise NotConvergedError(
                f"flatness: Lanczos did not converge for {which} eigenvalues after "
                f"{counter.count} products (largest residual {float(resid.max()):.2e}). "
                "Raise lanczos_steps or max_restarts, or loosen lanczos_tol."
            )
        if "max_eig" in measures:
            out["max_eig"] = Measure("max_eig", float(evals[0]), float(resid[0]),
                                     counter.count, conv, "stochastic", extras)
        if "top_eigs" in measures:
            out["top_eigs"] = Measure("top_eigs", evals[:kk].tolist(), float(resid[:kk].max()),
                                      counter.count, conv, "stochastic", extras,
                                      vectors=_lift(res.eigenvectors[:, :kk], lift))
        if "min_eig" in measures:
            out["min_eig"] = Measure("min_eig", float(evals[-1]), float(resid[-1]),
                                     counter.count, conv, "stochastic", extras)

    if "logdet" in measures or "spectral_density" in measures:
        e_mv, inner = ops()[:2]
        counter = _Counter(e_mv)
        nprobe = slq_probes or max(4, num_probes // 10)
        res = linalg.slq(counter, d, num_probes=nprobe, num_steps=min(slq_steps, d),
                         fn=lambda x: torch.log(torch.abs(x)), seed=seed,
                         inner_matvec=inner, dtype=dtype, device=device,
                         batch_size=batch_size, progress=progress)
        if "logdet" in measures:
            out["logdet"] = Measure(
                "logdet", float(res.value), float(res.stderr), counter.count, True,
                "stochastic", {**base_extras, "probes": nprobe, "steps": slq_steps,
                               "pseudo": num_gauge > 0, "of": "log|det E|"})
        if "spectral_density" in measures:
            nodes, weights = res.nodes, res.weights
            if density_grid is None:
                lo, hi = float(nodes.min()), float(nodes.max())
                pad = 0.05 * (hi - lo + 1e-12)
                density_grid = torch.linspace(lo - pad, hi + pad, 400, dtype=dtype)
            sigma = density_sigma or 0.01 * float(density_grid[-1] - density_grid[0])
            dens = linalg.spectral_density(nodes, weights, density_grid, sigma)
            out["spectral_density"] = Measure(
                "spectral_density", dens.tolist(), None, counter.count, True, "stochastic",
                {**base_extras, "grid": density_grid.tolist(), "sigma": sigma,
                 "nodes": nodes.tolist(), "weights": weights.tolist()})
    return out


