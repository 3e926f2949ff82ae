r"""The Laplace approximation: evidence, covariance, samples and predictives, classic and
invariant (MATH.md §7).

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
plus a floor). Kronecker-factored (``"kron"``, KFAC) is not implemented: it raises
:class:`UnsupportedStructureError`.

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import hessian as func_hessian
from torch.func import jacrev, jvp, vjp, vmap

from .connection import connection_correction
from .density import logdet, map_estimate
from .errors import (
    DenseTooLargeError,
    NotABijectionError,
    ShapeMismatchError,
)
from .layout import ModelBinding, ParameterLayout
from .metrics import MAX_DENSE_DIM, Euclidean, Metric
from .space import ParameterSpace

__all__ = [
    "FULL_MAX_DIM",
    "HESSIANS",
    "STRUCTURES",
    "DiagonalCovariance",
    "LaplaceResult",
    "LowRankCovariance",
    "NotAModeError",
    "PriorPrecisionResult",
    "UnsupportedStructureError",
    "laplace",
    "optimize_prior_precision",
    "posterior_space",
    "with_prior_precision",
]

#: Largest dimension for ``structure="full"`` unless ``max_dim`` raises it: a dense d×d
#: precision (8·d² bytes in float64, 128 MiB at d = 4096), d Hessian-vector products to build
#: it and an O(d³) Cholesky factorization.
FULL_MAX_DIM = MAX_DENSE_DIM

STRUCTURES = ("full", "diag", "lowrank")
HESSIANS = ("exact", "ggn")
_LOG_2PI = math.log(2 * math.pi)


from .errors import NotAModeError, UnsupportedStructureError  # noqa: E402  (re-exported)

# --------------------------------------------------------------------------------------------
# Bayesian model spaces
# --------------------------------------------------------------------------------------------


@dataclass
class _Bayes:
    forward: Callable[[Tensor, Tensor], Tensor]
    nll: Callable[[Tensor], Tensor]
    likelihood: str
    sigma_noise: float
    X: Tensor
    y: Tensor
    model: nn.Module


def _prior_nll(theta: Tensor, lam: float | Tensor) -> Tensor:
    """−log N(θ; 0, λ⁻¹ I) for a scalar or per-coordinate precision λ."""
    lam_t = torch.as_tensor(lam, dtype=theta.dtype, device=theta.device)
    quad = 0.5 * (lam_t * theta**2).sum()
    if lam_t.ndim == 0:
        return quad - 0.5 * theta.shape[0] * (torch.log(lam_t) - _LOG_2PI)
    return quad - 0.5 * (torch.log(lam_t) - _LOG_2PI).sum()


class GaussianNLL(nn.Module):
    """−log N(y; f, σ² I) summed over all entries: ½‖f − y‖²/σ² + ½·numel·log(2πσ²)."""

    def __init__(self, sigma_noise: float) -> None:
        super().__init__()
        self.sigma2 = float(sigma_noise) ** 2
        self.reduction = "sum"

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        t = y.reshape(f.shape).to(f)
        return 0.5 * ((f - t) ** 2).sum() / self.sigma2 + 0.5 * f.numel() * math.log(
            2 * math.pi * self.sigma2)


def _bayes_of(space: ParameterSpace) -> _Bayes | None:
    b = space.binding
    if b is None or not b.is_bayesian:
        return None
    (X, y), = b.batches
    return _Bayes(b.forward, b.loss, b.likelihood, b.sigma_noise, X, y, b.model)


def _prior_of(space: ParameterSpace) -> float | Tensor | None:
    b = space.binding
    return None if b is None else b.prior_precision


def _to_root_fn(space: ParameterSpace) -> Callable[[Tensor], Tensor]:
    h = space.root_chart()
    return (lambda q: q) if h is None else h.forward


def _require_bayes(space: ParameterSpace, what: str) -> _Bayes:
    b = _bayes_of(space)
    if b is None:
        raise ValueError(
            f"{what} needs a model posterior: build the space with "
            "covariant.laplace.posterior_space(model, (X, y), ...) (then reparametrize it as "
            "you like); a plain from_log_prob space knows no model, likelihood or prior."
        )
    return b


def _require_bayes_binding(space: ParameterSpace, what: str) -> ModelBinding:
    _require_bayes(space, what)
    assert space.binding is not None
    return space.binding


def posterior_space(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    likelihood: str = "classification",
    prior_precision: float | Tensor = 1.0,
    sigma_noise: float = 1.0,
    metric: Metric | None = None,
    max_dense_dim: int | None = None,
) -> tuple[ParameterSpace, Tensor]:
    r"""The log joint of a network with a Gaussian prior, as a density space.

    .. math::

        \log p(D, θ) = \sum_n \log p(y_n | f(x_n; θ)) + \log N(θ; 0, λ^{-1} I),

    with a categorical likelihood (softmax of the logits, ``"classification"``) or a Gaussian
    one N(y; f, σ²) (``"regression"``). The space remembers the model, the data and the
    likelihood, which the GGN Hessian, the predictives and prior selection need; it can be
    reparametrized like any density space (the prior stays the one placed on θ).

    Parameters
    ----------
    model : nn.Module
    data : (X, y)
        The training set, one batch.
    likelihood : {"classification", "regression"}
    prior_precision : float or Tensor
        λ, a scalar or one value per coordinate.
    sigma_noise : float
        σ of the Gaussian likelihood (regression only).
    metric : Metric, optional
        The metric of the θ chart (Euclidean by default).

    Returns
    -------
    space, theta : ParameterSpace, Tensor
        The density space and the model's current flat parameters.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> X = torch.randn(20, 2, dtype=torch.float64); y = (X[:, 0] > 0).long()
    >>> model = nn.Linear(2, 2).double()
    >>> space, theta = posterior_space(model, (X, y), prior_precision=1.0)
    >>> theta.shape
    torch.Size([6])
    """
    if likelihood not in ("classification", "regression"):
        raise ValueError(
            f"posterior_space: likelihood must be 'classification' or 'regression', got "
            f"{likelihood!r}"
        )
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError("posterior_space: data must be one (X, y) batch")
    X, y = data
    if likelihood == "classification":
        if y.dtype not in (torch.int64, torch.int32):
            raise ShapeMismatchError("posterior_space: classification targets must be integers")
        nll_fn: nn.Module = nn.CrossEntropyLoss(reduction="sum")
    else:
        nll_fn = GaussianNLL(sigma_noise)
    binding, theta = ModelBinding.from_module(
        model, nll_fn, (X, y), likelihood=likelihood, sigma_noise=float(sigma_noise),
        prior_precision=prior_precision,
    )
    nll, lam0 = binding.loss, prior_precision

    def loss(p: Tensor) -> Tensor:
        return nll(p) + _prior_nll(p, lam0)

    space = ParameterSpace(
        loss, metric, layout=ParameterLayout.from_module(model), is_density=True,
        max_dense_dim=max_dense_dim, binding=binding,
    )
    return space, theta


def with_prior_precision(space: ParameterSpace, prior_precision: float | Tensor) -> ParameterSpace:
    """The same model posterior (same chart and metric) with the prior N(0, λ⁻¹ I) on θ.

    The prior lives in the coordinates θ of the space made by :func:`posterior_space`; in a
    reparametrized chart it is evaluated at θ = h(ψ) (the Jacobian factor of the density is
    already part of the space).
    """
    binding = _require_bayes_binding(space, "with_prior_precision")
    lam_old = binding.prior_precision
    base = space.loss_function
    to_root = _to_root_fn(space)

    def loss(p: Tensor) -> Tensor:
        t = to_root(p)
        return base(p) + _prior_nll(t, prior_precision) - _prior_nll(t, lam_old)

    return space.with_loss(loss).with_binding(binding.replace(prior_precision=prior_precision))


# --------------------------------------------------------------------------------------------
# Curvature in the space's chart
# --------------------------------------------------------------------------------------------


def _objective(
    space: ParameterSpace, riemannian: bool, logdet_method: str, p: Tensor
) -> Callable:
    if not riemannian:
        return space._loss
    metric, base = space.metric, space._loss
    if logdet_method == "slq":
        raise ValueError(
            "laplace: the invariant Hessian differentiates log det G twice; use "
            "logdet_method='closed' or 'dense' (SLQ gives only a first derivative)"
        )
    if logdet_method == "auto":
        logdet_method = "closed" if metric.closed_form_logdet(p) is not None else "dense"
    return lambda p: base(p) + 0.5 * logdet(metric, p, logdet_method)


def _riemannian_correction_dense(metric: Metric, fn: Callable, p: Tensor) -> Tensor:
    """C[i, j] = Γ^m_ij ∂_m fn, matrix-free per column (zero for a constant metric)."""
    if metric.is_constant:
        return torch.zeros(p.shape[0], p.shape[0], dtype=p.dtype, device=p.device)
    r = metric.solve(p, func_grad(fn)(p))
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return vmap(lambda e: connection_correction(metric, p, e, r))(eye)


def _hessian_dense(fn: Callable, p: Tensor, metric: Metric | None) -> Tensor:
    """∇²fn, minus the connection term Γ·∇fn when a metric is given (the Riemannian Hessian)."""
    H = func_hessian(fn)(p)
    if metric is not None:
        H = H - _riemannian_correction_dense(metric, fn, p)
    return 0.5 * (H + H.T)


def _hvp(fn: Callable, p: Tensor, metric: Metric | None) -> Callable[[Tensor], Tensor]:
    g = func_grad(fn)
    r = None if metric is None or metric.is_constant else metric.solve(p, g(p)).detach()

    def mv(v: Tensor) -> Tensor:
        out = jvp(g, (p,), (v,))[1]
        if r is not None:
            out = out - connection_correction(metric, p, v, r)
        return out.detach()

    return mv


def _hessian_diag(fn: Callable, p: Tensor, metric: Metric | None, chunk: int = 64) -> Tensor:
    mv = _hvp(fn, p, metric)
    d = p.shape[0]
    out = torch.empty(d, dtype=p.dtype, device=p.device)
    for s in range(0, d, chunk):
        idx = torch.arange(s, min(s + chunk, d), device=p.device)
        E = torch.zeros(idx.shape[0], d, dtype=p.dtype, device=p.device)
        E[torch.arange(idx.shape[0]), idx] = 1.0
        cols = torch.stack([mv(e) for e in E])
        out[idx] = cols[torch.arange(idx.shape[0]), idx]
    return out


def _outputs_fn(space: ParameterSpace, bayes: _Bayes) -> Callable[[Tensor, Tensor], Tensor]:
    to_root = _to_root_fn(space)
    return lambda p, Xb: bayes.forward(to_root(p), Xb)


def _lik_hessian(bayes: _Bayes, f: Tensor) -> Tensor:
    """Hessian of −log p(y|f) w.r.t. the outputs, per sample: (n, C, C)."""
    n, C = f.shape
    if bayes.likelihood == "classification":
        pr = torch.softmax(f, -1)
        return torch.diag_embed(pr) - pr[:, :, None] * pr[:, None, :]
    eye = torch.eye(C, dtype=f.dtype, device=f.device)
    return eye.expand(n, C, C) / bayes.sigma_noise**2


def _ggn_chunks(space: ParameterSpace, bayes: _Bayes, p: Tensor, chunk: int):
    out_fn = _outputs_fn(space, bayes)
    X = bayes.X
    for s in range(0, X.shape[0], chunk):
        Xb = X[s : s + chunk]
        f = out_fn(p, Xb).detach()
        f2 = f.reshape(f.shape[0], -1)
        J = jacrev(lambda q, Xb=Xb: out_fn(q, Xb).reshape(Xb.shape[0], -1))(p).detach()
        yield J, _lik_hessian(bayes, f2)


def _ggn_dense(space: ParameterSpace, bayes: _Bayes, p: Tensor, chunk: int = 128) -> Tensor:
    """Σ_n J_nᵀ H_ℓ J_n with J_n = ∂f(x_n)/∂p in this chart (a pullback of the θ-GGN)."""
    d = p.shape[0]
    out = torch.zeros(d, d, dtype=p.dtype, device=p.device)
    for J, L in _ggn_chunks(space, bayes, p, chunk):
        out += torch.einsum("ncd,nce,nek->dk", J, L, J)
    return 0.5 * (out + out.T)


def _ggn_diag(space: ParameterSpace, bayes: _Bayes, p: Tensor, chunk: int = 128) -> Tensor:
    out = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    for J, L in _ggn_chunks(space, bayes, p, chunk):
        out += torch.einsum("ncd,nce,ned->d", J, L, J)
    return out


def _ggn_matvec(space: ParameterSpace, bayes: _Bayes, p: Tensor) -> Callable[[Tensor], Tensor]:
    out_fn = _outputs_fn(space, bayes)
    X = bayes.X
    f, pull = vjp(lambda q: out_fn(q, X), p)
    f = f.detach()
    L = _lik_hessian(bayes, f.reshape(f.shape[0], -1))

    def mv(v: Tensor) -> Tensor:
        Jv = jvp(lambda q: out_fn(q, X), (p,), (v,))[1].reshape(f.shape[0], -1)
        HJv = torch.einsum("nce,ne->nc", L, Jv).reshape(f.shape)
        return pull(HJv)[0].detach()

    return mv


# --------------------------------------------------------------------------------------------
# Covariance operators
# --------------------------------------------------------------------------------------------


class DiagonalCovariance:
    """Σ = diag(1/h): the covariance of a diagonal Laplace approximation.

    Methods ``matvec``, ``matmat``, ``dense``, ``diagonal`` and ``sqrt_matmat`` (S Z with
    S Sᵀ = Σ).
    """

    def __init__(self, precision_diag: Tensor) -> None:
        self.precision_diag = precision_diag

    def diagonal(self) -> Tensor:
        return 1.0 / self.precision_diag

    def matvec(self, v: Tensor) -> Tensor:
        return v / self.precision_diag

    def matmat(self, M: Tensor) -> Tensor:
        return M / self.precision_diag[:, None]

    def dense(self) -> Tensor:
        return torch.diag(1.0 / self.precision_diag)

    def sqrt_matmat(self, Z: Tensor) -> Tensor:
        return Z / self.precision_diag.sqrt()[:, None]

    def __repr__(self) -> str:
        return f"DiagonalCovariance(dim={self.precision_diag.shape[0]})"


class LowRankCovariance:
    r"""Σ = λ₀⁻¹ G⁻¹ + U diag(1/λ − 1/λ₀) Uᵀ: the inverse of λ₀G + Σ_i (λ_i − λ₀) G u_i u_iᵀ G.

    ``U`` holds the top-k generalized eigenvectors of Hess u = λ G u, G-orthonormal
    (UᵀGU = I), so the precision agrees with Hess on span(U) and is λ₀ G on its
    G-orthogonal complement. All of it transforms as a (2,0) tensor.
    """

    def __init__(self, U: Tensor, eigenvalues: Tensor, floor: float, metric: Metric,
                 point: Tensor) -> None:
        self.U, self.eigenvalues, self.floor = U, eigenvalues, float(floor)
        self.metric, self.point = metric, point

    def matvec(self, v: Tensor) -> Tensor:
        coef = (1.0 / self.eigenvalues - 1.0 / self.floor) * (self.U.T @ v)
        return self.metric.solve(self.point, v) / self.floor + self.U @ coef

    def matmat(self, M: Tensor) -> Tensor:
        return torch.stack([self.matvec(c) for c in M.T], 1)

    def dense(self) -> Tensor:
        d = self.point.shape[0]
        return self.matmat(torch.eye(d, dtype=self.point.dtype, device=self.point.device))

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.dense())

    def sqrt_matmat(self, Z: Tensor) -> Tensor:
        # a ~ N(0, G⁻¹); x = λ₀^{-1/2}(I − U UᵀG) a + U diag(λ^{-1/2}) UᵀG a has covariance Σ
        A = self.metric.inv_sqrt(self.point, Z)
        GA = torch.stack([self.metric.matvec(self.point, c) for c in A.T], 1)
        c = self.U.T @ GA
        return (A - self.U @ c) / math.sqrt(self.floor) + self.U @ (
            c / self.eigenvalues.sqrt()[:, None])

    def __repr__(self) -> str:
        return f"LowRankCovariance(dim={self.point.shape[0]}, rank={self.U.shape[1]})"


def _cov_matmat(cov: Tensor | Any, M: Tensor) -> Tensor:
    return cov @ M if isinstance(cov, Tensor) else cov.matmat(M)


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


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
        Σ: a dense tensor (full), :class:`DiagonalCovariance` or :class:`LowRankCovariance`
        (each with ``.dense()``). A (2,0) tensor: Σ_Ψ = J⁻¹ Σ_Θ J⁻ᵀ (exactly so for the
        invariant full approximation).
    log_joint : float
        log p(D, p*) (classic) or log q(D, p*) = log p − ½ log det G (invariant).
    logdet_precision : float
        log det Hess (classic) or log det(G⁻¹ Hess) (invariant), as used in the evidence.
    riemannian, hessian, structure : bool, str, str
    dim : int
    info : dict
        Diagnostics: the objective's gradient norm at p* (0 at an exact mode), eigenvalue
        range, Lanczos convergence, the log det G method.
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
    _sqrt: Callable[[Tensor], Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    info: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------------- sampling
    def sample(self, n: int, seed: int = 0, *, retraction: str = "linear") -> Tensor:
        """n draws from the approximation, shape (n, d), in the space's chart.

        Tangent vectors v ~ N(0, Σ) are drawn with a CPU generator seeded by ``seed``.
        ``retraction="linear"`` returns p* + v (the chart's straight line);
        ``retraction="exp"`` follows the geodesic of the space's metric, exp_{p*}(v), which is
        chart-independent (with a pulled-back Euclidean metric the samples in every chart
        map to the same θ-distribution exactly); it integrates one ODE per draw.
        """
        if retraction not in ("linear", "exp"):
            raise ValueError(f"sample: retraction must be 'linear' or 'exp', got {retraction!r}")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        Z = torch.randn(self.dim, int(n), generator=gen, dtype=torch.float64).to(self.point)
        V = self._sqrt(Z).T
        if retraction == "linear" or self.space.metric.is_constant:
            return self.point[None, :] + V
        return torch.stack([self.space.exp(self.point, v) for v in V])

    # ---------------------------------------------------------------------- predictives
    def _model(self, what: str) -> _Bayes:
        return _require_bayes(self.space, what)

    def predictive(
        self,
        X: Tensor,
        *,
        method: str = "glm",
        n_samples: int = 100,
        seed: int = 0,
        link: str = "probit",
        retraction: str = "linear",
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Posterior predictive at inputs X (spaces from :func:`posterior_space`).

        ``method="mc"``: average the likelihood over ``n_samples`` parameter draws
        (:meth:`sample`, mapped to θ). ``method="glm"``: linearize the network around p*,
        f(x; p) ≈ f(x; p*) + J(x)(p − p*), so f ~ N(f*, J Σ Jᵀ). J Σ Jᵀ is chart-independent
        for the invariant full approximation (J_Ψ = J_Θ J_h, Σ_Ψ = J_h⁻¹ Σ_Θ J_h⁻ᵀ).
        Classification then uses the probit approximation softmax(f*/√(1 + π/8 · diag Σ_f))
        (``link="probit"``) or ``n_samples`` Gaussian logit draws (``link="mc"``).

        Returns
        -------
        Tensor or (Tensor, Tensor)
            Class probabilities (n, C) for classification; the predictive mean and variance
            (the latter including σ²) for regression.
        """
        bayes = self._model("predictive")
        out_fn = _outputs_fn(self.space, bayes)
        if method == "mc":
            P = self.sample(n_samples, seed, retraction=retraction)
            with torch.no_grad():
                F = torch.stack([out_fn(q, X) for q in P])
            if bayes.likelihood == "classification":
                return torch.softmax(F, -1).mean(0)
            return F.mean(0), F.var(0, unbiased=False) + bayes.sigma_noise**2
        if method != "glm":
            raise ValueError(f"predictive: method must be 'glm' or 'mc', got {method!r}")
        p = self.point
        f = out_fn(p, X).detach()
        n = f.shape[0]
        f2 = f.reshape(n, -1)
        C = f2.shape[1]
        J = jacrev(lambda q: out_fn(q, X).reshape(n, -1))(p).detach()  # (n, C, d)
        SJt = _cov_matmat(self.covariance, J.reshape(n * C, -1).T)     # (d, nC)
        Sf = torch.einsum("ncd,dnk->nck", J, SJt.reshape(-1, n, C))
        Sf = 0.5 * (Sf + Sf.transpose(1, 2))
        var = torch.diagonal(Sf, dim1=1, dim2=2)
        if bayes.likelihood == "regression":
            return f, (var + bayes.sigma_noise**2).reshape(f.shape)
        if link == "probit":
            return torch.softmax(f2 / torch.sqrt(1 + math.pi / 8 * var), -1)
        if link != "mc":
            raise ValueError(f"predictive: link must be 'probit' or 'mc', got {link!r}")
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        Lf = torch.linalg.cholesky(Sf + 1e-10 * (1 + var.max()) * eye)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        Z = torch.randn(n_samples, n, C, generator=gen, dtype=torch.float64).to(f)
        logits = f2[None] + torch.einsum("nck,snk->snc", Lf, Z)
        return torch.softmax(logits, -1).mean(0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "log_evidence": self.log_evidence, "log_joint": self.log_joint,
            "logdet_precision": self.logdet_precision, "riemannian": self.riemannian,
            "hessian": self.hessian, "structure": self.structure, "dim": self.dim,
            "info": {k: v for k, v in self.info.items() if isinstance(v, int | float | str | bool)},
        }


# --------------------------------------------------------------------------------------------
# laplace()
# --------------------------------------------------------------------------------------------


def _check_structure(structure: str, hessian: str) -> None:
    if structure == "kron":
        raise UnsupportedStructureError(
            "laplace: structure='kron' (KFAC) is not implemented in covariant. Supported "
            f"structures: {STRUCTURES}. For networks use 'diag' or 'lowrank' (matrix-free), "
            "or 'full' up to d = FULL_MAX_DIM."
        )
    if structure not in STRUCTURES:
        raise ValueError(
            f"laplace: unknown structure {structure!r}; supported structures are {STRUCTURES}"
        )
    if hessian not in HESSIANS:
        raise ValueError(f"laplace: hessian must be one of {HESSIANS}, got {hessian!r}")


def laplace(
    space: ParameterSpace,
    p_map: Tensor,
    riemannian: bool = True,
    hessian: str = "exact",
    structure: str = "full",
    prior_precision: float | Tensor | None = None,
    *,
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
        A density space holding the log joint log p(D, ·) in its chart
        (``ParameterSpace.from_log_prob``, :func:`posterior_space`, and their
        ``reparametrize``).
    p_map : Tensor
        The expansion point: the MAP (classic) or the Riemannian MAP (invariant); see
        :func:`covariant.density.map_estimate`. ``info["grad_norm"]`` reports how far from
        stationary it is.
    riemannian : bool
        The invariant approximation (True) or the classic one (False); module docstring.
    hessian : {"exact", "ggn"}
        The exact Hessian, or the generalized Gauss-Newton matrix Σ_n J_nᵀ H_ℓ J_n for the
        likelihood term (spaces from :func:`posterior_space`) plus the exact Hessian of the
        rest (prior, Jacobian terms, ½ log det G). The GGN is computed in the space's chart, so
        it is the pullback of the θ-GGN: a tensor.
    structure : {"full", "diag", "lowrank"}
        "full": dense, d <= :data:`FULL_MAX_DIM` (raise with ``max_dim``), else
        :class:`~covariant.errors.DenseTooLargeError`. "diag": the diagonal of the Hessian/GGN
        (exact GGN diagonal from per-sample Jacobians; the exact-Hessian diagonal costs d
        Hessian-vector products); log det(G⁻¹B) = Σ log B_ii − log det G (an approximation
        that is invariant only under elementwise charts). "lowrank": the top ``rank``
        generalized eigenpairs (λ_i, u_i) of Hess u = λ G u by Lanczos, and λ₀G elsewhere:
        log det(G⁻¹Hess) ≈ Σ log λ_i + (d − k) log λ₀. λ₀ is ``lowrank_floor``, else the prior
        precision (model posteriors), else the mean of the remaining eigenvalues from a
        Hutchinson estimate of tr(G⁻¹Hess). Built from a tensor pair (G, Hess), it is
        invariant. "kron" raises :class:`UnsupportedStructureError`.
    prior_precision : float or Tensor, optional
        For model posteriors: evaluate with this prior N(0, λ⁻¹I) on θ instead of the space's
        (:func:`with_prior_precision`), at the given ``p_map`` (post hoc).
    rank : int
        k for "lowrank".
    logdet_method : str
        How log det G enters the invariant version (:func:`covariant.density.logdet`); it
        must be twice differentiable ("closed" or "dense").
    max_dim : int, optional
        Override :data:`FULL_MAX_DIM`.
    seed : int
        Seed of the Lanczos start vector and trace probes.

    Returns
    -------
    LaplaceResult

    Raises
    ------
    DenseTooLargeError
        "full" beyond the size limit.
    UnsupportedStructureError
        "kron".
    NotAModeError
        The (structured) precision is not positive definite at ``p_map``.
    NotABijectionError
        A degenerate metric (a submersion chart): Laplace there is not defined; compute the
        invariant evidence in any bijective chart, it is the same number.
    """
    _check_structure(structure, hessian)
    if not getattr(space, "is_density", False):
        raise ValueError(
            "laplace: needs a density space holding the log joint "
            "(ParameterSpace.from_log_prob(log_joint) or laplace.posterior_space(...))"
        )
    if prior_precision is not None:
        space = with_prior_precision(space, prior_precision)
    space._check(p_map, "laplace")
    p = p_map.detach()
    d = p.shape[0]
    limit = max_dim or FULL_MAX_DIM
    if structure == "full" and d > limit:
        raise DenseTooLargeError(
            f"laplace: structure='full' needs a dense {d}×{d} precision; the limit is "
            f"d = {limit} (FULL_MAX_DIM; pass max_dim=... if the memory and the O(d³) time "
            "are there). Use structure='diag' or 'lowrank'."
        )
    metric = space.metric
    if riemannian and metric.is_degenerate(p):
        raise NotABijectionError(
            "laplace: the metric is degenerate here (a submersion chart such as weight norm): "
            "a Gaussian in ψ would spread along the gauge directions, which carry no "
            "information. The invariant evidence is the same in every bijective chart: compute "
            "it there (e.g. in the original coordinates)."
        )
    bayes = _require_bayes(space, "hessian='ggn'") if hessian == "ggn" else _bayes_of(space)
    fn = _objective(space, riemannian, logdet_method, p)
    g_metric = metric if riemannian else None
    info: dict[str, Any] = {"grad_norm": float(func_grad(fn)(p).norm())}
    value = float(fn(p))
    log_joint = -value
    logdet_G = float(fn(p) - space._loss(p)) * 2 if riemannian else 0.0
    if riemannian:
        info["logdet_metric"] = logdet_G

    if hessian == "ggn":
        assert bayes is not None
        nll_root = bayes.nll
        to_root = _to_root_fn(space)

        def rest(q: Tensor) -> Tensor:
            return fn(q) - nll_root(to_root(q))

    sqrt_fn: Callable[[Tensor], Tensor]
    precision: Tensor | None = None
    if structure == "full":
        if hessian == "exact":
            H = _hessian_dense(fn, p, g_metric)
        else:
            H = _ggn_dense(space, bayes, p) + _hessian_dense(rest, p, g_metric)
        L, infoc = torch.linalg.cholesky_ex(H)
        if int(infoc) != 0:
            ev = torch.linalg.eigvalsh(H)
            raise NotAModeError(
                f"laplace: the Hessian at p_map is not positive definite (smallest eigenvalue "
                f"{float(ev[0]):.3e}); p_map is not a local mode. Find it first with "
                f"covariant.density.map_estimate(space, p0, riemannian={riemannian})."
            )
        logdet_H = float(2 * torch.diagonal(L).log().sum())
        precision = H
        covariance: Tensor | Any = torch.cholesky_inverse(L)

        def sqrt_fn(Z: Tensor, L: Tensor = L) -> Tensor:
            return torch.linalg.solve_triangular(L.T, Z, upper=True)

        logdet_prec = logdet_H - logdet_G
    elif structure == "diag":
        if hessian == "exact":
            hd = _hessian_diag(fn, p, g_metric)
        else:
            hd = _ggn_diag(space, bayes, p) + _hessian_diag(rest, p, g_metric)
        if not bool((hd > 0).all()):
            raise NotAModeError(
                f"laplace: {int((hd <= 0).sum())} diagonal Hessian entries are <= 0 at p_map; "
                "it is not a mode (or the diagonal approximation fails there)."
            )
        cov = DiagonalCovariance(hd)
        covariance, sqrt_fn = cov, cov.sqrt_matmat
        logdet_prec = float(hd.log().sum()) - logdet_G
    else:  # lowrank
        from .linalg import hutchinson, lanczos

        if hessian == "exact":
            hv = _hvp(fn, p, g_metric)
        else:
            gv, rv = _ggn_matvec(space, bayes, p), _hvp(rest, p, g_metric)

            def hv(v: Tensor) -> Tensor:
                return gv(v) + rv(v)

        k = min(int(rank), d)
        if riemannian:
            res = lanczos(lambda v: metric.solve(p, hv(v)), d, k,
                          inner_matvec=lambda v: metric.matvec(p, v), seed=seed,
                          dtype=p.dtype, device=p.device)
        else:
            res = lanczos(hv, d, k, seed=seed, dtype=p.dtype, device=p.device)
        lam, U = res.eigenvalues, res.eigenvectors
        info["lanczos_converged"] = bool(res.converged)
        if float(lam.min()) <= 0:
            raise NotAModeError(
                f"laplace: a top eigenvalue of the Hessian is {float(lam.min()):.3e} <= 0; "
                "p_map is not a mode."
            )
        if lowrank_floor is not None:
            floor = float(lowrank_floor)
        elif bayes is not None and torch.as_tensor(_prior_of(space)).ndim == 0:
            floor = float(_prior_of(space))
        elif k == d:
            floor = float(lam.min())
        else:
            E = (lambda v: metric.solve(p, hv(v))) if riemannian else hv
            tr = hutchinson(E, d, num_probes=64, seed=seed, dtype=p.dtype, device=p.device).value
            floor = (tr - float(lam.sum())) / (d - k)
            if floor <= 0:
                raise NotAModeError(
                    "laplace: the estimated mean of the remaining eigenvalues is <= 0; pass "
                    "lowrank_floor=... (e.g. the prior precision) or raise rank."
                )
        info["lowrank_floor"] = floor
        cov = LowRankCovariance(U, lam, floor, metric if riemannian else Euclidean(), p)
        covariance, sqrt_fn = cov, cov.sqrt_matmat
        logdet_prec = float(lam.log().sum()) + (d - k) * math.log(floor)

    log_evidence = log_joint + 0.5 * d * _LOG_2PI - 0.5 * logdet_prec
    return LaplaceResult(
        log_evidence=float(log_evidence), point=p, precision=precision, covariance=covariance,
        log_joint=log_joint, logdet_precision=float(logdet_prec), riemannian=riemannian,
        hessian=hessian, structure=structure, dim=d, space=space, _sqrt=sqrt_fn, info=info,
    )


# --------------------------------------------------------------------------------------------
# Prior precision by evidence maximization
# --------------------------------------------------------------------------------------------


@dataclass
class PriorPrecisionResult:
    """Result of :func:`optimize_prior_precision`.

    Attributes
    ----------
    prior_precision : float
        The λ with the largest Laplace evidence.
    log_evidence : float
        That evidence.
    grid, log_evidences : list of float
        The evidence curve over the grid.
    point : Tensor
        The mode at the chosen λ (refit) or the fixed point (posthoc).
    method : str
    riemannian : bool
    interior : bool
        Whether the best grid point has finite neighbours on both sides. False means the
        maximum sits at the end of the grid, or next to a λ where the precision is not
        positive definite (evidence −inf), where the Laplace evidence diverges as
        −½ log det → +∞: then the chosen λ is not a genuine optimum.
    """

    prior_precision: float
    log_evidence: float
    grid: list[float]
    log_evidences: list[float]
    point: Tensor
    method: str
    riemannian: bool
    interior: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "prior_precision": self.prior_precision, "log_evidence": self.log_evidence,
            "grid": self.grid, "log_evidences": self.log_evidences, "method": self.method,
            "riemannian": self.riemannian, "interior": self.interior,
        }


def optimize_prior_precision(
    space: ParameterSpace,
    p0: Tensor,
    *,
    riemannian: bool = True,
    method: str = "refit",
    grid: Sequence[float] | None = None,
    refine: bool = True,
    map_method: str = "newton",
    map_kwargs: dict[str, Any] | None = None,
    xatol: float = 1e-3,
    progress: bool = False,
    **laplace_kwargs: Any,
) -> PriorPrecisionResult:
    r"""Choose the prior precision λ of a model posterior by maximizing the Laplace evidence.

    ``method="refit"`` (type-II maximum likelihood): for every λ the mode is recomputed
    (:func:`covariant.density.map_estimate`) and the evidence evaluated there. The grid is
    walked outwards from the space's current λ, each refit warm-started at the mode of the
    nearest λ already done, starting from ``p0`` (a mode at the current λ): a continuation,
    so that every chart follows the same branch of modes of a multimodal posterior.
    ``method="posthoc"`` keeps ``p0`` fixed and varies only λ, as
    laplace-torch does after training.

    The evidence curve is evaluated on ``grid`` (default 10^-3 … 10^3, 25 points); with
    ``refine`` the best grid cell is refined by a bounded scalar search in log λ (to
    ``xatol``).

    The classic evidence is a different function of λ in every chart (the MAP moves and the
    Hessian is not a tensor), so it can choose a different λ in a different chart. The
    invariant evidence is the same function in every chart, hence the same λ.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(30, 1, generator=g, dtype=torch.float64)
    >>> y = 2 * X + 0.3 * torch.randn(30, 1, generator=g, dtype=torch.float64)
    >>> model = nn.Linear(1, 1, bias=False).double()
    >>> space, theta = posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.3)
    >>> res = optimize_prior_precision(space, theta, riemannian=False, grid=[0.01, 0.1, 1.0])
    >>> 0.01 <= res.prior_precision <= 1.0
    True
    """
    import numpy as np

    if method not in ("refit", "posthoc"):
        raise ValueError(f"optimize_prior_precision: method must be 'refit' or 'posthoc', got "
                         f"{method!r}")
    _require_bayes(space, "optimize_prior_precision")
    grid_ = sorted(float(x) for x in (np.logspace(-3, 3, 25) if grid is None else grid))
    if not grid_ or min(grid_) <= 0:
        raise ValueError("optimize_prior_precision: the grid must hold positive precisions")
    mk = dict(map_kwargs or {})
    cache: dict[float, tuple[float, Tensor]] = {}
    lam_now = _prior_of(space)
    log0 = math.log(float(lam_now)) if torch.as_tensor(lam_now).ndim == 0 else 0.0

    def start_for(lam: float) -> Tensor:
        """Warm start: the mode at the nearest λ already done (continuation from ``p0``)."""
        if not cache:
            return p0.detach().clone()
        near = min(cache, key=lambda k: abs(math.log(k) - math.log(lam)))
        return cache[near][1]

    def evaluate(lam: float) -> tuple[float, Tensor]:
        if lam in cache:
            return cache[lam]
        s = with_prior_precision(space, lam)
        if method == "refit":
            point = map_estimate(s, start_for(lam), riemannian=riemannian, method=map_method,
                                 **mk).point
        else:
            point = p0.detach()
        try:
            ev = laplace(s, point, riemannian=riemannian, **laplace_kwargs).log_evidence
        except NotAModeError:
            ev = -math.inf
        cache[lam] = (ev, point)
        return cache[lam]

    from ._progress import progress_bar

    # walk the grid outwards from the space's own λ, so that every refit starts at a neighbour
    order = sorted(grid_, key=lambda lam: abs(math.log(lam) - log0))
    for lam in progress_bar(order, enabled=progress, desc="prior grid"):
        evaluate(lam)
    evs = [cache[lam][0] for lam in grid_]
    i = int(np.argmax(evs))
    best_lam, best_ev = grid_[i], evs[i]
    interior = 0 < i < len(grid_) - 1 and all(math.isfinite(evs[j]) for j in (i - 1, i + 1))
    if refine and len(grid_) >= 3:
        from scipy.optimize import minimize_scalar

        lo = math.log(grid_[max(i - 1, 0)])
        hi = math.log(grid_[min(i + 1, len(grid_) - 1)])

        def obj(t: float) -> float:
            v = evaluate(float(math.exp(t)))[0]
            return -v if math.isfinite(v) else 1e300

        r = minimize_scalar(obj, bounds=(lo, hi), method="bounded", options={"xatol": xatol})
        if -float(r.fun) > best_ev:
            best_lam, best_ev = float(math.exp(r.x)), -float(r.fun)
    point = cache[best_lam][1] if best_lam in cache else evaluate(best_lam)[1]
    return PriorPrecisionResult(
        float(best_lam), float(best_ev), grid_, [float(e) for e in evs], point, method,
        riemannian, interior,
    )
