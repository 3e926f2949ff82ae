"""The two nonlinear charts of the 2-D parts: h = φ⁻¹ of docs/math.md §8 and polar coordinates.

Example
-------
>>> sorted(charts())
['phi', 'polar']
"""

from __future__ import annotations

from ...reparam import Polar, Reparametrization
from ...zoo.problems import ReferenceChart

__all__ = ["charts"]


def charts() -> dict[str, Reparametrization]:
    """The charts by name: ``"phi"`` (docs/math.md §8) and ``"polar"``."""
    return {"phi": ReferenceChart(), "polar": Polar()}
