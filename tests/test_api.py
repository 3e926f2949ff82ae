"""The public names of docs/api.md are a contract: each resolves, and the central example gives
its closed-form numbers (trace of G⁻¹Hess is chart-independent; the naive one is not)."""

from __future__ import annotations

import importlib

import pytest
import torch

import covariant as cv

CONTRACT = {
    "covariant.reparam": ["Reparametrization", "FromFunctions", "Exp", "Softplus", "Scale",
                          "Affine", "WeightNorm", "Polar", "Compose", "from_parametrization",
                          "from_transform"],
    "covariant.metrics": ["Metric", "Euclidean", "Constant", "Diagonal", "Dense", "Pullback",
                          "GGN", "Fisher", "EmpiricalFisher", "AdamMetric", "Damped"],
    "covariant.optim": ["RiemannianGD", "riemannian_gd", "gradient_flow"],
    "covariant.density": ["pushforward_log_prob", "riemannian_log_prob", "map_estimate"],
    "covariant.laplace": ["laplace", "posterior_space"],
    "covariant": ["ParameterSpace", "flatness", "check_invariance", "check_gradient",
                  "check_hessian", "check_chart"],
}
SPACE_METHODS = ["loss", "grad", "riemannian_grad", "hvp", "hessian", "christoffel",
                 "shape_operator", "exp", "reparametrize", "with_metric", "unflatten",
                 "from_log_prob", "from_module"]


@pytest.mark.parametrize("module", list(CONTRACT))
def test_contract_names_resolve(module):
    mod = importlib.import_module(module)
    missing = [n for n in CONTRACT[module] if not hasattr(mod, n)]
    assert missing == []


def test_space_methods_and_the_central_example():
    assert all(hasattr(cv.ParameterSpace, m) for m in SPACE_METHODS)
    space = cv.ParameterSpace(lambda p: p[0] ** 2 + 3 * p[1] ** 2)        # G = I in θ
    p = torch.tensor([0.5, -0.2], dtype=torch.float64)
    squeezed = space.reparametrize(cv.reparam.Scale(0.1))                # θ = 0.1 ψ
    psi = squeezed.chart.inverse(p)
    assert cv.flatness(space, p)["trace"].value == pytest.approx(8.0, abs=1e-12)
    assert cv.flatness(squeezed, psi)["trace"].value == pytest.approx(8.0, abs=1e-12)
    naive = squeezed.with_metric(cv.metrics.Euclidean())
    assert cv.flatness(naive, psi)["trace"].value == pytest.approx(0.08, abs=1e-12)


# --------------------------------------------------------------------------------------------
# issue 10: the public names load lazily (SPEC 1), so ``import covariant`` imports no torch
# --------------------------------------------------------------------------------------------


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter with this checkout's sources; return its stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(cv.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_public_name_is_the_object_of_its_defining_module():
    table = {**{n: f"covariant.{m}" for n, m in cv._NAMES.items()},
             **{s: None for s in cv._SUBMODULES}}
    assert sorted(cv.__all__) == sorted([*table, "__version__"])
    for name, module in table.items():
        if module is None:   # a subpackage: the module object itself
            assert getattr(cv, name) is importlib.import_module(f"covariant.{name}"), name
        else:
            assert getattr(cv, name) is getattr(importlib.import_module(module), name), name
    assert callable(cv.flatness) and cv.flatness.__name__ == "flatness"


def test_dir_lists_every_public_name():
    assert set(cv.__all__) <= set(dir(cv))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = cv.nonexistent


def test_import_covariant_loads_nothing_heavy_until_a_name_is_used():
    out = _fresh_python(
        "import sys, covariant as cv\n"
        "print(sorted(m for m in ('torch', 'numpy', 'scipy') if m in sys.modules))\n"
        "print(type(cv.metrics.GGN).__name__, 'torch' in sys.modules)\n")
    assert out.split("\n")[:2] == ["[]", "type True"]


def test_public_function_flatness_is_not_hidden_by_its_subpackage():
    # importing covariant.flatness.* first makes Python bind the subpackage on ``covariant``;
    # the public name must stay the function, as with the eager imports before
    out = _fresh_python(
        "import covariant as cv\n"
        "import covariant.flatness.report\n"
        "from covariant.flatness import FlatnessReport\n"
        "import torch\n"
        "space = cv.ParameterSpace(lambda p: (p**2).sum())\n"
        "r = cv.flatness(space, torch.zeros(2, dtype=torch.float64), measures=('trace',))\n"
        "print(r['trace'].value, isinstance(r, FlatnessReport))\n")
    assert out.strip() == "4.0 True"
