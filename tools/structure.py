"""Structure report of the covariant package: import graph, cycles, sizes, private access,
dynamic module attributes.

Usage: ``python tools/structure.py [--json]``. ``tests/test_structure.py`` asserts on the same
functions, so the rules of DESIGN.md (no import cycles, files ≤ 600 lines, functions ≤ 80
lines of code, no reads of another object's private attributes, no module-level
``__getattr__`` except the lazy public names of ``covariant/__init__.py``) are checked in CI.
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "covariant"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
#: The only modules allowed a module-level ``__getattr__``: the top-level package, whose
#: public names load lazily from an explicit table (Scientific Python SPEC 1).
LAZY_MODULES = ("covariant",)


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """Internal import edges, module-level and lazy (inside functions) alike."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if _in_type_checking(node, parents):
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                if base is None:
                    continue
                # ``from pkg import sub`` depends on the submodule; ``from mod import name`` on mod
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _is_package_init_edge(a: str, b: str, mods: dict[str, Path]) -> bool:
    """a package's __init__ importing its own submodule (re-exports): not a dependency."""
    return mods[a].name == "__init__.py" and b.startswith(a + ".")


def dependency_cycles() -> list[list[str]]:
    """Cycles among modules, ignoring a package's re-export of its own submodules."""
    mods = modules()
    graph = import_graph()
    pruned = {a: {b for b in bs if not _is_package_init_edge(a, b, mods)}
              for a, bs in graph.items()}
    return cycles(pruned)


@dataclass
class Sized:
    where: str
    lines: int


def file_sizes() -> list[Sized]:
    return [Sized(str(p.relative_to(SRC.parent)), len(p.read_text().splitlines()))
            for p in modules().values()]


def function_sizes() -> list[Sized]:
    """Lines of code per function, without its docstring (formula + example belong there)."""
    out = []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                doc = 0
                if body and isinstance(body[0], ast.Expr) and isinstance(
                        getattr(body[0], "value", None), ast.Constant) and isinstance(
                        body[0].value.value, str):
                    doc = body[0].end_lineno - body[0].lineno + 1
                n = node.end_lineno - node.lineno + 1 - doc
                out.append(Sized(f"{mod}.{node.name}:{node.lineno}", n))
    return out


def foreign_private_access() -> list[str]:
    """``obj._name`` on any object but ``self`` / ``cls`` / ``super()`` (dunders excluded),
    outside ``covariant._fast``: another object's internals, or torch's private API, which
    belongs in ``covariant._fast``.
    """
    hits = []
    for mod, path in modules().items():
        if mod.startswith("covariant._fast"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            v = node.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            hits.append(f"{mod}:{node.lineno}: {ast.unparse(node)}")
    return hits


def module_getattr() -> list[str]:
    """Modules that define a module-level ``__getattr__`` (names that appear at run time)."""
    out = []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
            out.append(mod)
    return out


def type_checking_imports(mod: str) -> dict[str, str]:
    """``name → defining module`` of the ``from .x import name`` lines under
    ``if TYPE_CHECKING:`` in ``mod``; ``from . import sub`` gives ``sub → mod.sub``."""
    path = modules()[mod]
    tree = ast.parse(path.read_text())
    out: dict[str, str] = {}
    for block in tree.body:
        if not (isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)):
            continue
        for node in block.body:
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                for a in node.names:
                    out[a.asname or a.name] = base if node.module else f"{base}.{a.name}"
    return out


def main() -> None:
    graph = import_graph()
    report = {
        "modules": len(graph),
        "cycles": dependency_cycles(),
        "files_over_limit": [s.__dict__ for s in file_sizes() if s.lines > MAX_FILE_LINES],
        "functions_over_limit": [s.__dict__ for s in function_sizes()
                                 if s.lines > MAX_FUNCTION_LINES],
        "foreign_private_access": foreign_private_access(),
        "module_getattr": module_getattr(),
        "tree": {s.where: s.lines for s in file_sizes()},
    }
    if "--json" in sys.argv:
        print(json.dumps(report, indent=1))
        return
    for key in ("modules", "cycles", "files_over_limit", "functions_over_limit",
                "foreign_private_access", "module_getattr"):
        val = report[key]
        print(f"{key}: {val if not isinstance(val, list) else len(val)}")
        if isinstance(val, list):
            for item in val:
                print("   ", item)


if __name__ == "__main__":
    main()
