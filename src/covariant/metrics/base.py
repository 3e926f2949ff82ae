r"""Riemannian metrics as explicit objects.

A :class:`Metric` is a field of symmetric positive-definite matrices G(p) on one chart. It is
used only through products, so nothing d×d is built unless ``dense`` is asked for:

- ``matvec(p, v) = G(p) v`` (differentiable in p: connection terms differentiate it);
- ``solve(p, w) = G(p)⁻¹ w`` (the pseudo-inverse on the horizontal space for a submersion);
- ``inner(p, u, v) = uᵀ G(p) v`` and ``logdet(p) = log det G(p)``.

Under a chart θ = h(ψ) a metric transforms as a (0, 2) tensor, G_Ψ = Jᵀ G_Θ J: that is
:class:`Pullback`, and the one place where this rule lives. :class:`Damped` adds λ·G_ref,
which stays invariant when the reference is pulled back with it (docs/math.md §5).

Example
-------
>>> import torch
>>> from covariant.metrics import Diagonal
>>> G = Diagonal(torch.tensor([1.0, 4.0], dtype=torch.float64))
>>> p = torch.zeros(2, dtype=torch.float64)
>>> G.solve(p, torch.tensor([1.0, 4.0], dtype=torch.float64))
tensor([1., 1.], dtype=torch.float64)
>>> float(G.logdet(p))  # log 4
1.3862943611198906
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .._checks import same_point
from .._fast import is_plain
from ..errors import (
    DenseTooLargeError,
    NotConvergedError,
    ShapeMismatchError,
    SingularMetricError,
)
from ..linalg import cg
from ..linalg.woodbury import DampedGramFactor
from ..reparam import Linearization, Reparametrization
from .forms import ConnectionForm
from .nystrom import NystromCache

__all__ = [
    "DENSE_SOLVE_DIM",
    "MAX_DENSE_DIM",
    "SINGULAR_HINT",
    "ConnectionForm",
    "Constant",
    "Damped",
    "Euclidean",
    "Metric",
    "Pullback",
    "check_dense_size",
    "cholesky_or_raise",
    "dense_pinv",
    "dense_solve",
]

#: Largest dimension for which dense matrices are built unless ``max_dim`` says otherwise.
MAX_DENSE_DIM = 4096

#: Up to this dimension the generic :meth:`Metric.solve` factors the dense G(p) once per
#: point instead of running conjugate gradients for every right-hand side.
DENSE_SOLVE_DIM = 2048

SINGULAR_HINT = (
    "Either damp it in a way that keeps invariance, "
    "covariant.metrics.Damped(G, lam, reference=<a correctly transformed metric>), "
    "or, for a submersion chart such as weight norm, use the pulled-back metric, whose "
    "solve is the pseudo-inverse on the horizontal space (docs/math.md §5)."
)


def check_dense_size(dim: int, what: str, max_dim: int | None = None) -> None:
    """Raise :class:`DenseTooLargeError` if a dense ``dim × dim`` request is too large."""
    limit = MAX_DENSE_DIM if max_dim is None else max_dim
    if dim > limit:
        raise DenseTooLargeError(
            f"{what}: a dense {dim}×{dim} matrix exceeds the limit of {limit}. Go matrix-free: "
            "use matvec / solve / space.hvp, or flatness(..., method='stochastic'); "
            "raise the limit with max_dim=... only if the memory is there."
        )


def cholesky_or_raise(G: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        raise SingularMetricError(f"{what}: the metric matrix is not positive definite. "
                                  + SINGULAR_HINT)
    return L


def dense_pinv(metric: Metric, p: Tensor, G: Tensor) -> Tensor:
    """G⁺ for the dense matrix G = G(p) of a metric of known rank: the inverse on its top-rank
    eigenspace (the horizontal space), zero on the rest."""
    rank = metric.rank(p)
    evals, evecs = torch.linalg.eigh(G)
    Q, lam = evecs[:, -rank:], evals[-rank:]
    return (Q / lam) @ Q.T


def dense_solve(metric: Metric, p: Tensor, G: Tensor, rhs: Tensor) -> Tensor:
    """G⁻¹ rhs with the dense G = G(p) (Cholesky), or G⁺ rhs for a degenerate metric; ``rhs``
    is a vector or a matrix of columns."""
    if metric.is_degenerate(p):
        return dense_pinv(metric, p, G) @ rhs
    L = cholesky_or_raise(G, "dense metric solve")
    return torch.cholesky_solve(rhs.reshape(G.shape[0], -1), L).reshape(rhs.shape)


class Metric:
    """Base class: a field p ↦ G(p) of SPD matrices, used matrix-free.

    Subclasses implement :meth:`matvec`; the defaults build the rest from it (``solve`` by
    conjugate gradients, ``dense`` by products with the identity, ``logdet`` from ``dense``).

    Attributes
    ----------
    is_constant : bool
        True if G does not depend on p; then all Christoffel symbols vanish.
    """

    is_constant: bool = False
    #: True only for G = I, whose pullbacks may use a chart's fused JᵀJ and J⁺J⁺ᵀ products.
    is_identity: bool = False

    def shard_parts(self) -> tuple[Metric | None, Any] | None:
        """How G splits over the ranks of a data-parallel space: ``(G_r, shard)`` when
        G(p) = Σ_r G_r(p) + C with C constant in p (``G_r`` a metric of this rank's data
        alone, summed by ``shard.reduce``); ``(None, None)`` for a constant G; None when G
        has no such split (then every product of G is reduced by itself). The connection
        terms are linear in G, so a data-parallel Riemannian HVP can sum its local parts
        with one all-reduce (``ParameterSpace.hvp_operator``)."""
        return (None, None) if self.is_constant else None

    @property
    def has_own_solve(self) -> bool:
        """True when ``solve`` is the metric's own (a closed form or a specialised solver),
        False when it is the generic conjugate gradients of this base class."""
        return type(self).solve is not Metric.solve

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        """G(p) v."""
        raise NotImplementedError

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        """G(p)⁻¹ w.

        Up to :data:`DENSE_SOLVE_DIM` coordinates (at a plain point), from the Cholesky factor
        of the dense G(p): d products once, kept for every later solve at the same point (an
        estimator solves hundreds of times at one point). Above that, by the Woodbury identity
        where the metric has a :meth:`sample_space_factor`; else, or when G(p) is not
        positive definite, by conjugate gradients (matrix-free). The factor is keyed on the
        point's values, so a metric whose products depend on anything else must override
        ``solve``.
        """
        L = self._dense_factor(p)
        if L is not None:
            return torch.cholesky_solve(w.reshape(L.shape[0], -1).to(L), L).reshape(
                w.shape).to(w.dtype)
        woodbury = self.sample_space_factor(p)
        if woodbury is not None:
            return woodbury.solve(w)
        try:
            return cg(lambda x: self.matvec(p, x), w, maxiter=10 * w.shape[0],
                      preconditioner=self.cg_preconditioner(p)).x
        except NotConvergedError as err:
            raise SingularMetricError(
                f"{type(self).__name__}.solve: conjugate gradients did not converge ({err}); "
                "the metric is singular or badly conditioned. " + SINGULAR_HINT
            ) from err

    def cg_preconditioner(self, p: Tensor) -> Callable[[Tensor], Tensor] | None:
        """``r ↦ M⁻¹ r`` for the CG of :meth:`solve` at ``p`` (None: plain CG, the default)."""
        return None

    def cholesky_factor(self, p: Tensor) -> Tensor | None:
        """The lower Cholesky factor L of G(p) = L Lᵀ that :meth:`solve` uses, or None when
        ``solve`` uses none (a metric with its own solve, d > :data:`DENSE_SOLVE_DIM`, a point
        inside a transform, or a G(p) that is not positive definite). Cached per point."""
        if self.has_own_solve:
            return None
        return self._dense_factor(p)

    def sample_space(self, p: Tensor) -> Any | None:
        """B with G(p) = BᵀB, B given by its products and Gram matrix in sample space
        (:class:`~covariant.metrics.sample_space.LinearSampleSpace`), or None (the default:
        the metric knows no such form)."""
        return None

    def sample_space_factor(self, p: Tensor) -> DampedGramFactor | None:
        """The Woodbury factor of G(p) = λI + BᵀB (:mod:`covariant.linalg.woodbury`) that
        :meth:`solve` uses above the dense size, or None (the default)."""
        return None

    def dense_solve_dim(self, p: Tensor) -> int:
        """Up to this dimension :meth:`solve` factors the dense G(p) once per point
        (:data:`DENSE_SOLVE_DIM`; a metric whose dense matrix is cheap to build may say more)."""
        return DENSE_SOLVE_DIM

    def _dense_factor(self, p: Tensor) -> Tensor | None:
        """Cholesky factor of the dense G(p) for small d at a plain point (cached), else None."""
        d = p.shape[0]
        if not is_plain(p) or d > self.dense_solve_dim(p):
            return None
        cache = self.__dict__.get("_factor_cache")
        if cache is not None and same_point(cache[0], p):
            return cache[1]
        G = self.dense(p, max_dim=d)
        L, info = torch.linalg.cholesky_ex(0.5 * (G + G.T))
        factor = L if int(info) == 0 else None  # not PD: conjugate gradients decide
        self._factor_cache = (p.clone(), factor)
        return factor

    def inner(self, p: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """⟨u, v⟩_G = uᵀ G(p) v."""
        return torch.dot(u, self.matvec(p, v))

    def connection_form(self, p: Tensor, r: Tensor) -> ConnectionForm:
        """u ↦ rᵀ G Γ(u, u) at p: by default D_u(rᵀGu) − ½ D_r(uᵀGu), two directional
        derivatives of :meth:`inner` (forward mode), and no potential."""
        p, r = p.detach(), r.detach()

        def remainder(u: Tensor) -> Tensor:
            if self.is_constant:
                return p.new_zeros(())
            d1 = jvp(lambda q: self.inner(q, r, u), (p,), (u,))[1]
            d2 = jvp(lambda q: self.inner(q, u, u), (p,), (r,))[1]
            return d1 - 0.5 * d2

        return ConnectionForm(None, remainder)

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        """G(p) as a dense (d, d) matrix (small d only)."""
        check_dense_size(p.shape[0], f"{type(self).__name__}.dense", max_dim)
        eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        return vmap(lambda e: self.matvec(p, e))(eye)  # rows G e_i = columns (G symmetric)

    def logdet(self, p: Tensor) -> Tensor:
        """log det G(p) (dense Cholesky by default)."""
        L = cholesky_or_raise(self.dense(p), f"{type(self).__name__}.logdet")
        return 2 * torch.diagonal(L).log().sum()

    def rank(self, p: Tensor) -> int:
        """Rank of G(p): the dimension of the horizontal space (d for a nondegenerate metric)."""
        return p.shape[0]

    def is_degenerate(self, p: Tensor) -> bool:
        """True when G(p) is singular (rank < d), e.g. pulled back through a submersion."""
        return self.rank(p) < p.shape[0]

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        """log det G(p) without a d×d matrix, or None when no closed form is known.

        With ``pseudo=True`` a degenerate metric may return its pseudo-log-determinant (the
        log-product of the nonzero eigenvalues). The default knows no closed form.
        """
        return None

    def inv_sqrt(self, p: Tensor, Z: Tensor) -> Tensor:
        """S Z with S Sᵀ = G(p)⁻¹, for the columns of Z (d, n): turns N(0, I) draws into
        N(0, G⁻¹) draws. The default solves with the dense Cholesky factor, S = L⁻ᵀ."""
        L = torch.linalg.cholesky(self.dense(p))
        return torch.linalg.solve_triangular(L.T, Z, upper=True)

    def kernel_basis(self, p: Tensor) -> Tensor | None:
        """Orthonormal basis (d, d − rank) of ker G(p) where the metric knows it, else None.

        A metric pulled back through a submersion knows its kernel: the chart's gauge
        directions. The default knows none.
        """
        return None

    def pullback(self, reparam: Reparametrization) -> Metric:
        """This metric in the chart ψ with θ = h(ψ): Jᵀ G J."""
        return Pullback(self, reparam)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euclidean(Metric):
    """G = I: the metric everybody uses without saying so."""

    is_constant = True
    is_identity = True

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return v

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        return w

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        check_dense_size(p.shape[0], "Euclidean.dense", max_dim)
        return torch.eye(p.shape[0], dtype=p.dtype, device=p.device)

    def logdet(self, p: Tensor) -> Tensor:
        return p.new_zeros(())

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        return self.logdet(p)

    def inv_sqrt(self, p: Tensor, Z: Tensor) -> Tensor:
        return Z


class Constant(Metric):
    """A constant SPD matrix G.

    Parameters
    ----------
    matrix : Tensor, shape (d, d)
        Symmetric positive definite; checked by a Cholesky factorization. A point or vector
        of another length raises :class:`~covariant.errors.ShapeMismatchError`.
    """

    is_constant = True

    def __init__(self, matrix: Tensor) -> None:
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ShapeMismatchError(f"Constant: matrix must be (d, d), got {tuple(matrix.shape)}")
        if not torch.allclose(matrix, matrix.T, rtol=1e-10, atol=1e-12):
            raise ShapeMismatchError("Constant: matrix must be symmetric")
        self.matrix = matrix
        self._chol = cholesky_or_raise(matrix, "Constant")

    def _check_size(self, x: Tensor, what: str) -> None:
        """A :class:`ShapeMismatchError` naming both sizes unless ``x`` has d entries."""
        n = self.matrix.shape[0]
        if x.ndim != 1 or x.shape[0] != n:
            raise ShapeMismatchError(
                f"Constant.{what}: the metric is {n} × {n}, but the point or vector has shape "
                f"{tuple(x.shape)}; build Constant with a matrix of the space's dimension"
            )

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        self._check_size(v, "matvec")
        return self.matrix.to(v) @ v

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        self._check_size(w, "solve")
        return torch.cholesky_solve(w[:, None], self._chol.to(w))[:, 0]

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        self._check_size(p, "dense")
        return self.matrix.to(p).clone()

    def logdet(self, p: Tensor) -> Tensor:
        self._check_size(p, "logdet")
        return 2 * torch.diagonal(self._chol.to(p)).log().sum()

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        return self.logdet(p)


class Damped(Metric):
    r"""G + λ·G_ref.

    With ``reference=None`` the reference is the identity *of the chart it was built in*,
    G + λI. That breaks invariance: λI is not a tensor. When the space is reparametrized,
    a ``Damped`` metric pulls back *both* parts, Jᵀ(G + λ G_ref)J = JᵀGJ + λ JᵀG_ref J, so
    the damping stays the same geometric object in every chart (docs/math.md §5).

    Parameters
    ----------
    metric : Metric
    lam : float
        Damping strength, >= 0.
    reference : Metric, optional
        The reference metric; Euclidean in the current chart by default.
    nystrom_rank : int, optional
        Precondition the CG of ``solve`` (d > :meth:`dense_solve_dim`, identity reference,
        λ > 0, plain point) by a rank-ℓ Nyström approximation of G, built once per point
        (:mod:`covariant.metrics.nystrom`). None (default): plain CG.
    nystrom_samples : int, optional
        Build that approximation from G on this many samples of its data (cheaper).
    sample_space : bool
        Above :meth:`dense_solve_dim`, solve exactly in sample space where G = BᵀB there
        (identity reference, λ > 0, no ``nystrom_rank``; :meth:`sample_space_factor`,
        docs/math.md §5.1). Default True; False keeps conjugate gradients (the m × m factor
        takes 8·m² bytes and m³/3 flops, m = samples × output directions).
    """

    def __init__(self, metric: Metric, lam: float, reference: Metric | None = None, *,
                 nystrom_rank: int | None = None, nystrom_samples: int | None = None,
                 sample_space: bool = True) -> None:
        if not lam >= 0:
            raise ValueError(f"Damped: lam must be >= 0, got {lam}")
        self.metric = metric
        self.lam = float(lam)
        self.reference = Euclidean() if reference is None else reference
        self.is_constant = metric.is_constant and self.reference.is_constant
        self.nystrom = None if nystrom_rank is None else NystromCache(
            int(nystrom_rank), samples=nystrom_samples)
        self.sample_space_solves = bool(sample_space)

    def cg_preconditioner(self, p: Tensor) -> Callable[[Tensor], Tensor] | None:
        """The cached Nyström P⁻¹ of G + λI where ``nystrom_rank`` applies, else None."""
        if self.nystrom is None or not self.reference.is_identity or self.lam == 0:
            return None
        return self.nystrom.at(self.metric, p, self.lam, self.dense_solve_dim(p))

    def sample_space_factor(self, p: Tensor) -> DampedGramFactor | None:
        """λI + BᵀB factored in sample space (cached per point) when G = BᵀB there
        (``metric.sample_space``), the reference is the identity, λ > 0, d is above
        :meth:`dense_solve_dim`, and neither ``sample_space=False`` nor ``nystrom_rank`` was
        given; else None. Exact: no iteration, no tolerance."""
        if not self.sample_space_solves or self.nystrom is not None \
                or not self.reference.is_identity or self.lam == 0 or not is_plain(p) \
                or p.shape[0] <= self.dense_solve_dim(p):
            return None
        cache = self.__dict__.get("_woodbury_cache")
        if cache is not None and same_point(cache[0], p):
            return cache[1]
        factor = DampedGramFactor.of(lambda: self.metric.sample_space(p.detach()), self.lam)
        self._woodbury_cache = (p.detach().clone(), factor)
        return factor

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self.metric.matvec(p, v) + self.lam * self.reference.matvec(p, v)

    def inner(self, p: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """uᵀGv + λ uᵀG_ref v, each part by its own ``inner``."""
        return self.metric.inner(p, u, v) + self.lam * self.reference.inner(p, u, v)

    def dense_solve_dim(self, p: Tensor) -> int:
        """The base metric's, when the reference is constant (its dense matrix is cheap)."""
        return self.metric.dense_solve_dim(p) if self.reference.is_constant \
            else DENSE_SOLVE_DIM

    def shard_parts(self) -> tuple[Metric | None, Any] | None:
        """The base metric's split when λ G_ref is constant in p (``Metric.shard_parts``)."""
        if self.reference.is_constant or self.lam == 0:
            return self.metric.shard_parts()
        return None

    def connection_form(self, p: Tensor, r: Tensor) -> ConnectionForm:
        """The sum of the two parts' forms (a constant reference contributes nothing)."""
        first = self.metric.connection_form(p, r)
        if self.reference.is_constant or self.lam == 0:
            return first
        return first.plus(self.reference.connection_form(p, r), self.lam)

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        """G + λ G_ref from the two dense matrices (each part builds its own fastest way)."""
        return self.metric.dense(p, max_dim=max_dim) + self.lam * self.reference.dense(
            p, max_dim=max_dim)

    def rank(self, p: Tensor) -> int:
        if self.lam > 0:
            return self.reference.rank(p)
        return self.metric.rank(p)

    def pullback(self, reparam: Reparametrization) -> Metric:
        return Damped(self.metric.pullback(reparam), self.lam, self.reference.pullback(reparam),
                      nystrom_rank=None if self.nystrom is None else self.nystrom.rank,
                      nystrom_samples=None if self.nystrom is None else self.nystrom.samples,
                      sample_space=self.sample_space_solves)

    def __repr__(self) -> str:
        return f"Damped({self.metric!r}, {self.lam:g}, reference={self.reference!r})"


class Pullback(Metric):
    r"""The pullback G_Ψ(ψ) = J(ψ)ᵀ G_Θ(h(ψ)) J(ψ) of a metric through a chart θ = h(ψ).

    Matrix-free: ``matvec`` is a jvp of h, a product with G_Θ, and a vjp of h. ``solve`` uses
    inverse-Jacobian products, G_Ψ⁻¹ w = J⁻¹ G_Θ⁻¹ J⁻ᵀ w; for a submersion (weight norm) it is
    the pseudo-inverse on the horizontal space, G_Ψ⁺ = J⁺ G_Θ⁻¹ J⁺ᵀ (docs/math.md §5).
    ``logdet`` is log det G_Θ + 2 log|det J| for a bijection; for a submersion G_Ψ is
    singular and ``pseudo_logdet`` = log det G_Θ + log det(J Jᵀ) is the log of the product of
    its nonzero eigenvalues.

    Example
    -------
    >>> import torch
    >>> from covariant.reparam import Scale
    >>> G = Pullback(Euclidean(), Scale(3.0))
    >>> p = torch.ones(2, dtype=torch.float64)
    >>> G.matvec(p, torch.ones(2, dtype=torch.float64))   # 3 · 1 · 3
    tensor([9., 9.], dtype=torch.float64)
    """

    def __init__(self, metric: Metric, reparam: Reparametrization) -> None:
        self.base = metric
        self.reparam = reparam
        self.is_constant = metric.is_constant and reparam.is_affine

    def products(
        self, p: Tensor, lin: Linearization | None = None
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """``(v ↦ G_Ψ v, w ↦ G_Ψ⁺ w)`` at a fixed ψ, through the chart's linearization.

        The one place of the rules G_Ψ = Jᵀ G_Θ J and G_Ψ⁺ = J⁺ G_Θ⁻¹ J⁺ᵀ; pass ``lin`` to
        share the chart's per-point work with other products at the same point. For a
        Euclidean G_Θ the chart's fused products JᵀJ and J⁺J⁺ᵀ are used where it has them
        (``Linearization.gram`` / ``pinv_gram``: one pass instead of two).
        """
        lin = self.reparam.linearize(p) if lin is None else lin
        base = self.base

        def matvec(v: Tensor) -> Tensor:
            return lin.vjp(base.matvec(lin.theta, lin.jvp(v)))

        def solve(w: Tensor) -> Tensor:
            return lin.inverse_jvp(base.solve(lin.theta, lin.inverse_vjp(w)))

        if base.is_identity:  # G_Θ = I: the chart's fused JᵀJ and J⁺J⁺ᵀ, if it has them
            return lin.gram or matvec, lin.pinv_gram or solve
        return matvec, solve

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self.products(p)[0](v)

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        return self.products(p)[1](w)

    def logdet(self, p: Tensor) -> Tensor:
        if not self.reparam.is_bijection:
            raise SingularMetricError(
                "Pullback.logdet: the metric pulled back through a submersion is singular "
                "along the gauge directions, so its determinant is 0. Use pseudo_logdet(p), "
                "the log-product of the nonzero eigenvalues (docs/math.md §5)."
            )
        theta = self.reparam.forward(p)
        return self.base.logdet(theta) + 2 * self.reparam.log_abs_det_jacobian(p)

    def pseudo_logdet(self, p: Tensor) -> Tensor:
        """log of the product of the nonzero eigenvalues: log det G_Θ + log det(J Jᵀ)."""
        h = self.reparam
        if h.is_bijection:
            return self.logdet(p)
        return self.base.logdet(h.forward(p)) + h.jjt_logdet(p)

    def rank(self, p: Tensor) -> int:
        """The base metric's rank at h(ψ): J is invertible (bijection) or onto (submersion)."""
        return self.base.rank(self.reparam.forward(p))

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        """log det G_Θ(h(ψ)) + 2 log|det J| (bijection), or with ``pseudo=True`` the
        pseudo-log-determinant log det G_Θ + log det(J Jᵀ) (a submersion whose chart has a
        closed-form log det(J Jᵀ)); None when the base metric has no closed form or is
        degenerate."""
        h = self.reparam
        theta = h.forward(p)
        if self.base.is_degenerate(theta) or self.base.closed_form_logdet(theta) is None:
            return None
        if h.is_bijection:
            return self.logdet(p)
        if not h.has_closed_form_jjt_logdet:
            return None
        return self.pseudo_logdet(p) if pseudo else None

    def inv_sqrt(self, p: Tensor, Z: Tensor) -> Tensor:
        """J⁻¹ S_Θ Z through a bijection (S_Θ of the base metric at h(ψ)); dense otherwise."""
        h = self.reparam
        if not h.is_bijection:
            return super().inv_sqrt(p, Z)
        inner = self.base.inv_sqrt(h.forward(p), Z)
        return torch.stack([h.inverse_jvp(p, c) for c in inner.T], 1)

    def kernel_basis(self, p: Tensor) -> Tensor | None:
        """Orthonormal basis of the chart's gauge directions (the vertical space), or None."""
        U = self.reparam.gauge_directions(p)
        if U.shape[1] == 0:
            return None
        return torch.linalg.qr(U)[0]

    def gauge_directions(self, p: Tensor) -> Tensor:
        """Basis of the kernel of G_Ψ(ψ) that comes from the chart (the vertical space)."""
        return self.reparam.gauge_directions(p)

    def vertical_projection(self, p: Tensor, x: Tensor) -> Tensor:
        """Orthogonal projection onto ker J, the kernel of G_Ψ (zero for a bijection)."""
        return self.reparam.vertical_projection(p, x)

    def pullback(self, reparam: Reparametrization) -> Metric:
        return Pullback(self, reparam)

    def __repr__(self) -> str:
        return f"Pullback({self.base!r}, {self.reparam!r})"


