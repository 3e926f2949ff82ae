"""The ``covariant`` command.

- ``covariant demo``: naive vs invariant flatness on a 2-D problem and a trained MLP.
- ``covariant flatness``: measures for a saved model (``torch.load(..., weights_only=True)``).
- ``covariant reproduce {optimization,density}``: the paper's claims as experiments.

Every command prints a readable table; ``--out DIR`` writes figures there and ``--json``
writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXPERIMENTS = {
    "optimization": "covariant.experiments.optimization",
    "density": "covariant.experiments.density",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="folder for figures (and JSON)")
    p.add_argument("--json", action="store_true",
                   help="write every number as JSON (to --out, or to stdout without --out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster version")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covariant",
        description="Reparametrization-invariant geometry of neural-net parameter spaces.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"covariant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="naive vs invariant flatness under reparametrization")
    _add_common(demo)

    flat = sub.add_parser("flatness", help="curvature measures of a saved model")
    _add_common(flat)
    from .flatness_cli import add_arguments

    add_arguments(flat)

    rep = sub.add_parser("reproduce", help="the paper's claims as experiments")
    rep.add_argument("experiment", choices=sorted(EXPERIMENTS))
    _add_common(rep)
    return parser


def _emit_json(result: dict[str, Any], out: Path | None, name: str) -> None:
    if out is None:
        json.dump(result, sys.stdout, indent=2, default=_default)
        sys.stdout.write("\n")


def _default(x: Any) -> Any:
    from ._io import _default as d

    return d(x)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if args.command == "demo":
        from .experiments.demo import run

        echo = (lambda s: print(s, file=sys.stderr)) if (args.json and args.out is None) else print
        result = run(args.out, write_json=args.json, quick=args.quick, seed=args.seed,
                     progress=progress, echo=echo)
        if args.json:
            _emit_json(result, args.out, "demo")
        return 0
    if args.command == "flatness":
        from .flatness_cli import run_flatness

        return run_flatness(args, progress=progress)
    if args.command == "reproduce":
        import importlib

        module = importlib.import_module(EXPERIMENTS[args.experiment])
        out = args.out if args.out is not None else Path(f"covariant-{args.experiment}")
        result = module.run(out, quick=args.quick, seed=args.seed, progress=progress)
        if args.json:
            _emit_json(result, None, args.experiment)
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
