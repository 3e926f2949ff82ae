"""Names that the command line needs before anything heavy is imported.

This module imports nothing (no torch, no NumPy), so ``covariant --help`` can build its
parser from these lists; the modules that implement them import them from here, so each list
has one home.

Example
-------
>>> "ggn" in METRIC_NAMES
True
"""

from __future__ import annotations

__all__ = ["METRIC_NAMES"]

#: Metrics that :func:`covariant.metrics.metric_from_name` builds by name.
METRIC_NAMES = ("euclidean", "ggn", "fisher", "empirical_fisher", "kfac", "ekfac")
