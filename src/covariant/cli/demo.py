"""``covariant demo``: run :mod:`covariant.experiments.demo` and print (or write) its numbers.

Example
-------
>>> import argparse
>>> _json_to_stdout(argparse.Namespace(out=None, json=True))
True
>>> _json_to_stdout(argparse.Namespace(out="demo-out", json=True))
False
"""

from __future__ import annotations

import argparse
import sys

from .._io import dumps_json
from ..experiments.demo import run

__all__ = ["run_demo"]


def _json_to_stdout(args: argparse.Namespace) -> bool:
    """``--json`` without ``--out``: the JSON goes to stdout and the tables to stderr."""
    return bool(args.json) and args.out is None


def run_demo(args: argparse.Namespace, *, progress: bool) -> int:
    """Run the demo; with ``--json`` and no ``--out`` the JSON goes to stdout (tables to
    stderr). Returns the exit status."""
    to_stdout = _json_to_stdout(args)
    echo = (lambda s: print(s, file=sys.stderr)) if to_stdout else print
    result = run(args.out, write_json=args.json, quick=args.quick, seed=args.seed,
                 progress=progress, echo=echo)
    if to_stdout:
        sys.stdout.write(dumps_json(result) + "\n")
    return 0
