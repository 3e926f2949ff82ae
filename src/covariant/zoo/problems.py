r"""The reference problem of docs/math.md §8, with known answers, for docs, demos, experiments
and tests.

The loss L(x, y) = (x² + 2y² − 1)² + 0.3 sin 2x + 0.1 xy with G = I in (x, y), and the chart
ψ = φ(θ) = (x + 0.2x³, y + 0.5 sin x), i.e. h = φ⁻¹. At θ = (0.7, −0.4):

- eig ∇²L = (−1.666, 7.243); the naive eig of ∇²(L∘h) = (−0.697, 8.206);
- eig G_Ψ⁻¹ Hess_Ψ = (−1.666, 7.243); tr E = 5.57746 and det E = −12.0655 in both charts.

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(reference_loss)
>>> h = ReferenceChart()
>>> psi = h.inverse(REFERENCE_POINT)
>>> round(cv.flatness(space.reparametrize(h), psi, measures=("trace",))["trace"].value, 5)
5.57746
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from ..reparam import Reparametrization

__all__ = ["REFERENCE_POINT", "ReferenceChart", "reference_h", "reference_loss", "reference_phi"]

#: The non-critical point of docs/math.md §8.
REFERENCE_POINT = torch.tensor([0.7, -0.4], dtype=torch.float64)


def reference_loss(p: Tensor) -> Tensor:
    """L(x, y) = (x² + 2y² − 1)² + 0.3 sin 2x + 0.1 xy.

    Example
    -------
    >>> float(reference_loss(torch.tensor([1.0, 0.0], dtype=torch.float64)))  # 0.3 sin 2
    0.2727892280477045
    """
    x, y = p[0], p[1]
    return (x**2 + 2 * y**2 - 1) ** 2 + 0.3 * torch.sin(2 * x) + 0.1 * x * y


def reference_phi(theta: Tensor) -> Tensor:
    """ψ = φ(θ) = (x + 0.2x³, y + 0.5 sin x), a smooth bijection of the plane.

    Example
    -------
    >>> reference_phi(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()[0]
    1.2
    """
    x, y = theta[0], theta[1]
    return torch.stack([x + 0.2 * x**3, y + 0.5 * torch.sin(x)])


def _cubic_root(u: Tensor) -> Tensor:
    """The one real root x of x + 0.2x³ = u (Cardano): x = a − 5/(3a),
    a = (2.5u + √(6.25u² + 125/27))^{1/3}."""
    a = (2.5 * u + torch.sqrt(6.25 * u * u + 125.0 / 27.0)).pow(1.0 / 3.0)
    return a - (5.0 / 3.0) * a.reciprocal()


def reference_h(psi: Tensor) -> Tensor:
    """θ = h(ψ) = φ⁻¹(ψ) in closed form: x from Cardano, y = ψ₂ − 0.5 sin x.

    Example
    -------
    >>> theta = torch.tensor([0.7, -0.4], dtype=torch.float64)
    >>> bool(torch.allclose(reference_h(reference_phi(theta)), theta, atol=1e-14))
    True
    """
    x = _cubic_root(psi[0])
    return torch.stack([x, psi[1] - 0.5 * torch.sin(x)])


class ReferenceChart(Reparametrization):
    r"""h = φ⁻¹ with φ(x, y) = (x + 0.2x³, y + 0.5 sin x), the chart of docs/math.md §8, in closed
    form.

    The cubic x + 0.2x³ = u has one real root (Cardano): with
    a = (2.5u + √(6.25u² + 125/27))^{1/3}, x = a − 5/(3a). Then θ = (x, ψ₂ − 0.5 sin x), and
    J = ∂θ/∂ψ = [[1/k, 0], [−c/k, 1]] with k = 1 + 0.6x², c = 0.5 cos x. The Jacobian
    products are closed forms (the geodesic solver calls them many times); ``torch.func``
    differentiates the closed-form ``forward`` exactly to any order.

    Example
    -------
    >>> h = ReferenceChart()
    >>> theta = torch.tensor([0.7, -0.4], dtype=torch.float64)
    >>> bool(torch.allclose(h(h.inverse(theta)), theta, atol=1e-14))
    True
    >>> v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> psi = h.inverse(theta)
    >>> bool(torch.allclose(h.jvp(psi, v), torch.func.jacfwd(h.forward)(psi) @ v))
    True
    """

    def check_psi(self, psi: Tensor) -> None:
        if psi.shape[0] != 2:
            raise ShapeMismatchError(f"ReferenceChart: needs 2 coordinates, got {psi.shape[0]}")

    check_theta = check_psi

    def forward(self, psi: Tensor) -> Tensor:
        return reference_h(psi)

    def inverse_map(self, theta: Tensor) -> Tensor:
        return reference_phi(theta)

    def _parts(self, psi: Tensor) -> tuple[Tensor, Tensor]:
        x = _cubic_root(psi[0])
        return 1.0 + 0.6 * x * x, 0.5 * torch.cos(x)

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        k, c = self._parts(psi)
        a = v[0] * k.reciprocal()
        return torch.stack([a, v[1] - c * a])

    def vjp(self, psi: Tensor, w: Tensor) -> Tensor:
        k, c = self._parts(psi)
        return torch.stack([(w[0] - c * w[1]) * k.reciprocal(), w[1]])

    def inverse_jvp(self, psi: Tensor, u: Tensor) -> Tensor:
        k, c = self._parts(psi)
        return torch.stack([u[0] * k, u[1] + c * u[0]])

    def inverse_vjp(self, psi: Tensor, z: Tensor) -> Tensor:
        k, c = self._parts(psi)
        return torch.stack([z[0] * k + c * z[1], z[1]])

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        return -torch.log(self._parts(psi)[0])

    def __repr__(self) -> str:
        return "ReferenceChart()"
