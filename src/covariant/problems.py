r"""Small reference problems with known answers (MATH.md §8), for docs, demos and experiments.

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
from torch.func import jacfwd

from .reparam import Reparametrization

__all__ = ["REFERENCE_POINT", "ReferenceChart", "reference_loss", "reference_phi"]

#: The non-critical point of MATH.md §8.
REFERENCE_POINT = torch.tensor([0.7, -0.4], dtype=torch.float64)


def reference_loss(p: Tensor) -> Tensor:
    """L(x, y) = (x² + 2y² − 1)² + 0.3 sin 2x + 0.1 xy."""
    x, y = p[0], p[1]
    return (x**2 + 2 * y**2 - 1) ** 2 + 0.3 * torch.sin(2 * x) + 0.1 * x * y


def reference_phi(theta: Tensor) -> Tensor:
    """ψ = φ(θ) = (x + 0.2x³, y + 0.5 sin x), a smooth bijection of the plane."""
    x, y = theta[0], theta[1]
    return torch.stack([x + 0.2 * x**3, y + 0.5 * torch.sin(x)])


class ReferenceChart(Reparametrization):
    """h = φ⁻¹: θ = h(ψ), solved by Newton's method.

    Three Newton steps from a detached solution carry exact derivatives up to third order
    (Newton's map has zero derivative in θ at the solution), so ``torch.func`` sees the exact
    Jacobian J_h = J_φ⁻¹ and its derivatives.
    """

    def forward(self, psi: Tensor) -> Tensor:
        with torch.no_grad():
            u = psi[0]
            x = u / (1 + 0.2 * u**2)
            for _ in range(50):
                x = x - (x + 0.2 * x**3 - u) / (1 + 0.6 * x**2)
            theta = torch.stack([x, psi[1] - 0.5 * torch.sin(x)])
        theta = theta.detach()
        for _ in range(3):
            theta = theta - torch.linalg.solve(jacfwd(reference_phi)(theta),
                                               reference_phi(theta) - psi)
        return theta

    def _inverse(self, theta: Tensor) -> Tensor:
        return reference_phi(theta)

    def check_psi(self, psi: Tensor) -> None:
        from .errors import ShapeMismatchError

        if psi.shape[0] != 2:
            raise ShapeMismatchError(f"ReferenceChart: needs 2 coordinates, got {psi.shape[0]}")

    check_theta = check_psi

    def __repr__(self) -> str:
        return "ReferenceChart()"
