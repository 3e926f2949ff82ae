r"""The Kronecker-factored (K-FAC) Laplace approximation of a model posterior.

The precision is built in the chart of the weights w (the root coordinates of a
:func:`~covariant.laplace.posterior_space`), where the prior N(0, δ⁻¹ I) lives:

.. math::

    P = K + δ,

with K the K-FAC of the generalized Gauss-Newton matrix of the negative log-likelihood
−log p(D | w) (the binding's loss, a sum over the data) at w* and the prior precision δ
added exactly to its eigenvalues (a number, or one value per coordinate that is constant
on every Kronecker block). Everything is closed-form per layer
(:class:`~covariant.metrics.kronecker.KroneckerFactored`):

.. math::

    \log Z ≈ \log p(D, w^*) + \tfrac d2 \log 2π − ½ \log\det(K + δ).

**Charts.** In the weights' chart the classic and the invariant (Euclidean metric) versions
coincide. In a bijective chart w = h(ψ) with the pulled-back Euclidean metric G = JᵀJ the
invariant version (``riemannian=True``) uses the (0,2) tensor Jᵀ P J, so
log det(G⁻¹ Jᵀ P J) = log det P: the evidence is the weights' chart's, and the covariance is
transported as a (2,0) tensor, Σ_ψ = J⁻¹ P⁻¹ J⁻ᵀ (:class:`KroneckerCovariance`). The classic
version is the same in an affine chart (J constant: the classic Hessian is Jᵀ P J and
log|det J| cancels); in a nonlinear chart it is not Kronecker-structured (the Hessian of
−log p_ψ is Jᵀ∇²J plus terms of h'' and of log|det J|, and JᵀKJ is a Kronecker product only
for charts that scale a whole block): it raises
:class:`~covariant.errors.UnsupportedStructureError`.

**Prior selection.** At a fixed w* the evidence is a closed-form function of a scalar δ
through the eigenvalues λ_i of K (:class:`KronEvidence`):
log Z(δ) = c − ½ δ ‖w*‖² + ½ d log δ − ½ Σ_i log(λ_i + δ).

Example
-------
>>> import math, torch
>>> from covariant.metrics.kronecker import KroneckerBlock, KroneckerFactored
>>> from covariant.laplace import KroneckerCovariance
>>> A, B = torch.eye(2, dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
>>> K = KroneckerFactored([KroneckerBlock("w", torch.arange(2), A, B)], dim=2)   # K = 3 I
>>> ev = KronEvidence(KroneckerCovariance(K), torch.zeros(2, dtype=torch.float64), 0.0)
>>> abs(ev(1.0) - (math.log(1.0) - math.log(3.0 + 1.0))) < 1e-12   # d/2 (log δ − log(3 + δ))
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import default_tol
from ..errors import NotAModeError, UnsupportedStructureError
from ..metrics import KFAC, Euclidean, Pullback
from ..metrics.kronecker import NULL_RTOL, KroneckerFactored
from ..metrics.shard import shard_of
from ..space import ParameterSpace
from .covariance import KroneckerCovariance
from .posterior import LOG_2PI, GaussianNLL, gaussian_prior_nll, prior_precision_of
from .precision import Precision

__all__ = ["KronEvidence", "KronFactors", "check_kron_space", "kron_logdet", "kron_precision",
           "likelihood_kfac"]

#: What ``laplace(..., kfac=...)`` accepts: the factors themselves, options for
#: ``KFAC.from_space``, or None (the defaults: type-2 GGN, expand).
KronFactors = KroneckerFactored | Mapping[str, Any] | None


def _unsupported(msg: str) -> UnsupportedStructureError:
    return UnsupportedStructureError("laplace: structure='kron' " + msg)


def _pulled_back_euclidean(space: ParameterSpace) -> bool:
    """Whether the space's metric is the Euclidean metric of the weights, pulled back."""
    chain = space.lineage()
    if not isinstance(chain[-1].metric, Euclidean):
        return False
    for s in chain[:-1]:
        m = s.metric
        if not (isinstance(m, Pullback) and m.base is s.parent.metric  # type: ignore[union-attr]
                and m.reparam is s.chart):
            return False
    return True


def check_kron_space(space: ParameterSpace, riemannian: bool) -> None:
    """A model posterior, in the weights' chart or (invariant) a chart of the Euclidean one."""
    binding = space.binding
    if binding is None or not binding.is_bayesian:
        raise _unsupported(
            "needs a model posterior (covariant.laplace.posterior_space): K-FAC factors the "
            "layers of a network. For a plain log joint use structure 'full', 'diag' or "
            "'lowrank'.")
    h = space.root_chart()
    if h is not None and not riemannian and not (h.is_affine and h.is_bijection):
        raise _unsupported(
            "is defined in the chart of the weights, where the prior lives. The classic "
            "Hessian in a nonlinear chart (J^T H J plus terms of h'' and log|det J|) is not "
            "Kronecker-factored: use riemannian=True (chart-independent: the evidence of the "
            "weights' chart, the covariance transported as J^-1 Sigma J^-T), or the weights' "
            "chart itself (docs/math.md §7).")
    if riemannian and not _pulled_back_euclidean(space):
        raise _unsupported(
            "with riemannian=True needs the Euclidean metric of the weights (pulled back to "
            "this chart); with another metric G, G^-1 (K + delta) has no Kronecker closed form. "
            "Use riemannian=False in the weights' chart, or structure 'diag' / 'lowrank'.")


def likelihood_kfac(space: ParameterSpace, theta: Tensor, kfac: KronFactors = None
                    ) -> KroneckerFactored:
    """K: the K-FAC of the likelihood's GGN at θ (weights' coordinates), undamped.

    ``kfac`` a KroneckerFactored: used as given (it must be undamped, of dimension d; e.g.
    ``EKFAC(...).factors(theta)``); a mapping: options of :class:`covariant.metrics.KFAC`
    (``fisher_type``, ``mc_samples``, ``kfac_approx``, ``separate_bias``); None: its defaults
    (type-2 GGN, expand, separate biases). K-FAC is built on the binding of the posterior
    (model, data, the summed negative log-likelihood); a Gaussian likelihood
    (:class:`GaussianNLL`, output Hessian I/σ²) as ``MSELoss(reduction="sum")`` (2I) scaled
    by 1/(2σ²).
    """
    d = theta.shape[0]
    if isinstance(kfac, KroneckerFactored):
        damp = kfac.damping
        if kfac.dim != d or (float(damp) != 0.0 if not isinstance(damp, Tensor)
                             else bool((damp != 0).any())):
            raise ValueError(
                f"laplace: kfac must be the undamped K-FAC of the likelihood's GGN on the "
                f"{d} weights (the prior precision is added as its damping); got dimension "
                f"{kfac.dim} and damping {damp if not isinstance(damp, Tensor) else 'tensor'}")
        return kfac
    options = dict(kfac or {})
    if "damping" in options:
        raise ValueError("laplace: kfac options must not damp K: the prior precision is the "
                         "damping of the kron precision (prior_precision=...)")
    binding = space.binding
    assert binding is not None
    loss_fn, scale = binding.loss_fn, 1.0
    if isinstance(loss_fn, GaussianNLL):
        # −log N(y; f, σ²) has the output Hessian I/σ²; MSELoss(sum) = Σ‖f − y‖² has 2I
        loss_fn, scale = nn.MSELoss(reduction="sum"), 0.5 / loss_fn.sigma2
    metric = KFAC(binding.model, loss_fn, list(binding.batches), list(binding.weights),
                  forward=binding.forward, shard=shard_of(binding), **options)
    K = metric.factors(theta)
    return K if scale == 1.0 else K.scaled(scale)


def _prior_damping(space: ParameterSpace, d: int, like: Tensor) -> float | Tensor:
    delta = prior_precision_of(space)
    assert delta is not None
    delta_t = torch.as_tensor(delta)
    if delta_t.ndim == 0:
        return float(delta_t)
    return delta_t.to(like).reshape(d)


def _with_prior(K: KroneckerFactored, delta: float | Tensor) -> KroneckerFactored:
    """K + δ as a new operator sharing K's eigenbasis (checks δ)."""
    try:
        return K.with_damping(delta)
    except ValueError as err:
        raise ValueError(
            "laplace: structure='kron' needs a prior precision that is one number, or constant "
            f"on every Kronecker block (each layer's weight matrix): {err}") from None


def kron_logdet(cov: KroneckerCovariance, damping: float | Tensor | None = None) -> float:
    """log det(K + δ) from the eigenvalues (accumulated in float64), δ the precision's
    damping unless given; NotAModeError where it is singular. K is PSD by construction, so a
    positive prior δ makes an eigenvalue positive however small δ is relative to K (no
    relative threshold applies there); where δ = 0 an eigenvalue of K at or below K's null
    threshold (docs/math.md §4.1) is singular."""
    if isinstance(damping, Tensor):
        _with_prior(cov.precision, damping)
    ev = cov.eigenvalues(damping)
    ev0 = cov.eigenvalues(0.0)
    tau = default_tol(None, ev0.dtype, NULL_RTOL) * float(ev0.abs().max())
    bad = (ev <= 0) | ((ev - ev0 <= 0) & (ev0 <= tau))
    if bool(bad.any()):
        raise NotAModeError(
            f"laplace: the K-FAC precision K + prior is singular ({int(bad.sum())} null "
            "eigenvalues: a zero prior precision on directions the likelihood does not see); "
            "use a positive prior precision.")
    return float(ev.detach().double().log().sum())


def kron_precision(space: ParameterSpace, p: Tensor, riemannian: bool,
                   kfac: KronFactors = None) -> Precision:
    """P = K + δ at θ* = h(p) and its covariance operator in the space's chart.

    ``logdet`` is log det P = log det(G⁻¹ Jᵀ P J) (invariant), or the classic
    log det(Jᵀ P J) = log det P + 2 log|det J| in an affine chart (J constant: there the
    classic Hessian is Jᵀ P J exactly).
    """
    theta = space.to_root(p).detach()
    K = likelihood_kfac(space, theta, kfac)
    P = _with_prior(K, _prior_damping(space, theta.shape[0], theta))
    h = space.root_chart()
    cov = KroneckerCovariance(P, None if h is None else h.linearize(p.detach()))
    logdet = kron_logdet(cov)
    if h is not None and not riemannian:
        logdet += 2.0 * float(h.log_abs_det_jacobian(p.detach()))
    info = {"kfac_blocks": len(P.blocks), "kfac_uncovered": int(P.rest_index.numel())}
    return Precision(None, cov, cov, logdet, relative=True, info=info)


@dataclass
class KronEvidence:
    r"""log Z(δ) = L(δ) + d/2 log 2π − ½ log det(K + δ) at a fixed point, closed form in δ.

    ``covariance`` holds K's eigendecomposition (its own damping is replaced by δ);
    ``log_likelihood`` is the part of the log joint that does not depend on the prior
    (log p(D | w*), plus the chart's terms, which cancel for the invariant version):
    L(δ) = log_likelihood − (−log N(w*; 0, δ⁻¹ I)).
    """

    covariance: KroneckerCovariance
    theta: Tensor
    log_likelihood: float

    def log_joint(self, delta: float | Tensor) -> float:
        return self.log_likelihood - float(gaussian_prior_nll(self.theta, delta))

    def __call__(self, delta: float | Tensor) -> float:
        d = self.theta.shape[0]
        return (self.log_joint(delta) + 0.5 * d * LOG_2PI
                - 0.5 * kron_logdet(self.covariance, delta))
