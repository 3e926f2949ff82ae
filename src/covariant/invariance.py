r"""Checking invariance: evaluate a quantity in several charts and compare.

``check_invariance(fn, space, p)`` evaluates ``fn(space, p)`` in the original chart and in
each given (or random) chart, at the same point ψ = h⁻¹(p), and reports the largest relative
deviation. An invariant quantity (the spectrum of G⁻¹Hess) passes; a chart-dependent one (the
spectrum of ∇²L with the metric dropped) fails.

Example
-------
>>> import torch, covariant as cv
>>> space = cv.ParameterSpace(lambda p: (p**4).sum() + p[0] * p[1])
>>> p = torch.tensor([0.3, -0.5], dtype=torch.float64)
>>> trace = lambda s, q: cv.flatness(s, q, measures=("trace",))["trace"].value
>>> cv.check_invariance(trace, space, p).passed
True
>>> naive = lambda s, q: cv.flatness(s.with_metric(cv.metrics.Euclidean()), q,
...                                  measures=("trace",))["trace"].value
>>> cv.check_invariance(naive, space, p).passed
False
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .diagnostics import CheckResult, check_chart, check_gradient, check_hessian, check_metric
from .reparam import Affine, Compose, Reparametrization, Sinh
from .space import ParameterSpace

__all__ = [
    "CheckResult",
    "InvarianceReport",
    "check_chart",
    "check_gradient",
    "check_hessian",
    "check_invariance",
    "check_metric",
    "random_charts",
]


def random_charts(
    dim: int, num: int = 3, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> list[Reparametrization]:
    """Random well-conditioned charts of ℝ^dim: affine, elementwise sinh, and their composition."""
    gen = torch.Generator().manual_seed(seed)
    charts: list[Reparametrization] = []
    for i in range(num):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))
        scales = torch.exp(torch.empty(dim, dtype=dtype).uniform_(-1.0, 1.0, generator=gen))
        affine = Affine(q * scales, torch.randn(dim, generator=gen, dtype=dtype) * 0.3)
        sinh = Sinh(
            torch.empty(dim, dtype=dtype).uniform_(0.5, 1.5, generator=gen),
            torch.exp(torch.empty(dim, dtype=dtype).uniform_(-1.0, 1.0, generator=gen)),
            torch.randn(dim, generator=gen, dtype=dtype) * 0.3,
        )
        charts.append([affine, sinh, Compose(affine, sinh)][i % 3])
    return charts


@dataclass
class InvarianceReport:
    """Values of a quantity in each chart and their largest relative deviation."""

    values: dict[str, Any]
    max_rel_deviation: float
    rtol: float
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = bool(self.max_rel_deviation <= self.rtol)

    def to_dict(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            return v.tolist() if isinstance(v, Tensor) else v

        return {"values": {k: conv(v) for k, v in self.values.items()},
                "max_rel_deviation": self.max_rel_deviation, "rtol": self.rtol,
                "passed": self.passed}


def _as_tensor(x: Any) -> Tensor:
    if hasattr(x, "value"):
        x = x.value
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


def check_invariance(
    fn: Callable[[ParameterSpace, Tensor], Any],
    space: ParameterSpace,
    p: Tensor,
    reparams: Sequence[Reparametrization] | None = None,
    rtol: float = 1e-8,
    *,
    num_random: int = 3,
    seed: int = 0,
) -> InvarianceReport:
    """Evaluate ``fn(space, p)`` in the original chart and in each chart, and compare.

    Parameters
    ----------
    fn : callable
        ``fn(space, point)`` returning a number, a tensor, a list or a Measure.
    reparams : sequence of Reparametrization, optional
        Charts θ = h(ψ) to try; ``num_random`` random ones (:func:`random_charts`) if None.
    rtol : float
        Pass threshold for max |f_chart − f_orig| / max(|f_orig|, tiny).

    Returns
    -------
    InvarianceReport
    """
    if reparams is None:
        reparams = random_charts(p.shape[0], num_random, seed=seed, dtype=p.dtype)
    reference = _as_tensor(fn(space, p))
    values: dict[str, Any] = {"original": reference}
    worst = 0.0
    scale = float(reference.abs().max()) if reference.numel() else 1.0
    scale = max(scale, torch.finfo(torch.float64).tiny)
    for i, h in enumerate(reparams):
        new = space.reparametrize(h)
        psi = h.inverse(p)
        val = _as_tensor(fn(new, psi))
        values[f"{i}: {h!r}"] = val
        if val.shape != reference.shape:
            worst = float("inf")
            continue
        worst = max(worst, float((val - reference).abs().max()) / scale)
    return InvarianceReport(values, worst, rtol)
