"""The two nonlinear charts of the 2-D parts: h = φ⁻¹ of MATH.md §8 and polar coordinates.

Example
-------
>>> sorted(charts())
['phi', 'polar']
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reparam import Polar, Reparametrization
from ...zoo.problems import ReferenceChart

__all__ = ["PolarChart", "charts"]


class PolarChart(Polar):
    """Polar coordinates (r, φ) ↦ (r cos φ, r sin φ) with closed-form Jacobian products.

    Example
    -------
    >>> import torch
    >>> h = PolarChart()
    >>> psi = torch.tensor([2.0, 0.3], dtype=torch.float64)
    >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> bool(torch.allclose(h.jvp(psi, v), torch.func.jacfwd(h.forward)(psi) @ v))
    True
    """

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

    def __repr__(self) -> str:
        return "PolarChart()"



def charts() -> dict[str, Reparametrization]:
    """The charts by name: ``"phi"`` (MATH.md §8) and ``"polar"``."""
    return {"phi": ReferenceChart(), "polar": PolarChart()}
