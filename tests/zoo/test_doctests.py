"""The docstring examples of covariant.zoo."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = ["covariant.zoo", "covariant.zoo.problems", "covariant.zoo.architectures",
           "covariant.zoo.checkpoints", "covariant.zoo.data", "covariant.zoo.training"]


def run_doctests(name: str) -> None:
    """Run a module's examples under torch's default dtype (as a reader would)."""
    module = importlib.import_module(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS
                                 | doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name.endswith("data"):
        pytest.importorskip("mnist1d")
        pytest.importorskip("sklearn")
    run_doctests(name)
