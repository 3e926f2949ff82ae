"""Result types of the matrix-free solvers and estimators.

Every result follows one convention: the answer (``value`` for a scalar estimate, ``x`` for a
solve, ``eigenvalues`` / ``eigenvectors`` for eigenpairs); an error field named for what it
is (``stderr`` for Monte Carlo estimates, ``residual`` for solves and eigenpairs);
``num_matvecs``; ``converged``; ``info`` (a dict) for anything else; and ``to_dict()``, which
returns plain JSON-ready Python: tensors become (nested) lists, NaN and ±Inf become ``None``.

Example
-------
>>> import json, torch
>>> est = TraceEstimate(value=3.0, stderr=0.5, num_matvecs=2,
...                     samples=torch.tensor([2.5, 3.5], dtype=torch.float64))
>>> est.to_dict()["samples"]
[2.5, 3.5]
>>> json.loads(json.dumps(est.to_dict()))["value"] == est.value
True
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from .._io import to_jsonable

__all__ = ["CGResult", "EigResult", "PinvSolveResult", "SLQResult", "TraceEstimate"]


def _jsonable(x: Any) -> Any:
    return to_jsonable(x, nonfinite="null")


class _ToDict:
    """``to_dict()`` for a dataclass: each field, converted by :func:`_jsonable`."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready Python (tensors as lists, NaN/Inf as ``None``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass
class CGResult(_ToDict):
    """Result of :func:`~covariant.linalg.cg`.

    Attributes
    ----------
    x : Tensor
        The approximate solution of ``A x = b``.
    num_iters : int
        CG iterations taken (one operator application each).
    residual : float
        Euclidean norm ``‖b − A x‖`` of the final residual. When ``converged`` is True it was
        recomputed from ``x`` (not the recursively updated residual).
    converged : bool
        Whether ``residual <= max(rtol·‖b‖, atol)``.
    num_matvecs : int
        Operator applications in total (iterations plus residual checks).
    info : dict
        Further diagnostics (empty by default).
    """

    x: Tensor
    num_iters: int
    residual: float
    converged: bool
    num_matvecs: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def residual_norm(self) -> float:
        """The same as :attr:`residual` (read-only alias)."""
        return self.residual


@dataclass
class EigResult(_ToDict):
    """Result of :func:`~covariant.linalg.lanczos`.

    Attributes
    ----------
    eigenvalues : Tensor
        Ritz values, shape ``(k,)`` (``(2k,)`` for ``which="both"``), sorted descending.
    eigenvectors : Tensor
        Ritz vectors as columns, shape ``(dim, len(eigenvalues))``, orthonormal in the inner
        product ``⟨x, y⟩_B = xᵀ B y`` (the Euclidean one when no ``inner_matvec`` is given).
    residual : Tensor
        Relative residuals ``‖A x − λ x‖_B / ρ`` per pair, recomputed with the operator, where
        ``ρ`` is the largest Ritz value in magnitude (an estimate of ``‖A‖``).
    converged : bool
        Whether every returned pair has ``residual <= tol``.
    num_matvecs : int
        Applications of ``matvec`` (including the final residual checks).
    num_inner_matvecs : int
        Applications of ``inner_matvec`` (0 without one).
    num_restarts : int
        Thick restarts performed.
    info : dict
        Further diagnostics (empty by default).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual: Tensor
    converged: bool
    num_matvecs: int
    num_inner_matvecs: int = 0
    num_restarts: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def residuals(self) -> Tensor:
        """The same as :attr:`residual` (read-only alias)."""
        return self.residual


@dataclass
class PinvSolveResult(_ToDict):
    """Result of :func:`~covariant.linalg.pinv_solve`.

    Attributes
    ----------
    x : Tensor
        The approximate pseudo-inverse solution ``A⁺ b``.
    num_iters : int
        Lanczos steps taken (one operator application each).
    residual : float
        ``β_k |y_k|``, the norm of the part of ``A x − b`` outside the Krylov basis (the
        Lanczos residual estimate; the dropped null-space part of ``b`` is not counted).
    converged : bool
        Whether the stopping test passed (or the Krylov space became invariant).
    num_matvecs : int
        Operator applications (equal to ``num_iters``).
    rank : int
        Ritz values kept (above ``rank_rtol · max |θ|``) in the last projected solve.
    info : dict
        Further diagnostics (empty by default).
    """

    x: Tensor
    num_iters: int
    residual: float
    converged: bool
    num_matvecs: int
    rank: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceEstimate(_ToDict):
    """Result of a stochastic trace estimator.

    Attributes
    ----------
    value : float
        The estimate of ``tr A``; equal to ``samples.mean()``.
    stderr : float
        Standard error of ``value``: ``samples.std() / sqrt(len(samples))``. NaN with a single
        sample, 0.0 when the trace was computed exactly.
    num_matvecs : int
        Operator applications used.
    samples : Tensor
        The exchangeable per-probe estimates whose mean is ``value``.
    converged : bool
        Always True: the estimators have no stopping test; ``stderr`` is their error.
    info : dict
        Further diagnostics (empty by default).
    """

    value: float
    stderr: float
    num_matvecs: int
    samples: Tensor
    converged: bool = True
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SLQResult(_ToDict):
    """Result of :func:`~covariant.linalg.slq`.

    Attributes
    ----------
    value : float
        Estimate of ``tr f(A)``; ``value = dim · mean_l Σ_j weights[l, j] · f(nodes[l, j])``.
    stderr : float
        Standard error over probes (NaN with a single probe).
    num_matvecs : int
        Applications of ``matvec``.
    nodes : Tensor
        Ritz values, shape ``(num_probes, num_steps)``. When a probe's Krylov space became
        invariant early its trailing entries repeat a valid node and carry zero weight.
    weights : Tensor
        Quadrature weights of the same shape; each row sums to ``‖z‖²/dim`` (exactly 1 for
        Rademacher probes).
    samples : Tensor
        Per-probe estimates of ``tr f(A)``, shape ``(num_probes,)``.
    num_inner_matvecs : int
        Applications of ``inner_matvec`` (0 without one).
    converged : bool
        Always True: SLQ runs a fixed number of steps; ``stderr`` is its sampling error.
    info : dict
        Further diagnostics (empty by default).
    residuals : Tensor or None
        Residual bound of each Ritz pair, same shape as ``nodes``: ``β_m |Y_{mj}|`` (in the
        ``B``-norm for a generalized problem), so that an eigenvalue of the operator lies
        within ``residuals[l, j]`` of ``nodes[l, j]``. Zero where a probe's Krylov space became
        invariant.
    """

    value: float
    stderr: float
    num_matvecs: int
    nodes: Tensor
    weights: Tensor
    samples: Tensor
    num_inner_matvecs: int = 0
    converged: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    residuals: Tensor | None = None
