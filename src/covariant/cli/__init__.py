"""The ``covariant`` command.

- ``covariant demo``: naive vs invariant flatness on a 2-D problem and a trained MLP;
- ``covariant flatness``: measures for a saved model (``torch.load(..., weights_only=True)``);
- ``covariant reproduce {optimization,density,generalization}``: the paper's claims as
  experiments.

Every command prints a readable table; ``--out DIR`` writes figures there and ``--json``
writes every number as JSON. :func:`main` is the console entry point.

Example
-------
>>> build_parser().parse_args(["demo", "--quick", "--json"]).command
'demo'
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
