"""The docstring examples of covariant.experiments."""

from __future__ import annotations

import pytest

from ..zoo.test_doctests import run_doctests

pytest.importorskip("matplotlib")

MODULES = [
    "covariant.experiments.demo",
    *(f"covariant.experiments.optimization{m}" for m in (
        "", ".settings", ".charts", ".toy", ".networks", ".weight_norm", ".rescaling",
        ".ggn_vs_sgd", ".runner")),
    *(f"covariant.experiments.density{m}" for m in (
        "", ".common", ".lognormal", ".map2d", ".wn_prior", ".mlp", ".evidence", ".prior",
        ".runner")),
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    run_doctests(name)
