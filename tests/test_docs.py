"""Docs that run: every ```python block in docs/*.md, and the docstring examples of every module.

Each Markdown file runs top to bottom in one namespace, as a reader would paste it. A block
that raises (or whose assert fails) fails the test.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)



def _all_modules() -> list[str]:
    """Every module of the package, found by walking it (so a new module cannot be missed)."""
    import covariant

    names = ["covariant"]
    for info in pkgutil.walk_packages(covariant.__path__, "covariant."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        names.append(info.name)
    return sorted(names)


ALL_MODULES = _all_modules()


@pytest.mark.parametrize("path", [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"],
                         ids=lambda p: p.name)
def test_markdown_examples_run(path, capsys):
    blocks = BLOCK.findall(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python examples")
    # an example that only runs shows nothing: each page checks at least one number it claims
    assert any("assert" in code for code in blocks), f"{path.name}: no example asserts a result"
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        executed = 0
        for i, code in enumerate(blocks):
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
            executed += 1
    finally:
        torch.set_default_dtype(old)
    assert executed == len(blocks)


def test_every_module_is_collected():
    assert len(ALL_MODULES) > 20 and "covariant.metrics.base" in ALL_MODULES


@pytest.mark.parametrize("name", ALL_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # examples are written for torch's default dtype
    try:
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
    finally:
        torch.set_default_dtype(old)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    assert result.attempted > 0, f"{name} has no docstring example: add one that runs"
