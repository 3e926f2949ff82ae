r"""The precision of a Laplace approximation in the chart of a density space.

The objective is −log p (classic) or −log q = −log p + ½ log det G (invariant; its Hessian
is the Riemannian one, with the connection term, from :meth:`ParameterSpace.hessian` /
:meth:`ParameterSpace.hvp_operator`). With ``hessian="ggn"`` the likelihood term is replaced
by its generalized Gauss-Newton matrix :class:`covariant.metrics.GGN` in the space's chart
(a pullback of the θ-GGN: a tensor) and only the rest of the objective (prior, Jacobian
terms, ½ log det G) is differentiated twice.

Three structures (:func:`full_precision`, :func:`diagonal_precision`,
:func:`lowrank_precision`) turn it into a covariance operator and log det(G⁻¹ P).

Example
-------
>>> import math, torch, covariant as cv
>>> space = cv.ParameterSpace.from_log_prob(lambda t: -(t**2).sum() - (t**4).sum())
>>> p = torch.zeros(2, dtype=torch.float64)
>>> curv = Curvature(space, objective(space, False, "auto", p), False, "exact")
>>> curv.dense(p, max_dim=10).tolist()                  # ∇²(t² + t⁴) at 0 = 2 I
[[2.0, 0.0], [0.0, 2.0]]
>>> prec = full_precision(curv, p, riemannian=False, max_dim=10)
>>> abs(prec.logdet - 2 * math.log(2.0)) < 1e-12          # log det(2 I)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..density import logdet
from ..errors import NotAModeError
from ..linalg import hutchinson, lanczos
from ..metrics import GGN, Euclidean
from ..space import ParameterSpace
from .covariance import DenseCovariance, DiagonalCovariance, LowRankCovariance
from .posterior import posterior_binding, prior_precision_of, root_map

__all__ = [
    "Curvature",
    "Precision",
    "diagonal_precision",
    "full_precision",
    "lowrank_precision",
    "objective",
]

LossFn = Callable[[Tensor], Tensor]


def objective(space: ParameterSpace, riemannian: bool, logdet_method: str, p: Tensor) -> LossFn:
    """−log p (classic), or −log q = −log p + ½ log det G (invariant), as a plain callable."""
    base = space.loss_function
    if not riemannian:
        return base
    metric = space.metric
    if logdet_method == "slq":
        raise ValueError(
            "laplace: the invariant Hessian differentiates log det G twice; use "
            "logdet_method='closed' or 'dense' (SLQ gives only a first derivative)"
        )
    if logdet_method == "auto":
        logdet_method = "closed" if metric.closed_form_logdet(p) is not None else "dense"
    method = logdet_method
    return lambda q: base(q) + 0.5 * logdet(metric, q, method)


def operator_diagonal(matvec: Callable[[Tensor], Tensor], like: Tensor) -> Tensor:
    """diag A from the products A e_i with the unit vectors (d products)."""
    d = like.shape[0]
    out = torch.empty(d, dtype=like.dtype, device=like.device)
    for i in range(d):
        e = torch.zeros(d, dtype=like.dtype, device=like.device)
        e[i] = 1.0
        out[i] = matvec(e)[i]
    return out


class Curvature:
    """P = Hess(objective), or GGN(−log p(D|·)) + Hess(objective + log p(D|·)), at p.

    ``riemannian`` selects the Riemannian Hessian (with the connection term of the space's
    metric) for the differentiated part; the GGN is a tensor and needs none.
    """

    def __init__(self, space: ParameterSpace, fn: LossFn, riemannian: bool,
                 hessian: str) -> None:
        self.riemannian = riemannian
        self.ggn: GGN | None = None
        rest = fn
        if hessian == "ggn":
            nll, to_root = posterior_binding(space, "hessian='ggn'").loss, root_map(space)
            self.ggn = GGN.from_space(space)

            def rest(q: Tensor) -> Tensor:
                return fn(q) - nll(to_root(q))

        self.rest = space.with_loss(rest)

    def dense(self, p: Tensor, max_dim: int) -> Tensor:
        """P as a dense symmetric matrix."""
        H = self.rest.hessian(p, self.riemannian, max_dim=max_dim)
        return H if self.ggn is None else self.ggn.dense(p, max_dim=max_dim) + H

    def diagonal(self, p: Tensor) -> Tensor:
        """diag P (d products)."""
        hd = operator_diagonal(self.rest.hvp_operator(p, self.riemannian), p)
        if self.ggn is None:
            return hd
        ggn = self.ggn
        return operator_diagonal(lambda v: ggn.matvec(p, v).detach(), p) + hd

    def operator(self, p: Tensor) -> Callable[[Tensor], Tensor]:
        """v ↦ P v."""
        rv = self.rest.hvp_operator(p, self.riemannian)
        if self.ggn is None:
            return rv
        ggn = self.ggn

        def mv(v: Tensor) -> Tensor:
            return ggn.matvec(p, v).detach() + rv(v)

        return mv


@dataclass
class Precision:
    """A structured precision: its covariance and log det P in the chart.

    ``covariance`` is what the result shows (the dense Σ for "full", else the operator);
    ``operator`` the covariance operator (``matmat``, ``sqrt_matmat``, ``summary``).
    ``logdet`` is log det P (full, diag) or already log det(G⁻¹P) (lowrank, see
    ``relative``).
    """

    precision: Tensor | None
    covariance: Any
    operator: Any
    logdet: float
    relative: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def full_precision(curv: Curvature, p: Tensor, *, riemannian: bool, max_dim: int) -> Precision:
    """The dense precision and its Cholesky factor; NotAModeError unless positive definite."""
    H = curv.dense(p, max_dim)
    L, infoc = torch.linalg.cholesky_ex(H)
    if int(infoc) != 0:
        ev = torch.linalg.eigvalsh(H)
        raise NotAModeError(
            f"laplace: the Hessian at p_map is not positive definite (smallest eigenvalue "
            f"{float(ev[0]):.3e}); p_map is not a local mode. Find it first with "
            f"covariant.density.map_estimate(space, p0, riemannian={riemannian})."
        )
    covariance = torch.cholesky_inverse(L)
    return Precision(H, covariance, DenseCovariance(L, covariance),
                     float(2 * torch.diagonal(L).log().sum()))


def diagonal_precision(curv: Curvature, p: Tensor) -> Precision:
    """The diagonal of the precision; NotAModeError unless every entry is positive."""
    hd = curv.diagonal(p)
    if not bool((hd > 0).all()):
        raise NotAModeError(
            f"laplace: {int((hd <= 0).sum())} diagonal Hessian entries are <= 0 at p_map; "
            "it is not a mode (or the diagonal approximation fails there)."
        )
    cov = DiagonalCovariance(hd)
    return Precision(None, cov, cov, float(hd.log().sum()))


def lowrank_precision(
    curv: Curvature,
    space: ParameterSpace,
    p: Tensor,
    *,
    rank: int,
    floor: float | None,
    seed: int,
) -> Precision:
    """Top-k generalized eigenpairs of (P, G) by Lanczos (G = I for the classic version),
    and the floor λ₀ on the rest: log det(G⁻¹P) ≈ Σ log λ_i + (d − k) log λ₀."""
    d, riemannian, metric = p.shape[0], curv.riemannian, space.metric
    hv = curv.operator(p)
    k = min(int(rank), d)
    if riemannian:
        res = lanczos(lambda v: metric.solve(p, hv(v)), d, k,
                      inner_matvec=lambda v: metric.matvec(p, v), seed=seed,
                      dtype=p.dtype, device=p.device)
    else:
        res = lanczos(hv, d, k, seed=seed, dtype=p.dtype, device=p.device)
    lam, U = res.eigenvalues, res.eigenvectors
    if float(lam.min()) <= 0:
        raise NotAModeError(
            f"laplace: a top eigenvalue of the Hessian is {float(lam.min()):.3e} <= 0; "
            "p_map is not a mode."
        )
    E = (lambda v: metric.solve(p, hv(v))) if riemannian else hv
    floor_ = _lowrank_floor(space, E, lam, d, floor, seed, p)
    cov = LowRankCovariance(U, lam, floor_, metric if riemannian else Euclidean(), p)
    logdet_rel = float(lam.log().sum()) + (d - k) * math.log(floor_)
    return Precision(None, cov, cov, logdet_rel, relative=True,
                     info={"lanczos_converged": bool(res.converged), "lowrank_floor": floor_})


def _lowrank_floor(space: ParameterSpace, E: Callable[[Tensor], Tensor], lam: Tensor, d: int,
                   floor: float | None, seed: int, p: Tensor) -> float:
    """λ₀: the given floor, else a scalar prior precision, else the mean of the remaining
    eigenvalues of E = G⁻¹P from a Hutchinson estimate of its trace."""
    binding = space.binding
    prior = prior_precision_of(space)
    k = lam.shape[0]
    if floor is not None:
        return float(floor)
    if binding is not None and binding.is_bayesian and torch.as_tensor(prior).ndim == 0:
        return float(prior)  # type: ignore[arg-type]
    if k == d:
        return float(lam.min())
    tr = hutchinson(E, d, num_probes=64, seed=seed, dtype=p.dtype, device=p.device).value
    out = (tr - float(lam.sum())) / (d - k)
    if out <= 0:
        raise NotAModeError(
            "laplace: the estimated mean of the remaining eigenvalues is <= 0; pass "
            "lowrank_floor=... (e.g. the prior precision) or raise rank."
        )
    return out
