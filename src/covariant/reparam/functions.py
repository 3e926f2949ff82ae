r"""A chart from two user callables, :class:`FromFunctions`, whose inverse is refined by
Newton's method and whose inverse Jacobian products follow the implicit-function rule.

The user's ``inverse`` is a starting guess ψ₀ for h(ψ) = θ. When h(ψ₀) misses θ, Newton steps

.. math::

    ψ_{k+1} = ψ_k − J(ψ_k)^+ \bigl(h(ψ_k) − θ\bigr), \qquad J^+ = Jᵀ (J Jᵀ)^{-1}

(J⁺ = J⁻¹ for a bijection; the least-norm Gauss–Newton step for a submersion) refine it, and a
point that still misses θ raises :class:`~covariant.errors.NotABijectionError`. The products
``inverse_jvp`` (J⁺ u) and ``inverse_vjp`` (J⁺ᵀ z) use only J at ψ: since h(h⁻¹(θ)) = θ, the
derivative of the inverse is J⁺, whatever the user's callable would differentiate to.

Example
-------
>>> import torch
>>> h = FromFunctions(torch.sinh, torch.asinh)
>>> psi = torch.tensor([0.3, -1.2], dtype=torch.float64)
>>> torch.equal(h.inverse(h(psi)), torch.asinh(torch.sinh(psi)))   # an exact inverse is kept
True
>>> bool(torch.allclose(h.inverse_jvp(psi, torch.ones(2, dtype=torch.float64)),
...                     1 / torch.cosh(psi)))
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._fast import is_plain as _is_plain
from ..errors import DomainError, NotABijectionError
from .base import Linearization, Reparametrization, _solve_jjt

__all__ = ["FromFunctions"]

# up to this many coordinates, J⁺ products use the dense Jacobian (one LU per point); above,
# conjugate gradients on J Jᵀ (matrix-free)
_DENSE_MAX_DIM = 1024


def _least_norm_solve(h: Reparametrization, psi: Tensor, r: Tensor) -> Tensor:
    """J(ψ)⁺ r = Jᵀ (J Jᵀ)⁻¹ r: J⁻¹ r for a bijection, the least-norm solution of J x = r else."""
    if psi.shape[0] > _DENSE_MAX_DIM:
        return h.vjp(psi, _solve_jjt(h, psi, r))
    J = h.jacobian(psi)
    if J.shape[0] == J.shape[1]:
        return torch.linalg.solve(J, r)
    return J.T @ torch.linalg.solve(J @ J.T, r)


def _least_norm_solve_transposed(h: Reparametrization, psi: Tensor, z: Tensor) -> Tensor:
    """J(ψ)⁺ᵀ z = (J Jᵀ)⁻¹ J z (J⁻ᵀ z for a bijection)."""
    if psi.shape[0] > _DENSE_MAX_DIM:
        return _solve_jjt(h, psi, h.jvp(psi, z))
    J = h.jacobian(psi)
    if J.shape[0] == J.shape[1]:
        return torch.linalg.solve(J.T, z)
    return torch.linalg.solve(J @ J.T, J @ z)


def newton_refine(
    h: Reparametrization,
    theta: Tensor,
    guess: Tensor,
    *,
    rtol: float | None = None,
    max_steps: int = 50,
) -> Tensor:
    r"""ψ with h(ψ) = θ, by Newton's method on h from ``guess`` (values only, no autograd).

    Steps ψ ← ψ − t J⁺(h(ψ) − θ), with t halved (up to 30 times) until the residual
    ‖h(ψ) − θ‖∞ decreases. A guess whose residual is within the tolerance
    ``rtol · (1 + ‖θ‖∞)`` (``rtol`` defaults to eps^¾ of the dtype: about 2e-12 in float64) is
    returned unchanged; otherwise the iteration runs until the residual stops shrinking
    (roundoff level) or after ``max_steps`` steps, and a final residual above the tolerance
    raises :class:`NotABijectionError`.

    Example
    -------
    >>> import torch
    >>> from covariant.reparam import FromFunctions
    >>> cube = FromFunctions(lambda p: p**3 + p, lambda t: t)
    >>> theta = torch.tensor([2.0, 10.0], dtype=torch.float64)
    >>> newton_refine(cube, theta, theta)
    tensor([1., 2.], dtype=torch.float64)
    """
    psi, theta = guess.detach(), theta.detach()
    eps = torch.finfo(theta.dtype).eps
    tol = (eps**0.75 if rtol is None else rtol) * (1.0 + float(theta.abs().max()))
    with torch.no_grad():
        r = h.forward(psi) - theta
        res = float(r.abs().max())
        steps = 0
        refine = res > tol  # a guess within the tolerance is kept as it is
        while refine and res > 0 and steps < max_steps:
            steps += 1
            step, t = _least_norm_solve(h, psi, r), 1.0
            for _ in range(30):
                cand = psi - t * step
                r_cand = h.forward(cand) - theta
                res_cand = float(r_cand.abs().max())
                if res_cand < res:  # NaN compares False: halve the step
                    break
                t *= 0.5
            else:
                break  # no decrease along the Newton direction: roundoff level, or stuck
            psi, r, res = cand, r_cand, res_cand
    if not res <= tol:
        raise NotABijectionError(
            f"{type(h).__name__}: the `inverse` given does not invert `forward` at this theta: "
            f"max |h(inverse(theta)) - theta| = {res:.3g} after {steps} Newton steps "
            f"(tolerance {tol:.3g}). Pass an `inverse` with forward(inverse(theta)) = theta, or "
            "a starting guess closer to it; theta may lie outside the image of `forward`."
        )
    return psi


class FromFunctions(Reparametrization):
    """A chart from two plain callables: ``forward`` (ψ ↦ θ) and ``inverse`` (θ ↦ ψ).

    Both must be written in torch operations so that ``torch.func`` can differentiate
    ``forward``. ``inverse`` need only be a starting guess: :meth:`inverse` refines it by
    Newton's method on ``forward`` (:func:`newton_refine`) and raises
    :class:`~covariant.errors.NotABijectionError` when h(ψ) = θ cannot be solved to the
    tolerance. An ``inverse`` that is already exact is returned unchanged. The inverse Jacobian
    products (J⁻¹ u, J⁻ᵀ z, or J⁺ for a submersion) use the Jacobian of ``forward`` only
    (the implicit-function rule), never the derivative of ``inverse``.

    Parameters
    ----------
    forward, inverse : callable
        Flat tensor to flat tensor.
    is_bijection : bool
        ``False`` for a submersion (``inverse`` then guesses a right inverse, and Newton takes
        least-norm steps).
    log_abs_det_jacobian : callable, optional
        Closed form of log|det J(ψ)|; autodiff (``slogdet`` of the dense Jacobian) otherwise.
    domain : callable, optional
        ``domain(psi) -> bool`` tensor; points where it is false raise :class:`DomainError`.
    rtol : float, optional
        Tolerance of max |h(ψ) − θ| relative to 1 + max |θ| (default eps^¾ of the dtype).
    max_newton_steps : int
        At most this many Newton steps refine ``inverse`` (default 50).

    Example
    -------
    >>> import torch
    >>> cube = FromFunctions(lambda p: p**3 + p, lambda t: t)  # inverse: only a guess
    >>> theta = torch.tensor([2.0, 10.0], dtype=torch.float64)
    >>> psi = cube.inverse(theta)                               # refined by Newton
    >>> psi
    tensor([1., 2.], dtype=torch.float64)
    >>> bool(torch.allclose(cube(psi), theta, rtol=0, atol=1e-12))
    True
    >>> cube.inverse_jvp(psi, torch.ones(2, dtype=torch.float64))   # 1 / (3ψ² + 1)
    tensor([0.2500, 0.0769], dtype=torch.float64)
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        inverse: Callable[[Tensor], Tensor],
        *,
        is_bijection: bool = True,
        log_abs_det_jacobian: Callable[[Tensor], Tensor] | None = None,
        domain: Callable[[Tensor], Tensor] | None = None,
        rtol: float | None = None,
        max_newton_steps: int = 50,
    ) -> None:
        self._forward_fn = forward
        self._inverse_fn = inverse
        self.is_bijection = is_bijection
        self._logdet_fn = log_abs_det_jacobian
        self._domain = domain
        self.rtol = rtol
        self.max_newton_steps = max_newton_steps

    def forward(self, psi: Tensor) -> Tensor:
        return self._forward_fn(psi)

    def inverse_map(self, theta: Tensor) -> Tensor:
        """The user's inverse refined by Newton; differentiable in θ with derivative J⁺.

        On a θ that autograd tracks, the refined ψ* (a constant) is returned as
        ψ* + J⁺(θ − h(ψ*)), whose value is ψ* up to the residual and whose derivative is J(ψ*)⁺.
        """
        guess = self._inverse_fn(theta.detach())
        psi = newton_refine(self, theta, guess, rtol=self.rtol,
                            max_steps=self.max_newton_steps)
        if _is_plain(theta):
            return psi
        return psi + _least_norm_solve(self, psi, theta - self.forward(psi))

    def check_psi(self, psi: Tensor) -> None:
        if self._domain is not None and not bool(torch.as_tensor(self._domain(psi)).all()):
            raise DomainError("FromFunctions: psi lies outside the domain given by `domain`")

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        """J(ψ)⁻¹ u (J⁺ u for a submersion), from the Jacobian of ``forward``."""
        if not self.is_bijection:
            return super().inverse_jvp(psi, u)
        return _least_norm_solve(self, psi, u)

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        """J(ψ)⁻ᵀ z (J⁺ᵀ z for a submersion), from the Jacobian of ``forward``."""
        if not self.is_bijection:
            return super().inverse_vjp(psi, z)
        return _least_norm_solve_transposed(self, psi, z)

    def _linearize(self, psi: Tensor) -> Linearization:
        """At one ψ, a small bijection factors J once (LU) for all its J⁻¹ products."""
        if not self.is_bijection or psi.shape[0] > _DENSE_MAX_DIM:
            return super()._linearize(psi)
        lu, pivots = torch.linalg.lu_factor(self.jacobian(psi))

        def solve(x: Tensor, adjoint: bool) -> Tensor:
            return torch.linalg.lu_solve(lu, pivots, x.unsqueeze(-1), adjoint=adjoint).squeeze(-1)

        return Linearization(
            self.forward(psi),
            lambda v: self.jvp(psi, v),
            lambda w: self.vjp(psi, w),
            lambda u: solve(u, False),
            lambda z: solve(z, True),
        )

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        self._require_bijection("log_abs_det_jacobian")
        if self._logdet_fn is not None:
            return self._logdet_fn(psi)
        return super().log_abs_det_jacobian(psi)
