"""Compare two JSON result files number by number, ignoring timing keys.

Usage: ``python tools/compare_json.py BEFORE.json AFTER.json``. Prints the number of
differences, the largest relative difference of floats, and the worst fifteen. Used to show
that a restructuring leaves every number of ``covariant demo --json``, ``covariant reproduce
... --json`` and the benchmarks' JSON unchanged.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

IGNORED = ("seconds", "time", "timing", "time_s", "timings_s", "files", "figures", "elapsed",
           "wall", "machine", "versions", "sources", "date", "out")


def walk(a: Any, b: Any, path: str, out: list[tuple]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append((path, "keys differ", sorted(set(a) ^ set(b))))
        for k in a:
            if k in b and not any(k == i or k.startswith(i) for i in IGNORED):
                walk(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append((path, "length", len(a), len(b)))
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            walk(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        if a != b and not (math.isnan(a) and math.isnan(b)):
            out.append((path, abs(a - b) / max(abs(a), abs(b), 1e-300), a, b))
    elif a != b:
        out.append((path, "differs", a, b))


def main() -> None:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    out: list[tuple] = []
    walk(a, b, "", out)
    print(f"{len(out)} differences")
    rel = [o[1] for o in out if isinstance(o[1], float)]
    if rel:
        print(f"max relative difference {max(rel):.3e}")
    for o in sorted(out, key=lambda o: -o[1] if isinstance(o[1], float) else 0)[:15]:
        print("  ", o)


if __name__ == "__main__":
    main()
