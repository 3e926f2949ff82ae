r"""Bijections of ℝ^d with closed-form Jacobians: elementwise maps θ_i = f(ψ_i), linear maps
(:class:`Scale`, :class:`Affine`) and polar coordinates.

An elementwise chart has J = diag f'(ψ), so every product is a multiplication or a division
by f'(ψ) and ``log|det J| = Σ log|f'(ψ_i)|``. :class:`Affine` has the constant J = A, and
:class:`Polar` the 2×2 J = [[cos φ, −r sin φ], [sin φ, r cos φ]].

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

import torch
from torch import Tensor

from ..errors import DomainError, ShapeMismatchError
from .base import Linearization, Reparametrization

__all__ = ["Affine", "Cubic", "Elementwise", "Exp", "Log", "Polar", "Scale", "Sinh", "Softplus"]


class Elementwise(Reparametrization):
    """θ_i = f(ψ_i) for a scalar bijection f; J = diag f'(ψ).

    Subclasses implement ``forward``, ``inverse_map`` and ``derivative`` (f'(ψ)), which give
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

    def inverse_map(self, theta: Tensor) -> Tensor:
        return theta.log()

    def derivative(self, psi: Tensor) -> Tensor:
        return psi.exp()

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return psi.sum()

    def check_theta(self, theta: Tensor) -> None:
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

    def inverse_map(self, theta: Tensor) -> Tensor:
        return theta.exp()

    def derivative(self, psi: Tensor) -> Tensor:
        return 1.0 / psi

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return -psi.log().sum()

    def check_psi(self, psi: Tensor) -> None:
        if not bool((psi > 0).all()):
            raise DomainError(
                f"Log: psi must be > 0 everywhere (log of a non-positive number); "
                f"got min {float(psi.min()):.3g}"
            )


class Softplus(Elementwise):
    """θ = log(1 + exp(ψ)) elementwise; θ > 0."""

    def forward(self, psi: Tensor) -> Tensor:
        return torch.nn.functional.softplus(psi)

    def inverse_map(self, theta: Tensor) -> Tensor:
        # log(expm1(θ)) = θ + log(1 - exp(-θ)), stable for large θ
        return theta + torch.log(-torch.expm1(-theta))

    def derivative(self, psi: Tensor) -> Tensor:
        return torch.sigmoid(psi)

    def check_theta(self, theta: Tensor) -> None:
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

    def inverse_map(self, theta: Tensor) -> Tensor:
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

    def check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != self.matrix.shape[1]:
            raise ShapeMismatchError(
                f"Affine: point has {psi.shape[0]} coordinates, matrix expects "
                f"{self.matrix.shape[1]}"
            )

    check_theta = check_psi

    def forward(self, psi: Tensor) -> Tensor:
        out = self._A(psi) @ psi
        if self.shift is not None:
            out = out + self.shift.to(dtype=psi.dtype, device=psi.device)
        return out

    def inverse_map(self, theta: Tensor) -> Tensor:
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
    classic check of the connection code. ``log|det J| = log r``. The Jacobian products are
    closed forms: with c = cos φ, s = sin φ, J = [[c, −r s], [s, r c]] and
    J⁻¹ = [[c, s], [−s/r, c/r]].

    Example
    -------
    >>> import torch
    >>> h = Polar()
    >>> psi = torch.tensor([2.0, 0.3], dtype=torch.float64)
    >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> bool(torch.allclose(h.jvp(psi, v), torch.func.jacfwd(h.forward)(psi) @ v))
    True
    >>> bool(torch.allclose(h.inverse_jvp(psi, h.jvp(psi, v)), v))
    True
    """

    def check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != 2:
            raise ShapeMismatchError(f"Polar: needs 2 coordinates (r, phi), got {psi.shape[0]}")
        if not bool(psi[0] > 0):
            raise DomainError(f"Polar: radius r must be > 0, got {float(psi[0]):.3g}")

    def check_theta(self, theta: Tensor) -> None:
        if theta.shape[0] != 2:
            raise ShapeMismatchError(f"Polar.inverse: needs 2 coordinates, got {theta.shape[0]}")
        if not bool(theta.norm() > 0):
            raise DomainError("Polar.inverse: the origin has no polar coordinates")

    def forward(self, psi: Tensor) -> Tensor:
        r, phi = psi[0], psi[1]
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi)])

    def inverse_map(self, theta: Tensor) -> Tensor:
        x, y = theta[0], theta[1]
        return torch.stack([torch.sqrt(x * x + y * y), torch.atan2(y, x)])

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        return torch.stack([c * v[0] - r * s * v[1], s * v[0] + r * c * v[1]])

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        return torch.stack([c * w[0] + s * w[1], r * (c * w[1] - s * w[0])])

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        return torch.stack([c * u[0] + s * u[1], (c * u[1] - s * u[0]) * r.reciprocal()])

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        r, c, s = psi[0], torch.cos(psi[1]), torch.sin(psi[1])
        ir = r.reciprocal()
        return torch.stack([c * z[0] - s * z[1] * ir, s * z[0] + c * z[1] * ir])

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return psi[0].abs().log()


class Sinh(Elementwise):
    """θ = s · sinh(a ψ) / a + c elementwise (a smooth nonlinear bijection of ℝ).

    f'(ψ) = s cosh(a ψ) and f⁻¹(θ) = asinh(a (θ − c) / s) / a. Numbers (Python numbers
    included) are stored with ``torch.as_tensor`` and cast to each point's dtype when used.

    Parameters
    ----------
    a, s, c : Tensor or float
        Curvature (> 0), scale (nonzero) and shift, per coordinate or shared.

    Example
    -------
    >>> import torch
    >>> h = Sinh(1.5, 2.0, 0.25)
    >>> psi = torch.tensor([-0.4, 0.0, 1.2], dtype=torch.float64)
    >>> bool(torch.allclose(h.inverse(h(psi)), psi))
    True
    >>> bool(torch.allclose(h.jacobian(psi), torch.func.jacfwd(h.forward)(psi)))
    True
    """

    def __init__(self, a: Tensor | float = 1.0, s: Tensor | float = 1.0,
                 c: Tensor | float = 0.0) -> None:
        self.a, self.s, self.c = (torch.as_tensor(x) for x in (a, s, c))
        if not bool((self.a > 0).all()) or bool((self.s == 0).any()):
            raise DomainError(
                f"Sinh: needs a > 0 and s != 0 (else it is not a bijection), got a={a!r}, s={s!r}"
            )

    def _abc(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t.to(dtype=x.dtype, device=x.device) for t in (self.a, self.s, self.c))

    def forward(self, psi: Tensor) -> Tensor:
        a, s, c = self._abc(psi)
        return s * torch.sinh(a * psi) / a + c

    def inverse_map(self, theta: Tensor) -> Tensor:
        a, s, c = self._abc(theta)
        return torch.asinh(a * (theta - c) / s) / a

    def derivative(self, psi: Tensor) -> Tensor:
        a, s, _ = self._abc(psi)
        return (s * torch.cosh(a * psi)).expand_as(psi)


class Cubic(Elementwise):
    """θ = ψ + c ψ³ elementwise (c > 0): a nonlinear bijection of ℝ.

    f'(ψ) = 1 + 3 c ψ², and the inverse is Cardano's root of x³ + P x + Q = 0 with P = 1/c,
    Q = −θ/c (one real root since P > 0).

    Example
    -------
    >>> import torch
    >>> h = Cubic(0.3)
    >>> psi = torch.tensor([-1.5, 0.2, 2.0], dtype=torch.float64)
    >>> bool(torch.allclose(h.inverse(h(psi)), psi))
    True
    >>> float(h.log_abs_det_jacobian(torch.zeros(2, dtype=torch.float64)))
    0.0
    """

    def __init__(self, c: float = 0.3) -> None:
        self.c = float(c)
        if not self.c > 0:
            raise DomainError(f"Cubic: needs c > 0 (else it is not a bijection), got {c!r}")

    def forward(self, psi: Tensor) -> Tensor:
        return psi + self.c * psi**3

    def derivative(self, psi: Tensor) -> Tensor:
        return 1 + 3 * self.c * psi**2

    def inverse_map(self, theta: Tensor) -> Tensor:
        # x³ + P x + Q = 0 with P = 1/c, Q = −θ/c has one real root (P > 0)
        P, Q = 1.0 / self.c, -theta / self.c
        s = torch.sqrt(Q**2 / 4 + P**3 / 27)

        def cbrt(z: Tensor) -> Tensor:
            return torch.sign(z) * z.abs() ** (1.0 / 3.0)

        return cbrt(-Q / 2 + s) + cbrt(-Q / 2 - s)

    def __repr__(self) -> str:
        return f"Cubic({self.c:g})"
