"""The house rules of DESIGN.md, checked on the source tree (tools/structure.py).

Each rule fails on the tree it was written for before the restructure (import cycles
metrics↔curvature and flatness↔estimators, six files of 900–1500 lines, 25 reads of another
module's private attributes), so these tests can fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("structure", ROOT / "tools" / "structure.py")
structure = importlib.util.module_from_spec(_spec)
sys.modules["structure"] = structure  # dataclasses look their module up there
_spec.loader.exec_module(structure)


def test_no_import_cycles():
    assert structure.dependency_cycles() == []


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert structure.cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("kind", ["files", "functions"])
def test_sizes_within_limits(kind):
    if kind == "files":
        over = [s for s in structure.file_sizes() if s.lines > structure.MAX_FILE_LINES]
    else:
        over = [s for s in structure.function_sizes() if s.lines > structure.MAX_FUNCTION_LINES]
    assert over == []


def test_no_reads_of_another_modules_private_attributes():
    assert structure.foreign_private_access() == []


def test_private_torch_api_only_in_fast():
    hits = []
    for mod, path in structure.modules().items():
        if mod.startswith("covariant._fast"):
            continue
        text = path.read_text()
        for needle in ("torch._C", "_python_dispatch", "torch._ops", "._version"):
            if needle in text:
                hits.append((mod, needle))
    assert hits == []


def test_public_face_is_small_and_explicit():
    import covariant

    assert len(covariant.__all__) <= 60
    for name in covariant.__all__:
        assert hasattr(covariant, name), name


def test_module_getattr_only_for_the_lazy_public_names():
    # SPEC 1 lazy loading in covariant/__init__.py; nowhere else may names appear at run time
    assert structure.module_getattr() == list(structure.LAZY_MODULES)


def test_module_getattr_detection_finds_a_planted_one(tmp_path, monkeypatch):
    pkg = tmp_path / "covariant"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "bad.py").write_text("def __getattr__(name):\n    return name\n")
    monkeypatch.setattr(structure, "SRC", pkg)
    assert structure.module_getattr() == ["covariant.bad"]


def test_lazy_table_is_explicit_and_matches_the_type_checking_imports():
    """Every public name has one explicit path: the table of covariant/__init__.py, and the
    same path in its ``if TYPE_CHECKING:`` imports (what type checkers and IDEs read)."""
    import covariant

    table = {name: f"covariant.{mod}" for name, mod in covariant._NAMES.items()}
    table.update({sub: f"covariant.{sub}" for sub in covariant._SUBMODULES})
    assert structure.type_checking_imports("covariant") == table
    assert sorted(covariant.__all__) == sorted([*table, "__version__"])
