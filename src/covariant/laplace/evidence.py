r"""The Laplace evidence of a density space, classic or invariant, and its result object.

On a density space (the log joint log p(D, θ); ``ParameterSpace.from_log_prob`` or
:func:`~covariant.laplace.posterior_space`), expanded around a mode p*:

- **classic** (``riemannian=False``): log Z ≈ log p(D, p*) + d/2 log 2π − ½ log det ∇²(−log p),
  which depends on the chart;
- **invariant** (``riemannian=True``), around the mode of the scalar q = p/√det G:
  log Z ≈ log q(D, p*) + d/2 log 2π − ½ log det(G⁻¹ Hess(−log q)), the same in every chart.

The precision is built by :mod:`covariant.laplace.precision` (structures "full", "diag",
"lowrank") and :mod:`covariant.laplace.kron` ("kron", K-FAC); the covariance operators live
in :mod:`covariant.laplace.covariance` and the predictives in
:mod:`covariant.laplace.predictive`.

Example
-------
>>> import math, torch, covariant as cv
>>> log_joint = lambda t: 2.0 - 2 * ((t - 1) ** 2).sum() - 0.5 * math.log(2 * math.pi / 4)
>>> space = cv.ParameterSpace.from_log_prob(log_joint)
>>> res = laplace(space, torch.tensor([1.0], dtype=torch.float64), riemannian=False)
>>> round(res.log_evidence, 10)                       # exact for a Gaussian: log Z = 2
2.0
>>> import json
>>> json.loads(json.dumps(res.to_dict()))["covariance"]["trace"]     # Σ = 1/4
0.25
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from .._io import to_jsonable
from ..errors import (
    DenseTooLargeError,
    NotABijectionError,
    NotAModeError,
    UnsupportedStructureError,
)
from ..metrics import MAX_DENSE_DIM
from ..space import ParameterSpace
from .kron import KronFactors, check_kron_space, kron_precision
from .posterior import LOG_2PI, with_prior_precision
from .precision import (
    Curvature,
    Precision,
    diagonal_precision,
    full_precision,
    lowrank_precision,
    objective,
)
from .predictive import Prediction, glm_predictive, mc_predictive

__all__ = [
    "FULL_MAX_DIM",
    "HESSIANS",
    "STRUCTURES",
    "LaplaceResult",
    "NotAModeError",
    "UnsupportedStructureError",
    "laplace",
]


def _jsonable(x: Any) -> Any:
    return to_jsonable(x, nonfinite="null")

#: Largest dimension for ``structure="full"`` unless ``max_dim`` raises it: a dense d×d
#: precision (8·d² bytes in float64, 128 MiB at d = 4096), d Hessian-vector products to build
#: it and an O(d³) Cholesky factorization.
FULL_MAX_DIM = MAX_DENSE_DIM

#: Numbers (draws × d) that :meth:`LaplaceResult.sample` draws and transforms at a time.
SAMPLE_CHUNK = 2**25

STRUCTURES = ("full", "diag", "lowrank", "kron")
HESSIANS = ("exact", "ggn")


@dataclass
class LaplaceResult:
    r"""A Laplace approximation N(p*, Σ) in the chart of ``space``, and its evidence.

    Attributes
    ----------
    log_evidence : float
        Classic or invariant Laplace estimate of log Z (module docstring).
    point : Tensor
        The expansion point p*.
    precision : Tensor or None
        The dense precision (structure "full"), else ``None``.
    covariance : Tensor or operator
        Σ: a dense tensor (full), :class:`DiagonalCovariance`, :class:`LowRankCovariance` or
        :class:`KroneckerCovariance` (kron) (each with ``.dense()``). A (2,0) tensor:
        Σ_Ψ = J⁻¹ Σ_Θ J⁻ᵀ (exactly so for the invariant full and kron approximations).
    log_joint : float
        log p(D, p*) (classic) or log q(D, p*) = log p − ½ log det G (invariant).
    logdet_precision : float
        log det Hess (classic) or log det(G⁻¹ Hess) (invariant), as used in the evidence.
    riemannian, hessian, structure : bool, str, str
    dim : int
    space : ParameterSpace
    covariance_operator : operator
        Σ as an operator for every structure (``matmat``, ``sqrt_matmat``, ``dense``,
        ``summary``): :class:`DenseCovariance` for "full".
    info : dict
        Diagnostics: the objective's gradient norm at p* (``grad_norm``, 0 at an exact
        mode), ``logdet_metric`` (invariant), ``lanczos_converged`` and ``lowrank_floor``
        (lowrank), ``kfac_blocks`` and ``kfac_uncovered`` (kron: the number of Kronecker
        blocks and of coordinates with K's exact diagonal instead).
    """

    log_evidence: float
    point: Tensor
    precision: Tensor | None
    covariance: Tensor | Any
    log_joint: float
    logdet_precision: float
    riemannian: bool
    hessian: str
    structure: str
    dim: int
    space: ParameterSpace = field(repr=False)
    covariance_operator: Any = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def sample(self, n: int, seed: int = 0, *, retraction: str = "linear") -> Tensor:
        """n draws from the approximation, shape (n, d), in the space's chart.

        Tangent vectors v_i = S z_i ~ N(0, Σ) (S Sᵀ = Σ, ``covariance_operator.sqrt_matmat``)
        from z_i ~ N(0, I) drawn one after the other with a CPU generator seeded by ``seed``,
        in the point's dtype: draw i is the same for every n. (Σ fixes S only up to an
        orthogonal factor: the structured square roots come from eigendecompositions whose
        signs depend on the device and library, so the same seed gives the same
        distribution, not the same draws, on CPU and CUDA.) They are transformed
        :data:`SAMPLE_CHUNK` numbers at a time, so the memory beyond the (n, d) result stays
        bounded. ``retraction="linear"`` returns p* + v (the chart's straight line);
        ``retraction="exp"`` follows the geodesic of the space's metric, exp_{p*}(v), which is
        chart-independent (with a pulled-back Euclidean metric the samples in every chart
        map to the same θ-distribution exactly); it integrates one ODE per draw.
        """
        if retraction not in ("linear", "exp"):
            raise ValueError(f"sample: retraction must be 'linear' or 'exp', got {retraction!r}")
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"sample: n must be a non-negative integer, got {n!r}")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        d, p = self.dim, self.point
        draw_dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float64
        out = p.new_empty(int(n), d)
        rows = max(1, SAMPLE_CHUNK // max(d, 1))
        Z = torch.empty(min(rows, int(n)), d, dtype=draw_dtype)
        for start in range(0, int(n), rows):
            m = min(rows, int(n) - start)
            for i in range(m):
                torch.randn(d, generator=gen, dtype=draw_dtype, out=Z[i])
            V = self.covariance_operator.sqrt_matmat(Z[:m].to(p).T)   # columns z_i
            out[start:start + m] = p[None, :] + V.T
        if retraction == "linear" or self.space.metric.is_constant:
            return out
        return torch.stack([self.space.exp(p, v - p) for v in out])

    def predictive(
        self,
        X: Tensor,
        *,
        method: str = "glm",
        n_samples: int = 100,
        seed: int = 0,
        link: str = "probit",
        retraction: str = "linear",
    ) -> Prediction:
        r"""Posterior predictive at inputs X (spaces from :func:`posterior_space`).

        ``method="mc"``: :func:`~covariant.laplace.predictive.mc_predictive` over
        ``n_samples`` draws of :meth:`sample`. ``method="glm"``: the linearized network,
        :func:`~covariant.laplace.predictive.glm_predictive` (``link`` "probit" or "mc").

        Returns
        -------
        Tensor or (Tensor, Tensor)
            Class probabilities (n, C) for classification; the predictive mean and variance
            (the latter including σ²) for regression.
        """
        if method == "mc":
            draws = self.sample(n_samples, seed, retraction=retraction)
            return mc_predictive(self.space, draws, X)
        if method != "glm":
            raise ValueError(f"predictive: method must be 'glm' or 'mc', got {method!r}")
        return glm_predictive(self.space, self.point, self.covariance_operator, X, link=link,
                              n_samples=n_samples, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields: floats, the point as a list, ``info`` (scalars and tensors as
        lists), and ``covariance`` as the operator's ``summary()`` (kind, dim, trace and the
        range of the marginal variances; rank, floor and eigenvalues for "lowrank") instead
        of the d×d matrix. Non-finite floats and values JSON cannot hold become None."""
        return {
            "log_evidence": _jsonable(self.log_evidence),
            "log_joint": _jsonable(self.log_joint),
            "logdet_precision": _jsonable(self.logdet_precision),
            "riemannian": self.riemannian, "hessian": self.hessian,
            "structure": self.structure, "dim": self.dim,
            "point": _jsonable(self.point),
            "covariance": _jsonable(self.covariance_operator.summary()),
            "info": _jsonable(self.info),
        }


def _check_structure(structure: str, hessian: str | None) -> str:
    """The Hessian to use (None: "ggn" for "kron", else "exact"), after checking both."""
    if structure not in STRUCTURES:
        raise ValueError(
            f"laplace: unknown structure {structure!r}; supported structures are {STRUCTURES}"
        )
    if hessian is None:
        return "ggn" if structure == "kron" else "exact"
    if hessian not in HESSIANS:
        raise ValueError(f"laplace: hessian must be one of {HESSIANS}, got {hessian!r}")
    if structure == "kron" and hessian != "ggn":
        raise ValueError(
            "laplace: structure='kron' is the K-FAC of the likelihood's GGN: hessian must be "
            "'ggn' (or left out)")
    return hessian


def _prepared(space: ParameterSpace, p_map: Tensor,
              prior_precision: float | Tensor | None) -> ParameterSpace:
    """The density space (with the given prior), after checking it and the point."""
    if not space.is_density:
        raise ValueError(
            "laplace: needs a density space holding the log joint "
            "(ParameterSpace.from_log_prob(log_joint) or laplace.posterior_space(...))"
        )
    if prior_precision is not None:
        space = with_prior_precision(space, prior_precision)
    space.check_point(p_map, "laplace")
    return space


def _check_space(space: ParameterSpace, p: Tensor, structure: str, riemannian: bool,
                 limit: int) -> None:
    """The density space, the dense size limit and a non-degenerate metric."""
    d = p.shape[0]
    if structure == "full" and d > limit:
        raise DenseTooLargeError(
            f"laplace: structure='full' needs a dense {d}×{d} precision; the limit is "
            f"d = {limit} (FULL_MAX_DIM; pass max_dim=... if the memory and the O(d³) time "
            "are there). Use structure='diag' or 'lowrank'."
        )
    if riemannian and space.metric.is_degenerate(p):
        raise NotABijectionError(
            "laplace: the metric is degenerate here (a submersion chart such as weight norm): "
            "a Gaussian in ψ would spread along the gauge directions, which carry no "
            "information. The invariant evidence is the same in every bijective chart: compute "
            "it there (e.g. in the original coordinates)."
        )


def _structured(structure: str, hessian: str, fn: Any, space: ParameterSpace, p: Tensor, *,
                riemannian: bool, limit: int, rank: int, lowrank_floor: float | None,
                seed: int, kfac: KronFactors) -> Precision:
    if structure == "kron":
        return kron_precision(space, p, riemannian, kfac)
    curv = Curvature(space, fn, riemannian, hessian)
    if structure == "full":
        return full_precision(curv, p, riemannian=riemannian, max_dim=limit)
    if structure == "diag":
        return diagonal_precision(curv, p)
    return lowrank_precision(curv, space, p, rank=rank, floor=lowrank_floor, seed=seed)


def laplace(
    space: ParameterSpace,
    p_map: Tensor,
    riemannian: bool = True,
    hessian: str | None = None,
    structure: str = "full",
    prior_precision: float | Tensor | None = None,
    *,
    kfac: KronFactors = None,
    rank: int = 20,
    lowrank_floor: float | None = None,
    logdet_method: str = "auto",
    max_dim: int | None = None,
    seed: int = 0,
) -> LaplaceResult:
    r"""Laplace approximation of a density space around ``p_map``: evidence and covariance.

    Parameters
    ----------
    space : ParameterSpace
        A density space holding the log joint log p(D, ·) in its chart.
    p_map : Tensor
        The expansion point: the MAP (classic) or the Riemannian MAP (invariant); see
        :func:`covariant.density.map_estimate`. ``info["grad_norm"]`` reports how far from
        stationary it is.
    riemannian : bool
        The invariant approximation (True) or the classic one (False).
    hessian : {"exact", "ggn"}, optional
        The exact Hessian, or the GGN Σ_n J_nᵀ H_ℓ J_n of the likelihood (spaces from
        :func:`posterior_space`; computed in the space's chart, a tensor) plus the exact
        Hessian of the rest (prior, Jacobian terms, ½ log det G). Default: "exact", and
        "ggn" for "kron" (the only one it takes).
    structure : {"full", "diag", "lowrank", "kron"}
        "full": dense, d <= :data:`FULL_MAX_DIM` (raise with ``max_dim``). "diag": the
        diagonal of the precision (d products); log det(G⁻¹B) = Σ log B_ii − log det G
        (invariant only under elementwise charts). "lowrank": the top ``rank`` generalized
        eigenpairs (λ_i, u_i) of Hess u = λ G u by Lanczos, and λ₀G elsewhere: log det ≈
        Σ log λ_i + (d − k) log λ₀, with λ₀ = ``lowrank_floor``, else the scalar prior
        precision, else the mean remaining eigenvalue (Hutchinson). "kron" (model
        posteriors): K + δ with K the K-FAC of the likelihood's GGN in the weights' chart
        and the prior δ exact (:mod:`covariant.laplace.kron`); invariant in any bijective
        chart of the Euclidean weights, classic only in the weights' chart (else
        :class:`UnsupportedStructureError`).
    prior_precision : float or Tensor, optional
        For model posteriors: evaluate with this prior N(0, λ⁻¹I) on θ instead of the space's
        (:func:`with_prior_precision`), at the given ``p_map`` (post hoc).
    kfac : KroneckerFactored or dict, optional
        "kron" only: the undamped K-FAC of the likelihood's GGN at the weights w* (used as
        given), or options of ``covariant.metrics.KFAC.from_space`` (default: type-2 GGN).
    rank, lowrank_floor : int, float
        k and λ₀ for "lowrank".
    logdet_method : str
        How log det G enters the invariant version (:func:`covariant.density.logdet`); it
        must be twice differentiable ("closed" or "dense").
    max_dim : int, optional
        Override :data:`FULL_MAX_DIM`.
    seed : int
        Seed of the Lanczos start vector and trace probes.

    Raises
    ------
    DenseTooLargeError, UnsupportedStructureError, NotAModeError (the precision is not
    positive definite at ``p_map``), NotABijectionError (a degenerate metric: compute the
    invariant evidence in any bijective chart, it is the same number).
    """
    hessian = _check_structure(structure, hessian)
    if structure == "kron":
        check_kron_space(space, riemannian)
    space = _prepared(space, p_map, prior_precision)
    p, limit = p_map.detach(), max_dim or FULL_MAX_DIM
    _check_space(space, p, structure, riemannian, limit)
    fn = objective(space, riemannian, logdet_method, p)
    info: dict[str, Any] = {"grad_norm": float(grad(fn)(p).norm())}
    log_joint = -float(fn(p))
    logdet_G = float(fn(p) - space.loss_function(p)) * 2 if riemannian else 0.0
    if riemannian:
        info["logdet_metric"] = logdet_G
    prec = _structured(structure, hessian, fn, space, p, riemannian=riemannian, limit=limit,
                       rank=rank, lowrank_floor=lowrank_floor, seed=seed, kfac=kfac)
    info.update(prec.info)
    logdet_prec = prec.logdet if prec.relative else prec.logdet - logdet_G
    d = p.shape[0]
    log_evidence = log_joint + 0.5 * d * LOG_2PI - 0.5 * logdet_prec
    return LaplaceResult(
        log_evidence=float(log_evidence), point=p, precision=prec.precision,
        covariance=prec.covariance, log_joint=log_joint, logdet_precision=float(logdet_prec),
        riemannian=riemannian, hessian=hessian, structure=structure, dim=d, space=space,
        covariance_operator=prec.operator, info=info,
    )
