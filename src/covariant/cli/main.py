"""The ``covariant`` argument parser and the dispatch to its subcommands.

Example
-------
>>> args = build_parser().parse_args(["reproduce", "density", "--quick"])
>>> args.command, args.experiment, args.quick, args.seed
('reproduce', 'density', True, 0)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from . import flatness as _flatness
from .demo import run_demo
from .reproduce import EXPERIMENTS, run_reproduce

__all__ = ["build_parser", "main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="folder for figures (and JSON)")
    p.add_argument("--json", action="store_true",
                   help="write every number as JSON (to --out, or to stdout without --out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster version")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``covariant`` with its subcommands ``demo``, ``flatness``, ``reproduce``."""
    parser = argparse.ArgumentParser(
        prog="covariant",
        description="Reparametrization-invariant geometry of neural-net parameter spaces.",
    )
    parser.add_argument("--version", action="version", version=f"covariant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="naive vs invariant flatness under reparametrization")
    _add_common(demo)

    flat = sub.add_parser("flatness", help="curvature measures of a saved model")
    _add_common(flat)
    _flatness.add_arguments(flat)

    rep = sub.add_parser("reproduce", help="the paper's claims as experiments")
    rep.add_argument("experiment", choices=sorted(EXPERIMENTS))
    _add_common(rep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``covariant`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if args.command == "demo":
        return run_demo(args, progress=progress)
    if args.command == "flatness":
        return _flatness.run_flatness(args, progress=progress)
    if args.command == "reproduce":
        return run_reproduce(args, progress=progress)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
