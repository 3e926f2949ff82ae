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
from ...reparam import Cubic, FromFunctions, Reparametrization

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



def shear_chart() -> Reparametrization:
    """θ = (ψ₀ + ¼ψ₀³, ψ₁ + 0.1ψ₁³ + 0.6 sin ψ₀): a triangular nonlinear bijection of ℝ²."""
    c0, c1 = Cubic(0.25), Cubic(0.1)

    def fwd(psi: Tensor) -> Tensor:
        return torch.stack([c0.forward(psi[0]), c1.forward(psi[1]) + 0.6 * torch.sin(psi[0])])

    def inv(theta: Tensor) -> Tensor:
        a = c0.inverse(theta[:1])[0]
        return torch.stack([a, c1.inverse((theta[1] - 0.6 * torch.sin(a))[None])[0]])

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
