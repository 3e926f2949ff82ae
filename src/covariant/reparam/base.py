r"""The chart protocol: :class:`Reparametrization` θ = h(ψ), its :class:`Linearization` at a
point, the identity chart and :class:`Compose`.

The products every chart offers are listed in :mod:`covariant.reparam`; this module gives
their ``torch.func`` defaults (forward- and reverse-mode Jacobian products, J⁺ by the
implicit-function rule or through (J Jᵀ)⁻¹ for a submersion, docs/math.md §5) and the
per-point :class:`Linearization` that shares work across products at one point.

Example
-------
>>> import torch
>>> from covariant.reparam.base import Compose, Identity
>>> h = Compose(Identity(), Identity())
>>> psi = torch.tensor([0.5, -1.0], dtype=torch.float64)
>>> torch.equal(h(psi), psi), float(h.log_abs_det_jacobian(psi))
(True, 0.0)
>>> torch.equal(h.jacobian(psi), torch.eye(2, dtype=torch.float64))
True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import jacfwd, jvp, vjp

from .._checks import check_flat
from .._fast import is_plain as _is_plain
from .._fast import tensor_version
from ..errors import NotABijectionError, ShapeMismatchError
from ..linalg import cg

__all__ = ["Compose", "Identity", "Linearization", "Reparametrization"]


class Linearization:
    """A chart's Jacobian products at one fixed point ψ, with per-point work done once.

    Attributes ``theta`` (= h(ψ)) and the products ``jvp`` (J v), ``vjp`` (Jᵀ w),
    ``inverse_jvp`` (J⁺ u) and ``inverse_vjp`` (J⁺ᵀ z), each a function of the vector only.
    Charts with cheap closed forms also give the fused ``gram`` (v ↦ JᵀJ v) and ``pinv_gram``
    (w ↦ J⁺J⁺ᵀ w), the pulled-back Euclidean metric and its (pseudo-)inverse; ``None``
    otherwise, and :class:`~covariant.metrics.Pullback` composes the products instead.
    """

    def __init__(
        self,
        theta: Tensor,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        inverse_jvp: Callable[[Tensor], Tensor],
        inverse_vjp: Callable[[Tensor], Tensor],
        *,
        gram: Callable[[Tensor], Tensor] | None = None,
        pinv_gram: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.theta = theta
        self.jvp, self.vjp = jvp, vjp
        self.inverse_jvp, self.inverse_vjp = inverse_jvp, inverse_vjp
        self.gram, self.pinv_gram = gram, pinv_gram

    def into(self, product: str, x: Tensor, out: Tensor) -> None:
        """Write the product ``product`` ("jvp", "vjp", …) of ``x`` into ``out``.

        Block-diagonal charts use it to fill slices of one output vector; linearizations
        that can compute in place override it and skip the intermediate result.
        """
        out.copy_(getattr(self, product)(x))


# direction of each product: (input side, output side), "psi" or "theta"
_SIDES = {
    "jvp": ("psi", "theta"), "vjp": ("theta", "psi"),
    "inverse_jvp": ("theta", "psi"), "inverse_vjp": ("psi", "theta"),
    "gram": ("psi", "psi"), "pinv_gram": ("psi", "psi"),
}


class _NamedProducts(Linearization):
    """A linearization whose products all go through one ``_product(name, x)``.

    The products are methods, not closures stored on the instance, so that no reference
    cycle keeps θ alive.
    """

    def _product(self, product: str, x: Tensor) -> Tensor:
        raise NotImplementedError

    def jvp(self, v: Tensor) -> Tensor:
        return self._product("jvp", v)

    def vjp(self, w: Tensor) -> Tensor:
        return self._product("vjp", w)

    def inverse_jvp(self, u: Tensor) -> Tensor:
        return self._product("inverse_jvp", u)

    def inverse_vjp(self, z: Tensor) -> Tensor:
        return self._product("inverse_vjp", z)

    def gram(self, v: Tensor) -> Tensor:
        return self._product("gram", v)

    def pinv_gram(self, w: Tensor) -> Tensor:
        return self._product("pinv_gram", w)


class Reparametrization:
    r"""Base class of charts θ = h(ψ).

    Subclasses implement :meth:`forward` (ψ ↦ θ) and :meth:`inverse_map` (θ ↦ ψ), and may
    override the Jacobian products with closed forms. Calling the object (``h(psi)``) and
    :meth:`inverse` check the input (shape, finiteness, domain); ``forward`` and
    ``inverse_map`` do not, so that they can run inside ``torch.func`` transforms.

    Attributes
    ----------
    is_bijection : bool
        ``True`` if J is square and invertible; ``False`` for a submersion (k > d).
    is_affine : bool
        ``True`` if J does not depend on ψ (then pulled-back constant metrics stay constant).
    """

    is_bijection: bool = True
    is_affine: bool = False

    # ----- subclass interface -------------------------------------------------------------
    def forward(self, psi: Tensor) -> Tensor:
        """θ = h(ψ), without input checks."""
        raise NotImplementedError

    def inverse_map(self, theta: Tensor) -> Tensor:
        """ψ = h⁻¹(θ) (a right inverse for a submersion), without input checks."""
        raise NotImplementedError

    def check_psi(self, psi: Tensor) -> None:
        """Raise :class:`DomainError` if ψ lies outside the chart's domain."""

    def check_theta(self, theta: Tensor) -> None:
        """Raise :class:`DomainError` if θ lies outside the image of the chart."""

    # ----- shapes -------------------------------------------------------------------------
    def bind(self, shape: torch.Size | Sequence[int]) -> Reparametrization:
        """Return a copy that knows the shape of the parameter it reparametrizes.

        Elementwise charts ignore the shape; shape-aware ones (``WeightNorm``) need it.
        """
        return self

    def psi_dim(self, theta_dim: int) -> int:
        """Number of new coordinates k for d = ``theta_dim`` original ones."""
        return theta_dim

    def psi_layout(self, name: str, shape: torch.Size) -> list[tuple[str, torch.Size]]:
        """Names and shapes of the new coordinates that replace parameter ``name``."""
        return [(name, torch.Size(shape))]

    # ----- public, checked ----------------------------------------------------------------
    def __call__(self, psi: Tensor) -> Tensor:
        check_flat(psi, type(self).__name__, "psi")
        self.check_psi(psi)
        return self.forward(psi)

    def inverse(self, theta: Tensor) -> Tensor:
        """ψ with h(ψ) = θ: the inverse, or a right inverse for a submersion."""
        check_flat(theta, f"{type(self).__name__}.inverse", "theta")
        self.check_theta(theta)
        return self.inverse_map(theta)

    # ----- Jacobian products (torch.func defaults) ----------------------------------------
    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        """J(ψ) v: push a tangent vector from Ψ to Θ."""
        return jvp(self.forward, (psi,), (v,))[1]

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        """J(ψ)ᵀ w: pull a covector from Θ back to Ψ."""
        return vjp(self.forward, psi)[1](w)[0]

    def jacobian(self, psi: Tensor) -> Tensor:
        """Dense J(ψ) = ∂θ/∂ψ, shape (d, k). For small charts and tests."""
        return jacfwd(self.forward)(psi)

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        """J⁺ u: map a tangent vector at θ = h(ψ) to Ψ (J⁻¹ u for a bijection)."""
        if self.is_bijection:
            return jvp(self.inverse_map, (self.forward(psi),), (u,))[1]
        return self.vjp(psi, _solve_jjt(self, psi, u))

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        """J⁺ᵀ z: map a covector in Ψ to Θ (J⁻ᵀ z for a bijection)."""
        if self.is_bijection:
            return vjp(self.inverse_map, self.forward(psi))[1](z)[0]
        return _solve_jjt(self, psi, self.jvp(psi, z))

    def linearize(self, psi: Tensor) -> Linearization:
        """The Jacobian products at a fixed ψ, for many products that share a point.

        Charts override :meth:`_linearize` to precompute per-point quantities (e.g. weight
        norm's 1/‖v‖ and g/‖v‖). While a linearization is in use, another call at the same
        (unmodified) tensor ψ returns it again instead of repeating the work and holding a
        second θ: e.g. a pullback space's Hessian operator and the flatness estimator share
        one. The chart keeps only weak references, so nothing outlives its users.
        """
        cached = self.__dict__.get("_linearization_cache")
        if cached is not None:
            psi_ref, version, lin_ref = cached
            lin = lin_ref()
            if (lin is not None and psi_ref() is psi and tensor_version(psi) == version
                    and _is_plain(psi)):
                return lin
        lin = self._linearize(psi)
        if _is_plain(psi) and not psi.is_inference():
            self._linearization_cache = (weakref.ref(psi), tensor_version(psi), weakref.ref(lin))
        return lin

    def _linearize(self, psi: Tensor) -> Linearization:
        """Build the linearization at ψ (generic: products of the chart at ψ)."""
        return Linearization(
            self.forward(psi),
            lambda v: self.jvp(psi, v),
            lambda w: self.vjp(psi, w),
            lambda u: self.inverse_jvp(psi, u),
            lambda z: self.inverse_vjp(psi, z),
        )

    def linearize_into(self, psi: Tensor, theta_out: Tensor) -> Linearization:
        """Linearization whose ``theta`` is ``theta_out``, filled here with h(ψ).

        For a plain ψ only; block-diagonal charts pass slices of one θ, so that no block keeps
        its own copy.
        """
        lin = self._linearize(psi)
        theta_out.copy_(lin.theta)
        lin.theta = theta_out
        return lin

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_linearization_cache", None)  # weak references do not pickle
        return state

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        """log|det J(ψ)|; only defined for bijections."""
        self._require_bijection("log_abs_det_jacobian")
        return torch.linalg.slogdet(self.jacobian(psi))[1]

    #: True when :meth:`jjt_logdet` has a closed form (no dense Jacobian).
    has_closed_form_jjt_logdet: bool = False

    def jjt_logdet(self, psi: Tensor) -> Tensor:
        """log det(J Jᵀ)(ψ), the log-volume factor of a submersion (2 log|det J| for a
        bijection). The default builds the dense Jacobian; charts with a closed form override
        it and set ``has_closed_form_jjt_logdet``."""
        J = self.jacobian(psi)
        return torch.linalg.slogdet(J @ J.T)[1]

    def gauge_directions(self, psi: Tensor) -> Tensor:
        """Basis of ker J(ψ), shape (k, k - d); empty for a bijection."""
        return psi.new_zeros(psi.shape[0], 0)

    def pushforward_log_prob(
        self, log_prob: Callable[[Tensor], Tensor]
    ) -> Callable[[Tensor], Tensor]:
        """log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|: the density rule of docs/math.md §2.

        The one place of this rule (``density.pushforward_log_prob`` and density spaces use
        it). Raises :class:`NotABijectionError` for a submersion.
        """
        self._require_bijection("pushforward_log_prob")

        def log_prob_psi(psi: Tensor) -> Tensor:
            return log_prob(self.forward(psi)) + self.log_abs_det_jacobian(psi)

        return log_prob_psi

    def vertical_projection(self, psi: Tensor, x: Tensor) -> Tensor:
        """Orthogonal projection of x onto ker J(ψ), the vertical (gauge) space.

        Zero for a bijection. The default uses ``I − J⁺J``; charts with a known kernel
        override it with a closed form.
        """
        if self.is_bijection:
            return torch.zeros_like(x)
        return x - self.inverse_jvp(psi, self.jvp(psi, x))

    def _require_bijection(self, what: str) -> None:
        if not self.is_bijection:
            raise NotABijectionError(
                f"{type(self).__name__} is a submersion (more new coordinates than original "
                f"ones), so {what} is undefined: there is no log|det J| and a density cannot be "
                "pushed through it. Use a bijective chart, or keep the density in the original "
                "chart and reparametrize only the metric (docs/math.md §5)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _solve_jjt(h: Reparametrization, psi: Tensor, u: Tensor) -> Tensor:
    """(J Jᵀ)⁻¹ u by conjugate gradients: the generic submersion path (docs/math.md §5)."""
    return cg(lambda x: h.jvp(psi, h.vjp(psi, x)), u).x






class Identity(Reparametrization):
    """θ = ψ."""

    is_affine = True

    def forward(self, psi: Tensor) -> Tensor:
        return psi

    def inverse_map(self, theta: Tensor) -> Tensor:
        return theta

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return v

    vjp = jvp
    inverse_jvp = jvp
    inverse_vjp = jvp

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return psi.new_zeros(())



class Compose(Reparametrization):
    """Composition θ = h₁(h₂(⋯ hₙ(ψ))) of ``Compose(h₁, h₂, …, hₙ)``.

    Jacobian products chain; log|det J| adds up. The right inverse J⁺ = J_n⁺ ⋯ J_1⁺ is the
    Moore–Penrose one when only the innermost map is a submersion; any right inverse gives the
    same invariant quantities (the nonzero spectrum of G⁺Hess only depends on J J⁺ = I).
    """

    def __init__(self, *reparams: Reparametrization) -> None:
        if not reparams:
            raise ValueError("Compose: needs at least one reparametrization")
        self.reparams = tuple(reparams)
        self.is_bijection = all(r.is_bijection for r in reparams)
        self.is_affine = all(r.is_affine for r in reparams)

    def bind(self, shape: torch.Size | Sequence[int]) -> Compose:
        if any(not r.is_bijection for r in self.reparams):
            raise ShapeMismatchError(
                "Compose: binding a composition that contains a submersion by parameter name "
                "is ambiguous; build the composition for a flat point instead"
            )
        return Compose(*(r.bind(shape) for r in self.reparams))

    def psi_dim(self, theta_dim: int) -> int:
        for r in self.reparams:
            theta_dim = r.psi_dim(theta_dim)
        return theta_dim

    def _points(self, psi: Tensor) -> list[Tensor]:
        """Intermediate points [ψ_n = ψ, ψ_{n-1}, …, ψ_1] fed into hₙ, …, h₁."""
        pts = [psi]
        for r in reversed(self.reparams[1:]):
            pts.append(r.forward(pts[-1]))
        return pts  # pts[i] is the input of reparams[n-1-i]

    def __call__(self, psi: Tensor) -> Tensor:
        check_flat(psi, "Compose", "psi")
        x = psi
        for r in reversed(self.reparams):
            x = r(x)
        return x

    def forward(self, psi: Tensor) -> Tensor:
        for r in reversed(self.reparams):
            psi = r.forward(psi)
        return psi

    def inverse(self, theta: Tensor) -> Tensor:
        for r in self.reparams:
            theta = r.inverse(theta)
        return theta

    def inverse_map(self, theta: Tensor) -> Tensor:
        for r in self.reparams:
            theta = r.inverse_map(theta)
        return theta

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        pts = self._points(psi)
        for r, p in zip(reversed(self.reparams), pts, strict=True):
            v = r.jvp(p, v)
        return v

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        pts = self._points(psi)
        for r, p in zip(self.reparams, reversed(pts), strict=True):
            w = r.vjp(p, w)
        return w

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        pts = self._points(psi)
        for r, p in zip(self.reparams, reversed(pts), strict=True):
            u = r.inverse_jvp(p, u)
        return u

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        pts = self._points(psi)
        for r, p in zip(reversed(self.reparams), pts, strict=True):
            z = r.inverse_vjp(p, z)
        return z

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        self._require_bijection("log_abs_det_jacobian")
        pts = self._points(psi)
        return sum(
            (r.log_abs_det_jacobian(p) for r, p in zip(reversed(self.reparams), pts, strict=True)),
            psi.new_zeros(()),
        )

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.reparams))})"
