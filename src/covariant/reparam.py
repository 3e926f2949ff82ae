r"""Charts of a parameter space: reparametrizations :math:`\theta = h(\psi)`.

A :class:`Reparametrization` maps *new* coordinates ψ to *original* ones θ, the same direction
as ``torch.nn.utils.parametrize``. Every chart provides, on flat 1-D tensors,

- ``h(psi)`` and a (right) inverse ``h.inverse(theta)``;
- ``jvp(psi, v) = J v`` and ``vjp(psi, w) = Jᵀ w`` with ``J = ∂θ/∂ψ``;
- ``inverse_jvp(psi, u) = J⁺ u`` and ``inverse_vjp(psi, z) = J⁺ᵀ z``, where ``J⁺ = J⁻¹`` for a
  bijection and a right inverse ``Jᵀ(JJᵀ)⁻¹`` for a submersion (MATH.md §5);
- ``log_abs_det_jacobian(psi) = log|det J|`` (bijections only).

Generic defaults come from ``torch.func``; the built-in charts override them with closed forms,
and the tests check every closed form against the generic path.

Example
-------
>>> import torch
>>> from covariant.reparam import Exp
>>> h = Exp()
>>> psi = torch.tensor([0.0, 1.0], dtype=torch.float64)
>>> h(psi)
tensor([1.0000, 2.7183], dtype=torch.float64)
>>> h.jvp(psi, torch.ones(2, dtype=torch.float64))
tensor([1.0000, 2.7183], dtype=torch.float64)
>>> float(h.log_abs_det_jacobian(psi))
1.0
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import jacfwd, jvp, vjp

from ._fast import is_plain as _is_plain
from .errors import DomainError, NonFiniteError, NotABijectionError, ShapeMismatchError
from .layout import ParameterLayout, match_names

__all__ = [
    "Affine",
    "Compose",
    "Elementwise",
    "Exp",
    "FromFunctions",
    "Identity",
    "Linearization",
    "Log",
    "ParameterwiseReparametrization",
    "Polar",
    "Reparametrization",
    "Scale",
    "Softplus",
    "WeightNorm",
    "from_parametrization",
    "from_transform",
    "split_parametrizations",
]


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


def _check_flat(x: Tensor, name: str, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 1:
        raise ShapeMismatchError(
            f"{owner}: {name} must be a flat 1-D tensor (one coordinate vector), "
            f"got shape {tuple(x.shape)}; use x.reshape(-1)"
        )
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{owner}: {name} contains NaN or Inf")


class Reparametrization:
    r"""Base class of charts θ = h(ψ).

    Subclasses implement :meth:`forward` (ψ ↦ θ) and :meth:`_inverse` (θ ↦ ψ), and may override
    the Jacobian products with closed forms. Calling the object (``h(psi)``) and
    :meth:`inverse` check the input (shape, finiteness, domain); the underscore methods do not,
    so that they can run inside ``torch.func`` transforms.

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

    def _inverse(self, theta: Tensor) -> Tensor:
        """ψ = h⁻¹(θ) (a right inverse for a submersion), without input checks."""
        raise NotImplementedError

    def _check_psi(self, psi: Tensor) -> None:
        """Raise :class:`DomainError` if ψ lies outside the chart's domain."""

    def _check_theta(self, theta: Tensor) -> None:
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
        _check_flat(psi, "psi", type(self).__name__)
        self._check_psi(psi)
        return self.forward(psi)

    def inverse(self, theta: Tensor) -> Tensor:
        """ψ with h(ψ) = θ: the inverse, or a right inverse for a submersion."""
        _check_flat(theta, "theta", f"{type(self).__name__}.inverse")
        self._check_theta(theta)
        return self._inverse(theta)

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
            return jvp(self._inverse, (self.forward(psi),), (u,))[1]
        return self.vjp(psi, _solve_jjt(self, psi, u))

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        """J⁺ᵀ z: map a covector in Ψ to Θ (J⁻ᵀ z for a bijection)."""
        if self.is_bijection:
            return vjp(self._inverse, self.forward(psi))[1](z)[0]
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
            if (lin is not None and psi_ref() is psi and psi._version == version
                    and _is_plain(psi)):
                return lin
        lin = self._linearize(psi)
        if _is_plain(psi) and not psi.is_inference():
            self._linearization_cache = (weakref.ref(psi), psi._version, weakref.ref(lin))
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

    def _linearize_into(self, psi: Tensor, theta_out: Tensor) -> Linearization:
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

    def gauge_directions(self, psi: Tensor) -> Tensor:
        """Basis of ker J(ψ), shape (k, k - d); empty for a bijection."""
        return psi.new_zeros(psi.shape[0], 0)

    def pushforward_log_prob(
        self, log_prob: Callable[[Tensor], Tensor]
    ) -> Callable[[Tensor], Tensor]:
        """log p_Ψ(ψ) = log p_Θ(h(ψ)) + log|det J(ψ)|: the density rule of MATH.md §2.

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
                "chart and reparametrize only the metric (MATH.md §5)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _solve_jjt(h: Reparametrization, psi: Tensor, u: Tensor) -> Tensor:
    """(J Jᵀ)⁻¹ u by conjugate gradients: the generic submersion path (MATH.md §5)."""
    from .linalg import cg

    return cg(lambda x: h.jvp(psi, h.vjp(psi, x)), u).x


class Identity(Reparametrization):
    """θ = ψ."""

    is_affine = True

    def forward(self, psi: Tensor) -> Tensor:
        return psi

    def _inverse(self, theta: Tensor) -> Tensor:
        return theta

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return v

    vjp = jvp
    inverse_jvp = jvp
    inverse_vjp = jvp

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return psi.new_zeros(())


class FromFunctions(Reparametrization):
    """A chart from two plain callables: ``forward`` (ψ ↦ θ) and ``inverse`` (θ ↦ ψ).

    Both must be written in torch operations so that ``torch.func`` can differentiate them.

    Parameters
    ----------
    forward, inverse : callable
        Flat tensor to flat tensor.
    is_bijection : bool
        ``False`` for a submersion (``inverse`` is then a right inverse).
    log_abs_det_jacobian : callable, optional
        Closed form of log|det J(ψ)|; autodiff (``slogdet`` of the dense Jacobian) otherwise.
    domain : callable, optional
        ``domain(psi) -> bool`` tensor; points where it is false raise :class:`DomainError`.

    Example
    -------
    >>> import torch
    >>> cube = FromFunctions(lambda p: p**3 + p, lambda t: t)  # inverse only used as a guess
    >>> cube(torch.tensor([1.0]))
    tensor([2.])
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        inverse: Callable[[Tensor], Tensor],
        *,
        is_bijection: bool = True,
        log_abs_det_jacobian: Callable[[Tensor], Tensor] | None = None,
        domain: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._forward_fn = forward
        self._inverse_fn = inverse
        self.is_bijection = is_bijection
        self._logdet_fn = log_abs_det_jacobian
        self._domain = domain

    def forward(self, psi: Tensor) -> Tensor:
        return self._forward_fn(psi)

    def _inverse(self, theta: Tensor) -> Tensor:
        return self._inverse_fn(theta)

    def _check_psi(self, psi: Tensor) -> None:
        if self._domain is not None and not bool(torch.as_tensor(self._domain(psi)).all()):
            raise DomainError("FromFunctions: psi lies outside the domain given by `domain`")

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        self._require_bijection("log_abs_det_jacobian")
        if self._logdet_fn is not None:
            return self._logdet_fn(psi)
        return super().log_abs_det_jacobian(psi)


class Elementwise(Reparametrization):
    """θ_i = f(ψ_i) for a scalar bijection f; J = diag f'(ψ).

    Subclasses implement ``forward``, ``_inverse`` and ``derivative`` (f'(ψ)), which give
    closed-form Jacobian products and ``log|det J| = Σ log|f'(ψ_i)|``.
    """

    def derivative(self, psi: Tensor) -> Tensor:
        raise NotImplementedError

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return self.derivative(psi) * v

    vjp = jvp

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        return u / self.derivative(psi)

    inverse_vjp = inverse_jvp

    def jacobian(self, psi: Tensor) -> Tensor:
        return torch.diag(self.derivative(psi))

    def _linearize(self, psi: Tensor) -> Linearization:
        d = self.derivative(psi)
        d2 = d * d
        return Linearization(self.forward(psi), d.mul, d.mul, lambda u: u / d, lambda z: z / d,
                             gram=d2.mul, pinv_gram=lambda w: w / d2)

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return self.derivative(psi).abs().log().sum()


class Exp(Elementwise):
    """θ = exp(ψ) elementwise (a log-parametrization of positive parameters)."""

    def forward(self, psi: Tensor) -> Tensor:
        return psi.exp()

    def _inverse(self, theta: Tensor) -> Tensor:
        return theta.log()

    def derivative(self, psi: Tensor) -> Tensor:
        return psi.exp()

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return psi.sum()

    def _check_theta(self, theta: Tensor) -> None:
        if not bool((theta > 0).all()):
            raise DomainError(
                f"Exp.inverse: theta must be > 0 everywhere (log of a non-positive number); "
                f"got min {float(theta.min()):.3g}. Use a chart whose image covers these "
                "values, e.g. Scale or Affine, for parameters that can be negative."
            )


class Log(Elementwise):
    """θ = log(ψ) elementwise, ψ > 0 (e.g. y = eˣ seen from y's side: θ = x, ψ = y)."""

    def forward(self, psi: Tensor) -> Tensor:
        return psi.log()

    def _inverse(self, theta: Tensor) -> Tensor:
        return theta.exp()

    def derivative(self, psi: Tensor) -> Tensor:
        return 1.0 / psi

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return -psi.log().sum()

    def _check_psi(self, psi: Tensor) -> None:
        if not bool((psi > 0).all()):
            raise DomainError(
                f"Log: psi must be > 0 everywhere (log of a non-positive number); "
                f"got min {float(psi.min()):.3g}"
            )


class Softplus(Elementwise):
    """θ = log(1 + exp(ψ)) elementwise; θ > 0."""

    def forward(self, psi: Tensor) -> Tensor:
        return torch.nn.functional.softplus(psi)

    def _inverse(self, theta: Tensor) -> Tensor:
        # log(expm1(θ)) = θ + log(1 - exp(-θ)), stable for large θ
        return theta + torch.log(-torch.expm1(-theta))

    def derivative(self, psi: Tensor) -> Tensor:
        return torch.sigmoid(psi)

    def _check_theta(self, theta: Tensor) -> None:
        if not bool((theta > 0).all()):
            raise DomainError(
                f"Softplus.inverse: theta must be > 0 everywhere; got min {float(theta.min()):.3g}"
            )


class Scale(Elementwise):
    """θ = α ψ: layer rescaling (Dinh et al. 2017) and NTK ↔ standard parametrization.

    Parameters
    ----------
    alpha : float or Tensor
        Nonzero scale, a scalar or one value per coordinate. For NTK parametrization of a
        layer with fan-in n and weight scale σ, ``alpha = σ / sqrt(n)``.
    """

    is_affine = True

    def __init__(self, alpha: float | Tensor) -> None:
        # Python numbers are kept in float64 and cast to each point's dtype when used
        a = alpha if isinstance(alpha, Tensor) else torch.as_tensor(alpha, dtype=torch.float64)
        if not bool(torch.isfinite(a).all()) or bool((a == 0).any()):
            raise DomainError(f"Scale: alpha must be finite and nonzero, got {alpha!r}")
        self.alpha = a

    def _a(self, x: Tensor) -> Tensor:
        return self.alpha.to(dtype=x.dtype, device=x.device)

    def forward(self, psi: Tensor) -> Tensor:
        return self._a(psi) * psi

    def _inverse(self, theta: Tensor) -> Tensor:
        return theta / self._a(theta)

    def derivative(self, psi: Tensor) -> Tensor:
        return self._a(psi).expand_as(psi)

    def __repr__(self) -> str:
        a = self.alpha
        return f"Scale({float(a):.4g})" if a.numel() == 1 else f"Scale(<{a.numel()} values>)"


class Affine(Reparametrization):
    """θ = A ψ + b with an invertible square matrix A.

    Parameters
    ----------
    matrix : Tensor, shape (d, d)
    shift : Tensor, shape (d,), optional
    """

    is_affine = True

    def __init__(self, matrix: Tensor, shift: Tensor | None = None) -> None:
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ShapeMismatchError(
                f"Affine: matrix must be square (d, d), got shape {tuple(matrix.shape)}"
            )
        sign, logabs = torch.linalg.slogdet(matrix.double())
        if sign == 0 or not bool(torch.isfinite(logabs)):
            raise DomainError("Affine: matrix is singular, so the chart is not invertible")
        if shift is not None and torch.as_tensor(shift).shape != (matrix.shape[0],):
            raise ShapeMismatchError(f"Affine: shift must have shape ({matrix.shape[0]},)")
        self.matrix = matrix
        self.shift = None if shift is None else torch.as_tensor(shift)

    def _A(self, x: Tensor) -> Tensor:
        return self.matrix.to(dtype=x.dtype, device=x.device)

    def _check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != self.matrix.shape[1]:
            raise ShapeMismatchError(
                f"Affine: point has {psi.shape[0]} coordinates, matrix expects "
                f"{self.matrix.shape[1]}"
            )

    _check_theta = _check_psi

    def forward(self, psi: Tensor) -> Tensor:
        out = self._A(psi) @ psi
        if self.shift is not None:
            out = out + self.shift.to(dtype=psi.dtype, device=psi.device)
        return out

    def _inverse(self, theta: Tensor) -> Tensor:
        if self.shift is not None:
            theta = theta - self.shift.to(dtype=theta.dtype, device=theta.device)
        return torch.linalg.solve(self._A(theta), theta)

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return self._A(psi) @ v

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        return self._A(psi).T @ w

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        return torch.linalg.solve(self._A(psi), u)

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        return torch.linalg.solve(self._A(psi).T, z)

    def jacobian(self, psi: Tensor) -> Tensor:
        return self._A(psi).clone()

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return torch.linalg.slogdet(self._A(psi))[1]


class Polar(Reparametrization):
    """Polar coordinates: ψ = (r, φ) ↦ θ = (r cos φ, r sin φ), with r > 0.

    Its Christoffel symbols for the Euclidean metric are Γ^r_φφ = −r and Γ^φ_rφ = 1/r, a
    classic check of the connection code. ``log|det J| = log r``.
    """

    def _check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != 2:
            raise ShapeMismatchError(f"Polar: needs 2 coordinates (r, phi), got {psi.shape[0]}")
        if not bool(psi[0] > 0):
            raise DomainError(f"Polar: radius r must be > 0, got {float(psi[0]):.3g}")

    def _check_theta(self, theta: Tensor) -> None:
        if theta.shape[0] != 2:
            raise ShapeMismatchError(f"Polar.inverse: needs 2 coordinates, got {theta.shape[0]}")
        if not bool(theta.norm() > 0):
            raise DomainError("Polar.inverse: the origin has no polar coordinates")

    def forward(self, psi: Tensor) -> Tensor:
        r, phi = psi[0], psi[1]
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi)])

    def _inverse(self, theta: Tensor) -> Tensor:
        x, y = theta[0], theta[1]
        return torch.stack([torch.sqrt(x * x + y * y), torch.atan2(y, x)])

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return psi[0].abs().log()


class WeightNorm(Reparametrization):
    r"""Weight normalization w = g · v / ‖v‖ per slice along ``dim`` (a submersion).

    Follows ``torch.nn.utils.parametrizations.weight_norm``: with ``dim=0`` there is one g per
    output unit and ‖v‖ is taken over all other axes; with ``dim=None`` a single g and the
    norm of the whole tensor. ψ packs ``g`` (one value per slice) followed by ``v`` (the
    shape of w). Per slice, with v̂ = v/‖v‖ and c = g/‖v‖ (MATH.md §5):

    - J = [v̂ | c (I − v̂v̂ᵀ)], rank n, kernel spanned by (0, v) (the gauge direction);
    - J⁺u = (v̂·u, (u − v̂(v̂·u)) / c) and J⁺ᵀ(δg, δv) = δg v̂ + (δv − v̂(v̂·δv)) / c,
      closed forms of Jᵀ(JJᵀ)⁻¹ since JJᵀ = v̂v̂ᵀ + c²(I − v̂v̂ᵀ).

    Parameters
    ----------
    shape : sequence of int, optional
        Shape of the weight w. Left out, it is filled in when the chart is applied to a
        parameter by name (``space.reparametrize({"0.weight": WeightNorm()})``).
    dim : int or None
        Axis that indexes the slices, as in PyTorch (default 0).

    Example
    -------
    >>> import torch
    >>> h = WeightNorm((2, 3))
    >>> w = torch.randn(6, dtype=torch.float64)
    >>> psi = h.inverse(w)           # g = ‖w_row‖, v = w
    >>> torch.allclose(h(psi), w)
    True
    >>> psi.shape                    # 2 gains + 6 directions
    torch.Size([8])
    """

    is_bijection = False

    def __init__(self, shape: Sequence[int] | None = None, dim: int | None = 0) -> None:
        self.shape = None if shape is None else torch.Size(tuple(shape))
        self.dim = dim
        if self.shape is not None:
            self._setup()

    def _setup(self) -> None:
        shape = self.shape
        assert shape is not None
        if len(shape) == 0:
            raise ShapeMismatchError("WeightNorm: cannot normalize a scalar parameter")
        if self.dim is None:
            self._axis = None
            self.num_slices = 1
        else:
            ndim = len(shape)
            if not -ndim <= self.dim < ndim:
                raise ShapeMismatchError(
                    f"WeightNorm: dim={self.dim} is out of range for a weight of shape "
                    f"{tuple(shape)}"
                )
            self._axis = self.dim % ndim
            self.num_slices = shape[self._axis]
        self.n = math.prod(shape)

    def bind(self, shape: torch.Size | Sequence[int]) -> WeightNorm:
        shape = torch.Size(tuple(shape))
        if self.shape is not None and self.shape != shape:
            raise ShapeMismatchError(
                f"WeightNorm: built for shape {tuple(self.shape)}, applied to a parameter of "
                f"shape {tuple(shape)}"
            )
        return WeightNorm(shape, self.dim)

    def _need_shape(self) -> None:
        if self.shape is None:
            raise ShapeMismatchError(
                "WeightNorm: the weight shape is unknown; pass WeightNorm(shape) or apply it "
                "to a parameter by name"
            )

    def psi_dim(self, theta_dim: int) -> int:
        self._need_shape()
        if theta_dim != self.n:
            raise ShapeMismatchError(
                f"WeightNorm: built for {self.n} weights, the point has {theta_dim}"
            )
        return self.num_slices + self.n

    def psi_layout(self, name: str, shape: torch.Size) -> list[tuple[str, torch.Size]]:
        b = self.bind(shape)
        return [(f"{name}.g", torch.Size([b.num_slices])), (f"{name}.v", torch.Size(shape))]

    # rows: one per slice
    def _rows(self, flat: Tensor) -> Tensor:
        assert self.shape is not None
        x = flat.reshape(self.shape)
        if self._axis is None:
            return x.reshape(1, -1)
        return x.movedim(self._axis, 0).reshape(self.num_slices, -1)

    def _unrows(self, rows: Tensor) -> Tensor:
        assert self.shape is not None
        if self._axis is None:
            return rows.reshape(-1)
        moved = list(self.shape)
        moved.insert(0, moved.pop(self._axis))
        return rows.reshape(moved).movedim(0, self._axis).reshape(-1)

    def _split(self, psi: Tensor) -> tuple[Tensor, Tensor]:
        return psi[: self.num_slices], self._rows(psi[self.num_slices :])

    def _check_psi(self, psi: Tensor) -> None:
        self._need_shape()
        if psi.shape[0] != self.num_slices + self.n:
            raise ShapeMismatchError(
                f"WeightNorm: expected {self.num_slices} gains + {self.n} directions = "
                f"{self.num_slices + self.n} coordinates, got {psi.shape[0]}"
            )
        g, v = self._split(psi)
        if bool((v.norm(dim=1) == 0).any()):
            raise DomainError(
                "WeightNorm: a direction v has zero norm, where w = g·v/‖v‖ is undefined; "
                "initialize v from the weight (WeightNorm.inverse(w))"
            )
        if bool((g == 0).any()):
            raise DomainError(
                "WeightNorm: a gain g is zero; there J loses rank and the chart is not a "
                "submersion. Perturb g away from 0."
            )

    def _check_theta(self, theta: Tensor) -> None:
        self._need_shape()
        if theta.shape[0] != self.n:
            raise ShapeMismatchError(
                f"WeightNorm.inverse: expected {self.n} weights, got {theta.shape[0]}"
            )
        if bool((self._rows(theta).norm(dim=1) == 0).any()):
            raise DomainError(
                "WeightNorm.inverse: a slice of w is zero, which gives g = 0 and v = 0, "
                "outside the chart's domain"
            )

    def forward(self, psi: Tensor) -> Tensor:
        g, v = self._split(psi)
        return self._unrows(g[:, None] * v / v.norm(dim=1, keepdim=True))

    def _inverse(self, theta: Tensor) -> Tensor:
        rows = self._rows(theta)
        return torch.cat([rows.norm(dim=1), theta])

    def _parts(self, psi: Tensor) -> tuple[Tensor, Tensor]:
        g, v = self._split(psi)
        norm = v.norm(dim=1, keepdim=True)
        return v / norm, g[:, None] / norm  # v̂ (rows), c (column)

    # The closed forms live in _WeightNormLinearization; a one-off product builds it at ψ.
    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi)._out_of_place("jvp", v)

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi)._out_of_place("vjp", w)

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi)._out_of_place("inverse_jvp", u)

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        return _WeightNormLinearization(self, psi)._out_of_place("inverse_vjp", z)

    def _linearize(self, psi: Tensor) -> Linearization:
        return _WeightNormLinearization(self, psi)

    def _linearize_into(self, psi: Tensor, theta_out: Tensor) -> Linearization:
        return _WeightNormLinearization(self, psi, theta_out)

    def jjt_logdet(self, psi: Tensor) -> Tensor:
        """log det(J Jᵀ) = Σ_slices 2 (n_slice − 1) log|c| (closed form, MATH.md §5)."""
        _, c = self._parts(psi)
        per_slice = self.n // self.num_slices
        return 2 * (per_slice - 1) * c.abs().log().sum()

    def vertical_projection(self, psi: Tensor, x: Tensor) -> Tensor:
        """Per slice, (0, v̂ (v̂·δv)): the projection onto the gauge directions (0, v)."""
        vhat, _ = self._parts(psi)
        dv = self._rows(x[self.num_slices :])
        return torch.cat([torch.zeros_like(x[: self.num_slices]),
                          self._unrows(vhat * (vhat * dv).sum(1, keepdim=True))])

    def gauge_directions(self, psi: Tensor) -> Tensor:
        _, v = self._split(psi)
        k = psi.shape[0]
        out = psi.new_zeros(k, self.num_slices)
        for s in range(self.num_slices):
            row = torch.zeros_like(v)
            row[s] = v[s]
            out[self.num_slices :, s] = self._unrows(row)
        return out

    def __repr__(self) -> str:
        shape = None if self.shape is None else tuple(self.shape)
        return f"WeightNorm(shape={shape}, dim={self.dim})"


class _WeightNormLinearization(_NamedProducts):
    r"""Weight norm's products at one ψ, from v itself and per-slice scalars.

    With V the rows of v (a view of ψ when ``dim`` is 0 or None, so no copy is kept),
    s = 1/‖v‖ and c = g s per row, and a = V·x the row-wise dot products, every product is
    α x + V β with per-row α and β (v̂ = s V, so v̂ v̂ᵀ x = V s² a):

    - J (δg, δv) = c δv + V (s δg − c s² a);    Jᵀ w = (s a, c w − V c s² a);
    - J⁺ u = (s a, u / c − V s² a / c);    J⁺ᵀ (δg, δv) = δv / c + V (s δg − s² a / c);
    - JᵀJ (δg, δv) = (δg, c² δv − V c² s² a);    J⁺J⁺ᵀ (δg, δv) = (δg, δv / c² − V s² a / c²),

    the last two being the pulled-back Euclidean metric and its pseudo-inverse, fused. On
    plain contiguous tensors a product is one row-wise dot, one scaling and one ``addcmul_``
    written straight into its output (:meth:`into` writes into a slice of a larger vector);
    otherwise (autograd, ``torch.func``, ``dim`` other than 0) the same formulas run out of
    place.
    """

    def __init__(self, h: WeightNorm, psi: Tensor, theta_out: Tensor | None = None) -> None:
        assert h.shape is not None
        self._h = h
        m = self._m = h.num_slices
        self._n = h.n
        self._shape = (m, h.n // m)
        self._in_place = _is_plain(psi) and h._axis in (None, 0)  # rows are views
        self._dtype, self._device = psi.dtype, psi.device
        V = self._V = h._rows(psi[m:])
        norm = V.norm(dim=1)
        s = 1.0 / norm
        c = psi[:m] / norm
        s2, c2 = s * s, c * c
        self._s = s
        # per product: α (a column), the coefficient of a in β, and whether the input and
        # the output have a g part (are ψ-side vectors)
        coef = {"jvp": (c, -c * s2), "inverse_jvp": (1.0 / c, -s2 / c),
                "gram": (c2, -c2 * s2), "pinv_gram": (1.0 / c2, -s2 / c2)}
        coef["vjp"], coef["inverse_vjp"] = coef["jvp"], coef["inverse_jvp"]
        self._spec = {p: (alpha[:, None], beta, src == "psi", dst == "psi")
                      for p, (alpha, beta) in coef.items() for src, dst in [_SIDES[p]]}
        self._c = c
        if theta_out is not None:  # else θ is formed on first use (one-off products skip it)
            if self._in_place:
                torch.mul(V, c[:, None], out=theta_out.view(self._shape))
            else:
                theta_out.copy_(h._unrows(c[:, None] * V))
            self.theta = theta_out

    @functools.cached_property
    def theta(self) -> Tensor:  # type: ignore[override]
        return self._h._unrows(self._c[:, None] * self._V)  # g v̂ = c v

    def _product(self, product: str, x: Tensor) -> Tensor:
        if (self._in_place and _is_plain(x) and x.is_contiguous() and x.dtype == self._dtype
                and x.device == self._device):
            out = x.new_empty(self._n if _SIDES[product][1] == "theta" else self._m + self._n)
            self._into(product, x, out)
            return out
        return self._out_of_place(product, x)

    def _out_of_place(self, product: str, x: Tensor) -> Tensor:
        alpha, coef, g_in, g_out = self._spec[product]
        m, h = self._m, self._h
        xv = h._rows(x[m:] if g_in else x)
        a = (self._V * xv).sum(1)
        beta = torch.addcmul(x[:m] * self._s, coef, a) if g_in and not g_out else coef * a
        v_part = h._unrows(torch.addcmul(xv * alpha, self._V, beta.unsqueeze(1)))
        if not g_out:
            return v_part
        return torch.cat([x[:m] if g_in else self._s * a, v_part])

    def _into(self, product: str, x: Tensor, out: Tensor) -> None:
        alpha, coef, g_in, g_out = self._spec[product]
        m, shape, V = self._m, self._shape, self._V
        xv = (x[m:] if g_in else x).view(shape)
        o = (out[m:] if g_out else out).view(shape)
        a = torch.mul(V, xv, out=o).sum(1)  # the output doubles as scratch: no temporary
        if not g_out:  # J, J⁺ᵀ: (δg, δv) ↦ θ-side
            beta = torch.addcmul(x[:m] * self._s, coef, a)
        else:
            if g_in:  # JᵀJ, J⁺J⁺ᵀ keep δg
                out[:m].copy_(x[:m])
            else:  # Jᵀ, J⁺: g part s a
                torch.mul(self._s, a, out=out[:m])
            beta = coef * a
        torch.mul(xv, alpha, out=o)
        o.addcmul_(V, beta.unsqueeze(1))

    def into(self, product: str, x: Tensor, out: Tensor) -> None:
        """Write a product of the plain ``x`` into the plain ``out`` (same dtype, device)."""
        if self._in_place and x.is_contiguous():
            self._into(product, x, out)
        else:
            out.copy_(self._out_of_place(product, x))


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
        _check_flat(psi, "psi", "Compose")
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

    def _inverse(self, theta: Tensor) -> Tensor:
        for r in self.reparams:
            theta = r._inverse(theta)
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


class ParameterwiseReparametrization(Reparametrization):
    """Block-diagonal chart: a reparametrization per named parameter of a layout.

    Built by ``space.reparametrize({"0.weight": WeightNorm(), "*.bias": Scale(2.0)})``; keys
    are parameter names or glob patterns, and each parameter takes the first pattern that
    matches it. Parameters that match nothing keep their coordinates. The new coordinates
    have their own layout (``new_layout``): weight norm turns ``name`` into ``name.g`` and
    ``name.v``.
    """

    def __init__(
        self, layout: ParameterLayout, mapping: Mapping[str, Reparametrization]
    ) -> None:
        for key, r in mapping.items():
            if not isinstance(r, Reparametrization):
                raise TypeError(
                    f"reparametrize: value for {key!r} must be a Reparametrization, "
                    f"got {type(r).__name__}"
                )
        matched = match_names(layout.names, mapping.keys())
        self.layout = layout
        self.blocks: dict[str, Reparametrization] = {}
        new_names: list[str] = []
        new_shapes: list[torch.Size] = []
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            if name in matched:
                r = mapping[matched[name]].bind(shape)
                self.blocks[name] = r
                for n, s in r.psi_layout(name, shape):
                    new_names.append(n)
                    new_shapes.append(s)
            else:
                new_names.append(name)
                new_shapes.append(shape)
        self.new_layout = ParameterLayout(tuple(new_names), tuple(new_shapes))
        self.is_bijection = all(r.is_bijection for r in self.blocks.values())
        self.is_affine = all(r.is_affine for r in self.blocks.values())
        # slices of each parameter in θ and in ψ
        self._theta_slices = layout.slices
        self._psi_slices: dict[str, slice] = {}
        start = 0
        for name, n in zip(layout.names, layout.numels, strict=True):
            k = self.blocks[name].psi_dim(n) if name in self.blocks else n
            self._psi_slices[name] = slice(start, start + k)
            start += k
        self._psi_dim = start

    def psi_dim(self, theta_dim: int) -> int:
        return self._psi_dim

    def _check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != self._psi_dim:
            raise ShapeMismatchError(
                f"reparametrized point must have {self._psi_dim} coordinates, got {psi.shape[0]}"
            )
        for name, r in self.blocks.items():
            try:
                r._check_psi(psi[self._psi_slices[name]])
            except DomainError as err:
                raise DomainError(f"parameter {name!r}: {err}") from err

    def _check_theta(self, theta: Tensor) -> None:
        if theta.shape[0] != self.layout.dim:
            raise ShapeMismatchError(
                f"point must have {self.layout.dim} coordinates, got {theta.shape[0]}"
            )
        for name, r in self.blocks.items():
            try:
                r._check_theta(theta[self._theta_slices[name]])
            except DomainError as err:
                raise DomainError(f"parameter {name!r}: {err}") from err

    def _map(self, x: Tensor, src: dict[str, slice], fn_name: str, *extra: Tensor) -> Tensor:
        parts = []
        for name in self.layout.names:
            piece = x[src[name]]
            r = self.blocks.get(name)
            if r is None:
                parts.append(piece)
            else:
                args = [e[self._psi_slices[name]] for e in extra]
                parts.append(getattr(r, fn_name)(*args, piece))
        return torch.cat(parts)

    def forward(self, psi: Tensor) -> Tensor:
        return self._map(psi, self._psi_slices, "forward")

    def _inverse(self, theta: Tensor) -> Tensor:
        return self._map(theta, self._theta_slices, "_inverse")

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        return self._map(v, self._psi_slices, "jvp", psi)

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        return self._map(w, self._theta_slices, "vjp", psi)

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        return self._map(u, self._theta_slices, "inverse_jvp", psi)

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        return self._map(z, self._psi_slices, "inverse_vjp", psi)

    def _linearize(self, psi: Tensor) -> Linearization:
        return _BlockLinearization(self, psi)

    def jacobian(self, psi: Tensor) -> Tensor:
        """Dense block-diagonal J, block by block (each block may use its own fallback)."""
        J = psi.new_zeros(self.layout.dim, self._psi_dim)
        for name in self.layout.names:
            ts, ps = self._theta_slices[name], self._psi_slices[name]
            r = self.blocks.get(name)
            if r is None:
                J[ts, ps] = torch.eye(ts.stop - ts.start, dtype=psi.dtype, device=psi.device)
            else:
                J[ts, ps] = r.jacobian(psi[ps])
        return J

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        self._require_bijection("log_abs_det_jacobian")
        total = psi.new_zeros(())
        for name, r in self.blocks.items():
            total = total + r.log_abs_det_jacobian(psi[self._psi_slices[name]])
        return total

    def jjt_logdet(self, psi: Tensor) -> Tensor:
        """log det(J Jᵀ), block by block (bijective blocks give 2 log|det J|)."""
        total = psi.new_zeros(())
        for name, r in self.blocks.items():
            p = psi[self._psi_slices[name]]
            total = total + (
                2 * r.log_abs_det_jacobian(p) if r.is_bijection else _jjt_logdet(r, p)
            )
        return total

    def vertical_projection(self, psi: Tensor, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        parts = []
        for name in self.layout.names:
            sl = self._psi_slices[name]
            r = self.blocks.get(name)
            if r is None or r.is_bijection:
                parts.append(torch.zeros_like(x[sl]))
            else:
                parts.append(r.vertical_projection(psi[sl], x[sl]))
        return torch.cat(parts) if parts else out

    def gauge_directions(self, psi: Tensor) -> Tensor:
        cols = []
        for name, r in self.blocks.items():
            sl = self._psi_slices[name]
            g = r.gauge_directions(psi[sl])
            if g.shape[1]:
                full = psi.new_zeros(psi.shape[0], g.shape[1])
                full[sl] = g
                cols.append(full)
        return torch.cat(cols, 1) if cols else psi.new_zeros(psi.shape[0], 0)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {r!r}" for n, r in self.blocks.items())
        return f"ParameterwiseReparametrization({{{inner}}})"


class _BlockLinearization(_NamedProducts):
    """Products of a :class:`ParameterwiseReparametrization` at one ψ, block by block.

    On plain tensors each product allocates its output once and fills it slice by slice:
    blocks without a chart are copied (runs of adjacent ones in one copy), charted blocks
    write into their slice through :meth:`Linearization.into`, and θ is one vector whose
    slices are the blocks' θ. Inside autograd or ``torch.func`` the blocks' products are
    concatenated instead. ``gram`` and ``pinv_gram`` exist when every charted block has them.
    """

    def __init__(self, h: ParameterwiseReparametrization, psi: Tensor) -> None:
        names = h.layout.names
        self._fast = _is_plain(psi)
        self._dtype, self._device = psi.dtype, psi.device
        self._dims = {"psi": h._psi_dim, "theta": h.layout.dim}
        if self._fast:
            theta = psi.new_empty(h.layout.dim)
            lins = {n: r._linearize_into(psi[h._psi_slices[n]], theta[h._theta_slices[n]])
                    for n, r in h.blocks.items()}
            for n in names:
                if n not in lins:
                    theta[h._theta_slices[n]].copy_(psi[h._psi_slices[n]])
        else:
            lins = {n: r.linearize(psi[h._psi_slices[n]]) for n, r in h.blocks.items()}
            theta = torch.cat([lins[n].theta if n in lins else psi[h._psi_slices[n]]
                               for n in names])
        slices = {"psi": h._psi_slices, "theta": h._theta_slices}
        # per product: [(input slice, output slice, block linearization or None)], with
        # adjacent blocks without a chart merged into one copy
        self._plan: dict[str, list[tuple[slice, slice, Linearization | None]]] = {}
        for product, (src, dst) in _SIDES.items():
            plan: list[tuple[slice, slice, Linearization | None]] = []
            for n in names:
                a, b, lin = slices[src][n], slices[dst][n], lins.get(n)
                if lin is None and plan and plan[-1][2] is None:
                    plan[-1] = (slice(plan[-1][0].start, a.stop),
                                slice(plan[-1][1].start, b.stop), None)
                else:
                    plan.append((a, b, lin))
            self._plan[product] = plan
        self.theta = theta
        for fused in ("gram", "pinv_gram"):
            if any(getattr(lin, fused) is None for lin in lins.values()):
                setattr(self, fused, None)

    def _product(self, product: str, x: Tensor) -> Tensor:
        plan = self._plan[product]
        if not (self._fast and _is_plain(x) and x.dtype == self._dtype
                and x.device == self._device):
            return torch.cat([x[a] if lin is None else getattr(lin, product)(x[a])
                              for a, _, lin in plan])
        out = x.new_empty(self._dims[_SIDES[product][1]])
        self.into(product, x, out)
        return out

    def into(self, product: str, x: Tensor, out: Tensor) -> None:
        for a, b, lin in self._plan[product]:
            if lin is None:
                out[b].copy_(x[a])
            else:
                lin.into(product, x[a], out[b])


def _jjt_logdet(r: Reparametrization, psi: Tensor) -> Tensor:
    if hasattr(r, "jjt_logdet"):
        return r.jjt_logdet(psi)
    J = r.jacobian(psi)
    return torch.linalg.slogdet(J @ J.T)[1]


class _FromParametrization(Reparametrization):
    def __init__(
        self, module: torch.nn.Module, shape: torch.Size | None, is_bijection: bool | None
    ) -> None:
        self.module = module
        self.shape = shape
        self._user_bijection = is_bijection
        self._orig_shapes: list[torch.Size] | None = None
        if shape is not None:
            self._setup()

    def _setup(self) -> None:
        assert self.shape is not None
        with torch.no_grad():
            probe = torch.randn(self.shape, dtype=torch.float64)
            try:
                orig = self.module.right_inverse(probe)
            except (AttributeError, NotImplementedError):
                orig = probe
        origs = list(orig) if isinstance(orig, tuple | list) else [orig]
        self._orig_shapes = [torch.Size(o.shape) for o in origs]
        k = sum(math.prod(s) for s in self._orig_shapes)
        n = math.prod(self.shape)
        self.is_bijection = (k == n) if self._user_bijection is None else self._user_bijection

    def bind(self, shape: torch.Size | Sequence[int]) -> _FromParametrization:
        return _FromParametrization(self.module, torch.Size(tuple(shape)), self._user_bijection)

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        try:
            return super().jvp(psi, v)
        except NotImplementedError:
            # some parametrizations (torch's weight norm kernel) lack forward-mode AD:
            # J v is the vjp of the linear map w ↦ Jᵀ w
            w0 = torch.zeros_like(self.forward(psi))
            return vjp(lambda w: self.vjp(psi, w), w0)[1](v)[0]

    def jacobian(self, psi: Tensor) -> Tensor:
        try:
            return super().jacobian(psi)
        except NotImplementedError:
            return torch.func.jacrev(self.forward)(psi)

    def _need(self) -> list[torch.Size]:
        if self._orig_shapes is None:
            raise ShapeMismatchError(
                "from_parametrization: pass shape=... or apply the chart to a parameter by name"
            )
        return self._orig_shapes

    def psi_dim(self, theta_dim: int) -> int:
        return sum(math.prod(s) for s in self._need())

    def psi_layout(self, name: str, shape: torch.Size) -> list[tuple[str, torch.Size]]:
        shapes = self.bind(shape)._need()
        if len(shapes) == 1:
            return [(name, shapes[0])]
        return [(f"{name}.original{i}", s) for i, s in enumerate(shapes)]

    def forward(self, psi: Tensor) -> Tensor:
        shapes = self._need()
        parts, start = [], 0
        for s in shapes:
            n = math.prod(s)
            parts.append(psi[start : start + n].reshape(s))
            start += n
        return self.module(*parts).reshape(-1)

    def _inverse(self, theta: Tensor) -> Tensor:
        assert self.shape is not None
        try:
            orig = self.module.right_inverse(theta.reshape(self.shape))
        except (AttributeError, NotImplementedError):
            orig = theta.reshape(self.shape)
        origs = list(orig) if isinstance(orig, tuple | list) else [orig]
        return torch.cat([o.reshape(-1) for o in origs])


def from_parametrization(
    module: torch.nn.Module,
    shape: Sequence[int] | None = None,
    *,
    is_bijection: bool | None = None,
) -> Reparametrization:
    """Wrap a ``torch.nn.utils.parametrize`` parametrization module as a chart.

    ``module.forward(*originals)`` gives the weight (θ) and ``module.right_inverse(weight)``
    the originals (ψ, packed flat in order). Several originals (like weight norm's ``(g, v)``)
    make a submersion unless ``is_bijection=True`` says otherwise.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> class Square(nn.Module):
    ...     def forward(self, x): return x * x.abs()
    ...     def right_inverse(self, w): return w.sign() * w.abs().sqrt()
    >>> h = from_parametrization(Square(), shape=(3,))
    >>> h(torch.tensor([1.0, -2.0, 3.0]))
    tensor([ 1., -4.,  9.])
    """
    return _FromParametrization(
        module, None if shape is None else torch.Size(tuple(shape)), is_bijection
    )


class _FromTransform(Reparametrization):
    def __init__(self, transform: Any) -> None:
        self.transform = transform
        if getattr(transform, "event_dim", 0) not in (0, 1):
            raise ShapeMismatchError(
                "from_transform: only transforms with event_dim 0 (elementwise) or 1 (vectors) "
                "are supported"
            )

    def forward(self, psi: Tensor) -> Tensor:
        return self.transform(psi)

    def _inverse(self, theta: Tensor) -> Tensor:
        return self.transform.inv(theta)

    def _check_theta(self, theta: Tensor) -> None:
        support = self.transform.codomain
        if not bool(support.check(theta).all()):
            raise DomainError(
                f"from_transform: theta lies outside the transform's codomain {support}"
            )

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        out = self.transform.log_abs_det_jacobian(psi, self.transform(psi))
        return out.sum()

    def __repr__(self) -> str:
        return f"from_transform({self.transform})"


def from_transform(transform: Any) -> Reparametrization:
    """Wrap a ``torch.distributions.transforms.Transform`` T as the chart θ = T(ψ).

    Example
    -------
    >>> import torch
    >>> from torch.distributions.transforms import ExpTransform
    >>> h = from_transform(ExpTransform())
    >>> float(h.log_abs_det_jacobian(torch.tensor([0.5, 1.5])))
    2.0
    """
    return _FromTransform(transform)


def split_parametrizations(
    model: torch.nn.Module,
) -> tuple[torch.nn.Module, dict[str, Reparametrization], dict[str, Tensor]]:
    """Split a model that uses ``torch.nn.utils.parametrize`` into a plain model and its charts.

    Returns a deep copy of ``model`` whose parametrized tensors are plain parameters holding
    their current values (the w chart), the charts ``{name: from_parametrization(...)}`` that
    give back the model's own coordinates, and the model's original tensors keyed by the
    names they get in the reparametrized layout. So a model with
    ``torch.nn.utils.parametrizations.weight_norm`` can be analysed in both charts:

    >>> import torch
    >>> from torch import nn
    >>> import covariant as cv
    >>> net = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)).double()
    >>> plain, charts, originals = split_parametrizations(net)
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> w_space, theta = cv.ParameterSpace.from_module(plain, nn.MSELoss(), (X, y))
    >>> gv_space = w_space.reparametrize(charts)          # the (g, v) chart, metric carried
    >>> psi = gv_space.layout.flatten(originals)
    >>> bool(torch.allclose(gv_space.chart(psi), theta))
    True
    """
    import copy

    from torch.nn.utils import parametrize

    plain = copy.deepcopy(model)
    charts: dict[str, Reparametrization] = {}
    originals: dict[str, Tensor] = {}
    for mod_name, module in list(plain.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        values: dict[str, Tensor] = {}
        for tensor_name in list(module.parametrizations.keys()):
            plist = module.parametrizations[tensor_name]
            if len(plist) != 1:
                raise ShapeMismatchError(
                    f"split_parametrizations: {mod_name}.{tensor_name} has {len(plist)} chained "
                    "parametrizations; only one per tensor is supported"
                )
            full = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            value = getattr(module, tensor_name).detach().clone()
            origs = (
                [plist.original]
                if hasattr(plist, "original")
                else [getattr(plist, f"original{i}") for i in range(len(list(plist.parameters())))]
            )
            chart = from_parametrization(copy.deepcopy(plist[0]), value.shape)
            layout = chart.psi_layout(full, value.shape)
            for (new_name, _), orig in zip(layout, origs, strict=True):
                originals[new_name] = orig.detach().clone()
            charts[full] = chart
            values[tensor_name] = value
        # torch.nn.utils.parametrize.remove_parametrizations would delete the property from
        # the dynamically created class, which the deep copy shares with the caller's model;
        # restore the plain class on the copy instead.
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        for tensor_name, value in values.items():
            module.register_parameter(tensor_name, torch.nn.Parameter(value))
    for name, param in plain.named_parameters():
        if name not in charts:
            originals[name] = param.detach().clone()
    return plain, charts, originals
