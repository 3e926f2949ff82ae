r"""The Laplace approximation: evidence, covariance, samples and predictives, classic and
invariant (docs/math.md §7).

On a density space (the log joint log p(D, θ); ``ParameterSpace.from_log_prob`` or
:func:`posterior_space` for an ``nn.Module``), expanded around a mode p*:

- **classic** (``riemannian=False``), around the MAP of p in the space's chart:

  .. math::

      \log Z ≈ \log p(D, p^*) + \tfrac d2 \log 2π − ½ \log\det ∇^2(−\log p)(p^*),

  which depends on the chart, because p is a density (it gains log|det J|) and ∇² is not a
  tensor;

- **invariant** (``riemannian=True``), around the Riemannian MAP, the mode of the scalar
  q = p/√det G:

  .. math::

      \log Z ≈ \log q(D, p^*) + \tfrac d2 \log 2π
               − ½ \log\det\big(G^{-1}\,\mathrm{Hess}(−\log q)\big),

  where every term is invariant (q is a scalar, G⁻¹Hess a (1,1) tensor). With G = I in the
  original chart it *is* the classic formula there, so in every chart it gives the classic
  evidence of the original chart.

The posterior covariance Σ = Hess⁻¹ is a (2,0) tensor: Σ_Ψ = J⁻¹ Σ_Θ J⁻ᵀ.

Structures: ``"full"`` (dense, d <= :data:`FULL_MAX_DIM`), ``"diag"`` (the diagonal of the
Hessian or GGN), ``"lowrank"`` (the top-k generalized eigenpairs of (Hess, G) by Lanczos,
plus a floor), ``"kron"`` (K-FAC of the likelihood's GGN plus the exact prior, in the
weights' chart: closed-form evidence, samples, GLM predictive and prior selection; the
invariant version works in any bijective chart of the Euclidean weights).

Modules: :mod:`~covariant.laplace.posterior` (model posteriors), :mod:`~.precision` (the
precision in the chart), :mod:`~.covariance` (covariance operators), :mod:`~.predictive`,
:mod:`~.evidence` (:func:`laplace`, :class:`LaplaceResult`), :mod:`~.kron` (K-FAC),
:mod:`~.prior` (prior selection).

Example
-------
>>> import torch, math, covariant as cv
>>> from covariant.laplace import laplace
>>> log_joint = lambda t: 2.0 - 2 * ((t - 1) ** 2).sum() - 0.5 * math.log(2 * math.pi / 4)
>>> space = cv.ParameterSpace.from_log_prob(log_joint)
>>> res = laplace(space, torch.tensor([1.0], dtype=torch.float64), riemannian=False)
>>> round(res.log_evidence, 10)                       # exact for a Gaussian: log Z = 2
2.0
>>> y = space.reparametrize(cv.reparam.Exp())       # θ = e^ψ: the classic answer moves …
>>> m = cv.density.map_estimate(y, torch.tensor([0.1], dtype=torch.float64), riemannian=True)
>>> round(laplace(y, m.point, riemannian=True).log_evidence, 10)   # … the invariant one not
2.0
"""

from __future__ import annotations

from ..errors import NotAModeError, UnsupportedStructureError
from .covariance import (
    DenseCovariance,
    DiagonalCovariance,
    KroneckerCovariance,
    LowRankCovariance,
)
from .evidence import FULL_MAX_DIM, HESSIANS, STRUCTURES, LaplaceResult, laplace
from .posterior import (
    GaussianNLL,
    gaussian_prior_nll,
    posterior_space,
    with_prior_precision,
)
from .prior import PriorPrecisionResult, optimize_prior_precision

__all__ = [
    "FULL_MAX_DIM",
    "HESSIANS",
    "STRUCTURES",
    "DenseCovariance",
    "DiagonalCovariance",
    "GaussianNLL",
    "KroneckerCovariance",
    "LaplaceResult",
    "LowRankCovariance",
    "NotAModeError",
    "PriorPrecisionResult",
    "UnsupportedStructureError",
    "gaussian_prior_nll",
    "laplace",
    "optimize_prior_precision",
    "posterior_space",
    "with_prior_precision",
]

