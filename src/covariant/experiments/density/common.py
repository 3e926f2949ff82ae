"""Shared pieces of the density experiment: float64, one-thread sections, the nonlinear charts
of its 2-D parts, and figure saving.

Example
-------
>>> c = Cubic(0.3)
>>> x = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
>>> bool(torch.allclose(c.inverse(c.forward(x)), x, atol=1e-12))
True
>>> h = shear_chart()
>>> psi = torch.tensor([0.4, -0.7], dtype=torch.float64)
>>> bool(torch.allclose(h.inverse(h(psi)), psi, atol=1e-12))
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._io import save_figure
from ...errors import require
from ...reparam import Elementwise, FromFunctions, Reparametrization

__all__ = ["DT", "Cubic", "pyplot", "save_png", "shear_chart", "t", "threads"]

DT = torch.float64


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Small problems run much faster on one thread (no pool overhead); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def t(x: Any) -> Tensor:
    """``x`` as a float64 tensor."""
    return torch.as_tensor(x, dtype=DT)



class Cubic(Elementwise):
    """θ = ψ + c ψ³ elementwise (c > 0): a nonlinear bijection of ℝ (Cardano inverse)."""

    def __init__(self, c: float = 0.3) -> None:
        self.c = float(c)

    def forward(self, psi: Tensor) -> Tensor:
        return psi + self.c * psi**3

    def derivative(self, psi: Tensor) -> Tensor:
        return 1 + 3 * self.c * psi**2

    def _inverse(self, theta: Tensor) -> Tensor:
        # x³ + P x + Q = 0 with P = 1/c, Q = −θ/c has one real root (P > 0)
        P, Q = 1.0 / self.c, -theta / self.c
        s = torch.sqrt(Q**2 / 4 + P**3 / 27)

        def cbrt(z: Tensor) -> Tensor:
            return torch.sign(z) * z.abs() ** (1.0 / 3.0)

        return cbrt(-Q / 2 + s) + cbrt(-Q / 2 - s)

    def __repr__(self) -> str:
        return f"Cubic({self.c:g})"


def shear_chart() -> Reparametrization:
    """θ = (ψ₀ + ¼ψ₀³, ψ₁ + 0.1ψ₁³ + 0.6 sin ψ₀): a triangular nonlinear bijection of ℝ²."""
    c0, c1 = Cubic(0.25), Cubic(0.1)

    def fwd(psi: Tensor) -> Tensor:
        return torch.stack([c0.forward(psi[0]), c1.forward(psi[1]) + 0.6 * torch.sin(psi[0])])

    def inv(theta: Tensor) -> Tensor:
        a = c0._inverse(theta[0])
        return torch.stack([a, c1._inverse(theta[1] - 0.6 * torch.sin(a))])

    def ladj(psi: Tensor) -> Tensor:
        return torch.log(1 + 0.75 * psi[0] ** 2) + torch.log(1 + 0.3 * psi[1] ** 2)

    return FromFunctions(fwd, inv, log_abs_det_jacobian=ladj)


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (an optional dependency)."""
    mpl = require("matplotlib", "plots")
    mpl.use("Agg")
    return require("matplotlib.pyplot", "plots")



def save_png(fig: Any, path: Path, plt: Any) -> None:
    """Save ``fig`` atomically as PNG (120 dpi) and close it."""
    save_figure(fig, path, dpi=120, bbox_inches=None)
    plt.close(fig)
