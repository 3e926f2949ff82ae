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


def _flatten(prefix: str, obj: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    elif isinstance(obj, list) and obj and all(isinstance(v, int | float) for v in obj):
        rows.append((prefix, "[" + ", ".join(_num(v) for v in obj[:8])
                     + (", …]" if len(obj) > 8 else "]")))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _flatten(f"{prefix}[{i}]", v, rows)
    else:
        rows.append((prefix, _num(obj)))


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return f"{v:.4g}"


def print_summary(name: str, result: dict[str, Any], out: Path) -> None:
    """A readable table of an experiment's summary numbers, and where its files went."""
    rows: list[tuple[str, str]] = []
    _flatten("", result.get("summary", {k: v for k, v in result.items()
                                        if isinstance(v, int | float | str)}), rows)
    title = f"covariant reproduce {name}: summary"
    print(title)
    print("=" * len(title))
    width = max((len(k) for k, _ in rows), default=10) + 2
    for key, value in rows:
        print(f"{key:{width}s}{value}")
    figures = result.get("figures") or result.get("files") or []
    if isinstance(figures, dict):
        figures = list(figures.values())
    print(f"results in {out}/" + (f": {', '.join(map(str, figures))}" if figures else ""))


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
        print_summary(args.experiment, result, out)
        if args.json:
            _emit_json(result, None, args.experiment)
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
