"""The docstring examples of every module of covariant.reparam run and hold."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

from covariant import reparam

MODULES = ["covariant.reparam"] + [
    f"covariant.reparam.{m.name}" for m in pkgutil.iter_modules(reparam.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # examples are written for torch's default dtype
    try:
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
