"""Result types of the log-determinant estimator and of MAP.

Both follow the library's one result convention: the answer in ``value``; an error field named
for what it is (``stderr`` for the Monte-Carlo log-determinant, ``grad_norm`` for MAP, how far
the result is from stationary); ``num_matvecs`` where metric products are what the work
costs; ``converged``; ``info`` (a dict) for the rest; and ``to_dict()``, which returns plain
JSON-ready Python: tensors become (nested) lists, NaN and ±Inf become ``None``.

Example
-------
>>> import json, torch
>>> est = LogDetEstimate(value=1.5, stderr=0.25, num_matvecs=40,
...                      grad=torch.tensor([0.5, -1.0], dtype=torch.float64))
>>> d = json.loads(json.dumps(est.to_dict()))
>>> d["value"] == est.value and d["grad"] == [0.5, -1.0] and d["grad_stderr"] is None
True
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from .._io import to_jsonable

__all__ = ["LogDetEstimate", "MAPResult"]


def _jsonable(x: Any) -> Any:
    return to_jsonable(x, nonfinite="null")


@dataclass
class LogDetEstimate:
    """A stochastic estimate of log det G(p) (and optionally of its gradient).

    Attributes
    ----------
    value : float
        SLQ estimate of log det G (the pseudo-log-determinant for a degenerate metric).
    stderr : float
        Its standard error over probes (NaN with a single probe).
    num_matvecs : int
        Metric products used by SLQ for ``value`` (the gradient's CG products are in
        ``info["cg_matvecs"]``).
    grad : Tensor or None
        Hutchinson + CG estimate of ∂_k log det G = tr(G⁻¹ ∂_k G), one value per coordinate.
    grad_stderr : Tensor or None
        Standard error of each gradient component (NaN with a single probe).
    converged : bool
        Whether every CG solve of the gradient estimate reached its tolerance (True without a
        gradient: SLQ runs a fixed number of steps and ``stderr`` is its error).
    info : dict
        With a gradient: ``cg_iters`` and ``cg_converged`` (one entry per probe) and
        ``cg_matvecs`` (their total).
    """

    value: float
    stderr: float
    num_matvecs: int
    grad: Tensor | None = None
    grad_stderr: Tensor | None = None
    converged: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready Python (tensors as lists, NaN/Inf as ``None``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass
class MAPResult:
    """Result of :func:`~covariant.density.map_estimate`.

    MAP's work is dense Hessians (Newton) or gradients (L-BFGS, Adam), not metric products,
    so it carries no ``num_matvecs``.

    Attributes
    ----------
    point : Tensor
        The estimate, in the space's chart.
    value : float
        The objective there: −log p (``riemannian=False``) or −log q = −log p + ½ log det G.
    converged : bool
        Whether the gradient norm reached ``tol`` (for Adam: whether it did at the end).
    num_iters : int
        Iterations (Newton steps, L-BFGS iterations or Adam steps).
    grad_norm : float
        ‖∇ objective‖ at ``point`` (the Euclidean norm in the chart's coordinates): the error
        field, how far ``point`` is from stationary.
    riemannian : bool
    method : str
    history : list of float
        Objective values along the way.
    info : dict
        ``tol`` (the gradient tolerance used), ``steps`` (the iteration budget) and
        ``logdet_method``.
    """

    point: Tensor
    value: float
    converged: bool
    num_iters: int
    grad_norm: float
    riemannian: bool
    method: str
    history: list[float] = field(default_factory=list, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready Python (tensors as lists, NaN/Inf as ``None``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
