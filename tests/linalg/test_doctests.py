"""The docstring examples of every covariant.linalg module run and pass.

tests/test_docs.py runs those of the package ``covariant.linalg`` itself; doctest skips
functions re-exported from submodules, so each submodule is run here.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = [
    "covariant.linalg._common",
    "covariant.linalg.cg",
    "covariant.linalg.lanczos",
    "covariant.linalg.pinv",
    "covariant.linalg.probes",
    "covariant.linalg.results",
    "covariant.linalg.slq",
    "covariant.linalg.trace",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # examples are written for torch's default dtype
    try:
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(module, optionflags=flags)
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
