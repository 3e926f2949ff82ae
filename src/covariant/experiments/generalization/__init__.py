r"""Experiment: does invariant flatness predict generalization, and which measures survive an
adversary? (issue 14; ``covariant reproduce generalization``).

Modules: :mod:`.statistics` (Kendall τ, Jiang's granulated τ, the PGDL score, bootstrap
intervals), :mod:`.attacks` (function-preserving symmetries, per-model charts, the adversary),
:mod:`.measures` (the registry of generalization measures; :mod:`.measures_common` settings
and results, :mod:`.measures_spectral` the spectra of E = G⁻¹Hess, :mod:`.measures_baselines`
the literature's measures); the study: :mod:`.settings` (the grid), :mod:`.population`
(training, checkpoints, resume), :mod:`.stages` (per-model caches), :mod:`.optimizer_bias`,
:mod:`.analysis` (tables), :mod:`.figures`, :mod:`.runner` (``run(out_dir, *, quick, seed,
progress)``; docs/science.md).

Example
-------
>>> from covariant.experiments.generalization import kendall_tau
>>> kendall_tau([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
-1.0
"""

from __future__ import annotations

from .attacks import (
    ATTACKS,
    AdversaryResult,
    ModelChart,
    adversary,
    adversary_search,
    attack,
    elementwise_chart,
    layerwise_alpha,
    linear_layers,
    per_neuron,
    scale_chart,
    weight_norm_chart,
)
from .measures import (
    ALL_ATTACKS,
    DEFAULT_STRENGTHS,
    KINDS,
    MEASURES,
    GeneralizationMeasure,
    MeasureContext,
    MeasureValue,
    evaluate,
    evaluate_attacked,
    invariance_table,
)
from .runner import format_table, run
from .settings import FIGURES, JSON_NAME
from .statistics import bootstrap_ci, granulated_tau, kendall_tau, pgdl_score

__all__ = [
    "ALL_ATTACKS",
    "ATTACKS",
    "DEFAULT_STRENGTHS",
    "FIGURES",
    "JSON_NAME",
    "KINDS",
    "MEASURES",
    "AdversaryResult",
    "GeneralizationMeasure",
    "MeasureContext",
    "MeasureValue",
    "ModelChart",
    "adversary",
    "adversary_search",
    "attack",
    "bootstrap_ci",
    "elementwise_chart",
    "evaluate",
    "evaluate_attacked",
    "format_table",
    "granulated_tau",
    "invariance_table",
    "kendall_tau",
    "layerwise_alpha",
    "linear_layers",
    "per_neuron",
    "pgdl_score",
    "run",
    "scale_chart",
    "weight_norm_chart",
]
