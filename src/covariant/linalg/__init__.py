"""Matrix-free linear algebra on plain callables.

An *operator* here is a callable ``matvec(v) -> A v`` on flat 1-D tensors of length ``dim``.
Nothing in this package builds a ``dim × dim`` matrix. Every routine is torch-native, so it runs
in float32 or float64 on whatever device the operator's tensors live on; only the tiny projected
(Lanczos) matrices are moved to the CPU in float64, where an ``m × m`` eigendecomposition is
cheapest and most accurate.

Contents (each a small pure function, named after its method):

- :mod:`~covariant.linalg.cg`: :func:`cg`, preconditioned conjugate gradients for SPD
  systems ``A x = b``.
- :mod:`~covariant.linalg.lanczos`: :func:`lanczos`, extreme eigenpairs by thick-restart
  (Krylov-Schur) Lanczos with full reorthogonalization, optionally in a ``B``-inner product.
  With ``matvec = G⁻¹ Hess`` and ``inner_matvec = G`` this is the spectrum of the shape
  operator (docs/math.md §4).
- :mod:`~covariant.linalg.nystrom`: :func:`nystrom`, the randomized Nyström approximation of a
  PSD operator, and :class:`NystromPreconditioner`, the preconditioner of ``A + μI`` it gives.
- :mod:`~covariant.linalg.pinv`: :func:`pinv_solve`, ``A⁺ b`` for a positive semi-definite
  ``A`` by Lanczos on the range.
- :mod:`~covariant.linalg.trace`: :func:`hutchinson`, :func:`hutchpp`, :func:`xtrace`,
  stochastic trace estimators with standard errors.
- :mod:`~covariant.linalg.slq`: :func:`slq`, stochastic Lanczos quadrature for ``tr f(A)``
  (log-determinants), and :func:`spectral_density`, :func:`dense_spectral_density`,
  Gaussian-broadened spectral densities.
- :mod:`~covariant.linalg.probes`: the random probes.
- :mod:`~covariant.linalg.results`: the result types, each with ``to_dict()``.

Randomness is drawn from a CPU :class:`torch.Generator` seeded with ``seed`` and then moved to
the target device, so that a seed gives the same probes on every device.

Example
-------
>>> import torch
>>> from covariant.linalg import cg, hutchinson
>>> g = torch.Generator().manual_seed(0)
>>> X = torch.randn(20, 20, generator=g, dtype=torch.float64)
>>> A = X @ X.T + 20 * torch.eye(20, dtype=torch.float64)  # SPD
>>> cg(lambda v: A @ v, torch.ones(20, dtype=torch.float64)).converged
True
>>> est = hutchinson(lambda v: A @ v, 20, 100)
>>> abs(est.value - float(A.trace())) < 3 * est.stderr
True
"""

from __future__ import annotations

from ._common import Matmat, Matvec
from .cg import cg
from .lanczos import lanczos
from .nystrom import NystromApproximation, NystromPreconditioner, nystrom
from .pinv import pinv_solve
from .probes import Distribution
from .results import CGResult, EigResult, PinvSolveResult, SLQResult, TraceEstimate
from .slq import dense_spectral_density, slq, spectral_density
from .trace import hutchinson, hutchpp, xtrace

__all__ = [
    "CGResult",
    "Distribution",
    "EigResult",
    "Matmat",
    "Matvec",
    "NystromApproximation",
    "NystromPreconditioner",
    "PinvSolveResult",
    "SLQResult",
    "TraceEstimate",
    "cg",
    "dense_spectral_density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "nystrom",
    "pinv_solve",
    "slq",
    "spectral_density",
    "xtrace",
]
