"""Typed errors of covariant.

Every error names the offending parameter and says how to fix the problem. They all derive
from :class:`CovariantError`, and each also derives from the closest built-in exception so
that ``except ValueError`` keeps working for callers who do not know about covariant.

Example
-------
>>> import torch, covariant as cv
>>> try:
...     cv.reparam.Exp().inverse(torch.tensor([-1.0]))
... except cv.errors.DomainError as err:
...     print(type(err).__name__)
DomainError
"""

from __future__ import annotations

__all__ = [
    "ArchitectureMismatchError",
    "CheckpointError",
    "CovariantError",
    "DenseTooLargeError",
    "DistributedError",
    "DomainError",
    "MissingDependencyError",
    "NonFiniteError",
    "NotABijectionError",
    "NotAModeError",
    "NotConvergedError",
    "ShapeMismatchError",
    "SingularMetricError",
    "TaylorUnsupportedError",
    "UnsupportedStructureError",
]


class CovariantError(Exception):
    """Base class of every error raised by covariant."""


class DistributedError(CovariantError, RuntimeError):
    """A data-parallel computation cannot run as launched: no ``torch.distributed`` process
    group (start with ``torchrun`` or call ``torch.distributed.init_process_group``), ranks
    that disagree about the model, parameters or settings, or a product that the
    data-parallel space does not reduce yet."""


class DomainError(CovariantError, ValueError):
    """A point lies outside the domain of a chart (e.g. ``log`` of a negative number)."""


class NonFiniteError(CovariantError, FloatingPointError):
    """A point, loss, gradient or metric contains NaN or Inf."""


class ShapeMismatchError(CovariantError, ValueError):
    """A tensor does not have the shape the parameter or chart expects."""


class SingularMetricError(CovariantError, ValueError):
    """A metric is singular where its inverse is needed.

    The fix is either damping that keeps invariance (``metrics.Damped(G, lam, reference=...)``)
    or the pseudo-inverse on the horizontal space of a submersion chart (docs/math.md §5).
    """


class DenseTooLargeError(CovariantError, MemoryError):
    """A dense matrix was requested for a space too large to hold it."""


class NotABijectionError(CovariantError, ValueError):
    """An operation needs a bijective chart (e.g. ``log|det J|``) but got a submersion."""


class NotConvergedError(CovariantError, RuntimeError):
    """An iterative solver or estimator did not reach its tolerance."""


class ArchitectureMismatchError(CovariantError, ValueError):
    """A checkpoint does not fit the architecture it is loaded into."""


class CheckpointError(CovariantError, ValueError):
    """A checkpoint file cannot be read: empty, truncated, corrupted (its checksum or a zip
    CRC does not match), not written by ``torch.save``, or holding objects that
    ``torch.load(..., weights_only=True)`` refuses (such as a whole pickled module)."""


class UnsupportedStructureError(CovariantError, NotImplementedError):
    """A structure covariant cannot analyse as given: a Laplace structure it does not implement
    (e.g. ``"kron"``), or a model whose forward is random or updates state in training mode
    (dropout, batch norm with running statistics: call ``model.eval()``)."""


class NotAModeError(CovariantError, ValueError):
    """The Hessian at the expansion point is not positive definite: it is not a local mode."""


class MissingDependencyError(CovariantError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class TaylorUnsupportedError(CovariantError):
    """The traced loss uses an operation that has no second-order Taylor rule here.

    Raised by ``QuadraticForm`` (Taylor-mode quadratic forms); ``flatness`` then falls back
    to Hessian-vector products unless ``quadratic_forms="taylor"`` was asked for.
    """


def require(module: str, extra: str):
    """Import an optional dependency lazily, with a helpful error if it is missing.

    Parameters
    ----------
    module : str
        Module to import, e.g. ``"matplotlib.pyplot"``.
    extra : str
        The covariant extra that provides it, e.g. ``"plots"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module!r} is needed here but is not installed. "
            f"Install it with: pip install 'covariant[{extra}]'"
        ) from err
