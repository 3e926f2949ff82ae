"""``covariant reproduce {optimization,density,generalization}``: run an experiment and print
its summary (an experiment with a ``format_table(result)`` prints that table instead).

Example
-------
>>> rows = []
>>> _flatten("", {"a": {"b": 0.123456, "c": [1, 2]}}, rows)
>>> rows
[('a.b', '0.1235'), ('a.c', '[1, 2]')]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

__all__ = ["EXPERIMENTS", "print_summary", "run_reproduce"]

#: Experiment name → module with ``run(out_dir, *, quick, seed, progress)``.
EXPERIMENTS = {
    "optimization": "covariant.experiments.optimization",
    "density": "covariant.experiments.density",
    "generalization": "covariant.experiments.generalization",
}


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


def print_summary(name: str, result: dict[str, Any], out: Path, stream: Any = None) -> None:
    """A readable table of an experiment's summary numbers, and where its files went, on
    ``stream`` (default stdout)."""
    stream = sys.stdout if stream is None else stream
    rows: list[tuple[str, str]] = []
    _flatten("", result.get("summary", {k: v for k, v in result.items()
                                        if isinstance(v, int | float | str)}), rows)
    title = f"covariant reproduce {name}: summary"
    print(title, file=stream)
    print("=" * len(title), file=stream)
    width = max((len(k) for k, _ in rows), default=10) + 2
    for key, value in rows:
        print(f"{key:{width}s}{value}", file=stream)
    figures = result.get("figures") or result.get("files") or []
    if isinstance(figures, dict):
        figures = list(figures.values())
    print(f"results in {out}/" + (f": {', '.join(map(str, figures))}" if figures else ""),
          file=stream)


def run_reproduce(args: argparse.Namespace, *, progress: bool) -> int:
    """Run ``args.experiment`` into ``--out`` (default ``covariant-<name>``), print its
    summary, and with ``--json`` every number to stdout (the summary then goes to stderr, so
    that stdout is JSON alone). Returns the exit status."""
    from .._io import dumps_json

    module = importlib.import_module(EXPERIMENTS[args.experiment])
    out = args.out if args.out is not None else Path(f"covariant-{args.experiment}")
    result = module.run(out, quick=args.quick, seed=args.seed, progress=progress)
    stream = sys.stderr if args.json else sys.stdout
    if hasattr(module, "format_table"):
        print(module.format_table(result), file=stream)
        print(f"results in {out}/: {', '.join(map(str, result.get('figures', [])))}",
              file=stream)
    else:
        print_summary(args.experiment, result, out, stream)
    if args.json:
        sys.stdout.write(dumps_json(result) + "\n")
    return 0
