r"""Experiment: does invariant flatness predict generalization, and which measures survive an
adversary? (issue 14; ``covariant reproduce generalization``).

Modules: :mod:`.statistics` (Kendall τ, Jiang's granulated τ, the PGDL score, bootstrap
intervals), :mod:`.attacks` (function-preserving symmetries, per-model charts, the adversary),
:mod:`.measures` (the registry of generalization measures).

Example
-------
>>> from covariant.experiments.generalization import kendall_tau
>>> kendall_tau([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
-1.0
"""

from __future__ import annotations

from .statistics import bootstrap_ci, granulated_tau, kendall_tau, pgdl_score

__all__ = ["bootstrap_ci", "granulated_tau", "kendall_tau", "pgdl_score"]
