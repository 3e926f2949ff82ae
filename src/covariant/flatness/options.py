r"""Settings of the stochastic flatness measures, as one frozen value.

:class:`StochasticOptions` groups every setting of ``flatness(..., method="stochastic")``:
probe counts, the trace estimator, Lanczos and stochastic Lanczos quadrature (SLQ) settings.
It can be built once, passed around, and varied with :func:`dataclasses.replace`. The loose
keywords of :func:`covariant.flatness` (``num_probes=..., seed=...``) map onto its fields by
:func:`resolve_options`.

``num_probes`` has one meaning, the number of random probe vectors. The other estimators take
their own counts, with defaults derived from it:

- Hutch++ and XTrace spend a budget of ``num_matvecs`` operator products
  (default: ``num_probes``);
- SLQ uses ``slq_probes`` probes (default: ``max(4, num_probes // 10)``).

Example
-------
>>> opts = StochasticOptions(num_probes=200, seed=1)
>>> opts.trace_num_matvecs(), opts.slq_num_probes()
(200, 20)
>>> StochasticOptions(num_probes=20).slq_num_probes()   # never fewer than 4 SLQ probes
4
>>> resolve_options(opts, {"slq_probes": 7}).slq_num_probes()
7
>>> resolve_options(None, {"num_probe": 3})
Traceback (most recent call last):
...
TypeError: flatness: unknown option(s) ['num_probe'] for method='stochastic'; ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import Tensor

__all__ = ["QUADRATIC_FORMS", "TRACE_METHODS", "StochasticOptions", "resolve_options"]

TRACE_METHODS = ("hutchinson", "hutchpp", "xtrace")
QUADRATIC_FORMS = ("auto", "taylor", "hvp")


@dataclass(frozen=True)
class StochasticOptions:
    """Settings of the matrix-free, stochastic flatness measures.

    Every field has the default that ``flatness(..., method="stochastic")`` uses when it is
    not given.
    """

    num_probes: int = 100
    """Number of random probe vectors of Hutchinson's trace estimator; also the default of
    ``num_matvecs`` and, divided by 10 (at least 4), of ``slq_probes``."""

    seed: int = 0
    """Seed of every random draw (probes, Lanczos start vectors): a seed gives the same
    numbers on every run and device."""

    progress: bool = False
    """Show a tqdm progress bar (needs the optional ``tqdm``)."""

    trace_method: str = "hutchinson"
    """"hutchinson" (unbiased, any square E), "hutchpp" (Hutch++, Meyer et al. 2021, any
    square E) or "xtrace" (XTrace, Epperly et al. 2024; symmetric operators only, so the
    Euclidean metric only)."""

    num_matvecs: int | None = None
    """Operator products Hutch++ and XTrace may spend; ``None``: ``num_probes``."""

    quadratic_forms: str = "auto"
    """How Hutchinson's trace of a Euclidean Hessian gets zᵀ∇²L z: "taylor" by second-order
    Taylor mode (``covariant._fast.QuadraticForm``; raises if the loss uses an operation
    without a rule), "hvp" by Hessian-vector products, "auto" Taylor mode when the loss
    traces and products otherwise. ``info["products"]`` says which was used."""

    lanczos_steps: int | None = None
    """Lanczos basis size for max_eig / min_eig / top_eigs (``None``: the Lanczos default)."""

    lanczos_tol: float | None = None
    """Relative residual tolerance of Lanczos (``None``: the Lanczos default)."""

    max_restarts: int = 30
    """Thick restarts allowed to Lanczos."""

    require_convergence: bool = False
    """Raise :class:`~covariant.errors.NotConvergedError` instead of returning
    ``converged=False`` when Lanczos stops before its tolerance."""

    slq_probes: int | None = None
    """Probes of stochastic Lanczos quadrature (logdet, spectral_density);
    ``None``: ``max(4, num_probes // 10)``."""

    slq_steps: int = 40
    """Lanczos steps per SLQ probe (at most the dimension)."""

    density_grid: Tensor | None = None
    """Grid of the spectral density; ``None``: 400 points spanning the Ritz values with 5%
    padding."""

    density_sigma: float | None = None
    """Gaussian width of the spectral density; ``None``: 1% of the grid's span."""

    batch_size: int | None = None
    """Probes per batched product (Hutchinson with a batched operator, SLQ);
    ``None``: the estimator's default."""

    in_chart: bool = False
    """For a space made by ``reparametrize`` with the pulled-back metric: ``False`` computes
    the measures in the parent chart, where the tensor rules make them equal (eigenvectors
    lifted back with J⁺); ``True`` computes every product in this chart (the generic path).
    ``info["computed_in"]`` says which was used."""

    def __post_init__(self) -> None:
        if self.trace_method not in TRACE_METHODS:
            raise ValueError(f"flatness: trace_method must be hutchinson, hutchpp or xtrace, "
                             f"got {self.trace_method!r}")
        if self.quadratic_forms not in QUADRATIC_FORMS:
            raise ValueError(f"flatness: quadratic_forms must be 'auto', 'taylor' or 'hvp', "
                             f"got {self.quadratic_forms!r}")

    def trace_num_matvecs(self) -> int:
        """The product budget of Hutch++ / XTrace: ``num_matvecs``, else ``num_probes``."""
        return self.num_probes if self.num_matvecs is None else self.num_matvecs

    def slq_num_probes(self) -> int:
        """The SLQ probe count: ``slq_probes``, else ``max(4, num_probes // 10)``."""
        return self.slq_probes or max(4, self.num_probes // 10)


OPTION_NAMES = tuple(f.name for f in fields(StochasticOptions))


def resolve_options(options: StochasticOptions | None,
                    kwargs: Mapping[str, Any]) -> StochasticOptions:
    """``options`` (default: ``StochasticOptions()``) with the loose keywords ``kwargs`` set.

    Raises ``TypeError`` naming the valid options for a keyword that is not a field.
    """
    if options is not None and not isinstance(options, StochasticOptions):
        raise TypeError(f"flatness: options must be a StochasticOptions, got "
                        f"{type(options).__name__}")
    unknown = [name for name in kwargs if name not in OPTION_NAMES]
    if unknown:
        raise TypeError(f"flatness: unknown option(s) {unknown} for method='stochastic'; "
                        f"valid are {list(OPTION_NAMES)}")
    base = StochasticOptions() if options is None else options
    return replace(base, **kwargs) if kwargs else base
