"""The ``covariant`` argument parser and the dispatch to its subcommands.

Errors a user can fix end with ``covariant <cmd>: error: …`` on stderr and exit status 2:
bad flag values (argparse), an ``--out`` that is an existing file (checked before any
computing). Building the parser imports nothing heavy: ``covariant --help`` runs without
torch, NumPy or SciPy, which the command handlers import when they run. A closed stdout
(``covariant … --json | head``) ends quietly with status 141, as a process killed by SIGPIPE.

Example
-------
>>> args = build_parser().parse_args(["reproduce", "density", "--quick"])
>>> args.command, args.experiment, args.quick, args.seed
('reproduce', 'density', True, 0)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from . import arguments as a
from . import flatness_flags
from .reproduce import EXPERIMENTS

__all__ = ["build_parser", "main"]


#: Exit status after a closed stdout (128 + SIGPIPE, as the shell reports a process it kills).
BROKEN_PIPE = 141


def _add_common(p: argparse.ArgumentParser, quick: str = "a smaller, faster version") -> None:
    p.add_argument("--out", type=Path, default=None, help="folder for figures (and JSON)")
    p.add_argument("--json", action="store_true",
                   help="write every number as JSON (to --out, or to stdout without --out)")
    p.add_argument("--seed", type=a.seed, default=0, help="random seed, 0 <= seed < 2**64 "
                   "(default 0)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``covariant`` with its subcommands ``demo``, ``flatness``, ``reproduce``."""
    parser = argparse.ArgumentParser(
        prog="covariant",
        description="Reparametrization-invariant geometry of neural-net parameter spaces.",
    )
    parser.add_argument("--version", action="version", version=f"covariant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="naive vs invariant flatness under reparametrization",
        description="Naive vs invariant flatness on a 2-D problem and on a small trained MLP: "
                    "the naive Hessian trace changes with the chart, the invariant one does "
                    "not. Prints the tables; --out writes figures, --json every number.")
    _add_common(demo, quick="less data, fewer epochs and a smaller MLP")

    flat = sub.add_parser(
        "flatness", help="curvature measures of a saved model",
        description="Invariant (G⁻¹Hess) and naive (G = I in the chart) curvature measures of "
                    "a model saved with covariant.zoo.checkpoints.save_checkpoint (or a "
                    "state_dict with --arch).")
    _add_common(flat, quick=f"fewer examples and probes: --samples {flatness_flags.SAMPLES[1]} and "
                            f"--num-probes {flatness_flags.PROBES[1]} unless given")
    flatness_flags.add_arguments(flat)

    rep = sub.add_parser(
        "reproduce", help="the paper's claims as experiments",
        description="Run one experiment of the paper (optimization: trajectories, order of "
                    "invariance, NTK, Adam; density: MAP, Riemannian MAP, Laplace evidence; "
                    "generalization: flatness measures vs the generalization gap, attacks, "
                    "optimizer bias), "
                    "write its figures to --out (default covariant-<experiment>) and print "
                    "its summary; with --json every number goes to stdout and the table to "
                    "stderr. Interrupted runs resume from their checkpoints.")
    rep.add_argument("experiment", choices=sorted(EXPERIMENTS))
    _add_common(rep, quick="smaller problems and fewer steps, for a fast check")
    return parser


def _out_problem(out: Path | None) -> str | None:
    """Why ``--out`` cannot be used as a folder, or None."""
    if out is None or out.is_dir() or not out.exists():
        return None
    return f"--out {os.fspath(out)!r} exists and is not a directory; pass a folder"


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; its module (and torch with it) is imported only now. Under torchrun,
    ``flatness`` runs data-parallel on every rank (:mod:`covariant.cli.launch`) and the
    single-process commands run on rank 0 only."""
    from .launch import run_launched

    progress = not args.no_progress
    if args.command == "flatness":
        from .flatness import run_flatness

        return run_launched("flatness", args, lambda a, p, launch: run_flatness(
            a, progress=p, launch=launch), progress=progress, distributed=args.distributed)
    return run_launched(args.command, args, _single_process, progress=progress, group=False)


def _single_process(args: argparse.Namespace, progress: bool, launch: Any) -> int:
    """``demo`` or ``reproduce``, in this process; on a torchrun rank other than 0, nothing."""
    if launch is not None and launch.rank != 0:
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args, progress=progress)
    if args.command == "reproduce":
        from .reproduce import run_reproduce

        return run_reproduce(args, progress=progress)
    return 2  # pragma: no cover - argparse enforces the choices


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``covariant`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    problem = _out_problem(args.out)
    if problem is not None:
        print(f"covariant {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        status = _dispatch(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader closed stdout (``| head``): no traceback, and no second error when
        # Python flushes stdout at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
            pass
        return BROKEN_PIPE
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
