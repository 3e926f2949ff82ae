"""The docstring examples of covariant.cli."""

from __future__ import annotations

import pytest

from ..zoo.test_doctests import run_doctests

MODULES = ["covariant.cli", "covariant.cli.main", "covariant.cli.demo", "covariant.cli.reproduce",
           "covariant.cli.flatness"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    run_doctests(name)
