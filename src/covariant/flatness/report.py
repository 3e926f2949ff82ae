r"""Result types of the flatness measures: :class:`Measure` and :class:`FlatnessReport`.

A :class:`Measure` follows the project's result convention: ``value``; an error field named
for what it is, ``stderr`` (standard error of a Monte Carlo estimate: stochastic traces and
log-determinants) or ``residual`` (relative Lanczos residual of eigenpairs); ``num_matvecs``;
``converged``; ``info`` for everything else; and ``to_dict()``, which returns plain JSON-ready
Python. Its text shows "± stderr" only for Monte Carlo estimates and "(residual r)" for
eigenvalues.

Example
-------
>>> import json
>>> m = Measure("max_eig", 18.0, residual=3e-12, num_matvecs=40, method="stochastic")
>>> m
Measure(max_eig = 18 (residual 3e-12), 40 matvecs, stochastic)
>>> t = Measure("trace", 32.1, stderr=0.4, num_matvecs=200, method="stochastic")
>>> t.format()
'32.1 ± 0.4'
>>> json.loads(json.dumps(t.to_dict()))["stderr"]
0.4
>>> report = FlatnessReport({"trace": t, "max_eig": m}, {"metric": "Euclidean()"})
>>> sorted(report)
['max_eig', 'trace']
>>> print(report)
FlatnessReport(Euclidean())
  trace      32.1 ± 0.4
  max_eig    18 (residual 3e-12)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .._io import to_jsonable

__all__ = ["FlatnessReport", "Measure", "format_value"]


@dataclass(repr=False)
class Measure:
    """One curvature measure with its diagnostics.

    Attributes
    ----------
    name : str
    value : float or list of float
    stderr : float or None
        Standard error of a Monte Carlo estimate (stochastic trace and log-determinant);
        ``None`` for exact values and for eigenvalues.
    num_matvecs : int or None
        Products with the shape operator used (``None`` for the dense method).
    converged : bool
        False if an iterative method stopped before its tolerance.
    method : str
        "dense" or "stochastic".
    info : dict
        Further diagnostics (dimension and rank, sign of the determinant, per-pair Lanczos
        residuals, the estimator used, …).
    residual : float or None
        Largest relative Lanczos residual ‖E x − λ x‖_G / ρ of the eigenpairs behind the value
        (stochastic eigenvalues); ``None`` otherwise.
    vectors : Tensor or None
        Eigenvectors (tangent vectors, one per column) for "top_eigs"; not serialized.
    """

    name: str
    value: float | list[float]
    stderr: float | None = None
    num_matvecs: int | None = None
    converged: bool = True
    method: str = "dense"
    info: dict[str, Any] = field(default_factory=dict)
    residual: float | None = None
    vectors: Tensor | None = field(default=None, compare=False)

    @property
    def extras(self) -> dict[str, Any]:
        """The same dict as :attr:`info` (read-only alias)."""
        return self.info

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``vectors`` as plain JSON-ready Python.

        Tensors become lists, non-finite floats the strings "inf", "-inf", "nan".
        """
        out = {"name": self.name, "value": self.value, "stderr": self.stderr,
               "residual": self.residual, "num_matvecs": self.num_matvecs,
               "converged": self.converged, "method": self.method, "info": self.info}
        return _to_jsonable(out)

    def format(self, digits: int = 5) -> str:
        """Short text of the value with its error: "± stderr" or "(residual r)", and the
        number of null eigenvalues a pseudo-determinant leaves out."""
        text = format_value(self.value, digits)
        if self.stderr is not None:
            text += f" ± {self.stderr:.3g}"
        if self.residual is not None:
            text += f" (residual {self.residual:.3g})"
        num_null = self.info.get("num_null", 0)
        if num_null >= 0.5:  # a pseudo-determinant: say how many eigenvalues it leaves out
            count = str(num_null) if isinstance(num_null, int) else f"≈{num_null:.1f}"
            text += f" ({count} null eigenvalues left out)"
        if not self.converged:
            text += " (NOT converged)"
        return text

    def __repr__(self) -> str:
        parts = [f"{self.name} = {self.format()}"]
        if self.num_matvecs is not None:
            parts.append(f"{self.num_matvecs} matvecs")
        parts.append(self.method)
        return f"Measure({', '.join(parts)})"

    def __float__(self) -> float:
        if isinstance(self.value, list):
            raise TypeError(f"measure {self.name!r} is a list; index it")
        return float(self.value)


class FlatnessReport(Mapping[str, Measure]):
    """Measures by name: ``report["trace"].value``, ``report.to_dict()``, ``print(report)``."""

    def __init__(self, measures: dict[str, Measure], info: dict[str, Any] | None = None) -> None:
        self._measures = measures
        self.info = info or {}

    def __getitem__(self, key: str) -> Measure:
        return self._measures[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._measures)

    def __len__(self) -> int:
        return len(self._measures)

    def to_dict(self) -> dict[str, Any]:
        """``{"info": ..., name: measure.to_dict(), ...}`` as plain JSON-ready Python."""
        return {"info": _to_jsonable(self.info), **{k: m.to_dict() for k, m in self.items()}}

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def __repr__(self) -> str:
        lines = [f"FlatnessReport({self.info.get('metric', '')})"]
        lines += [f"  {k:10s} {m.format()}" for k, m in self.items()]
        return "\n".join(lines)


def format_value(value: float | list[float], digits: int = 5) -> str:
    """Short text of a value or a list of values (at most six shown).

    >>> format_value([3.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625])
    '[3, 2, 1, 0.5, 0.25, 0.125, …]'
    """
    if isinstance(value, list):
        shown = ", ".join(f"{v:.{digits}g}" for v in value[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}]"
    return f"{value:.{digits}g}"


def _to_jsonable(x: Any) -> Any:
    """JSON-ready Python; non-finite floats as the strings "inf", "-inf", "nan"."""
    return to_jsonable(x, nonfinite="string")
