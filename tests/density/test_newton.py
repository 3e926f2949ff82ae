"""Damped Newton: saddle escapes, Levenberg damping and the domain-respecting line search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from covariant._progress import progress_bar
from covariant.density.newton import _newton
from covariant.errors import NonFiniteError

from ._helpers import _t


def _safe(f, domain=lambda x: True):
    def value(q):
        if not domain(q):
            return math.inf
        v = float(f(q))
        return v if math.isfinite(v) else math.inf

    return value


def test_escapes_a_saddle_to_a_minimum():
    f = lambda x: x[0] ** 2 - x[1] ** 2 + x[1] ** 4       # saddle at 0, minima at (0, ±1/√2)
    p, converged, _, history = _newton(f, _safe(f), _t([0.0, 0.0]), 50, 1e-12, progress_bar())
    assert converged
    assert torch.allclose(p.abs(), _t([0.0, 1 / math.sqrt(2)]), atol=1e-10)
    assert history[-1] < history[0] and abs(history[-1] + 0.25) < 1e-12


def test_levenberg_damping_where_the_hessian_is_indefinite():
    f = lambda x: (x**4).sum() / 4 - (x**2).sum() / 2 + 0.1 * x.sum()
    p, converged, _, history = _newton(f, _safe(f), _t([0.2]), 50, 1e-12, progress_bar())
    assert converged and abs(float(p**3 - p + 0.1)) < 1e-12
    assert all(b <= a for a, b in itertools.pairwise(history))  # monotone descent


def test_line_search_rejects_points_outside_the_domain():
    f = lambda x: (x - torch.log(x)).sum()                # minimum at x = 1, domain x > 0
    p, converged, _, _ = _newton(f, _safe(f, lambda q: bool((q > 0).all())), _t([8.0]), 100,
                                 1e-12, progress_bar())
    assert converged and abs(float(p) - 1.0) < 1e-10


def test_a_start_outside_the_support_is_an_error():
    f = lambda x: (x - torch.log(x)).sum()
    with pytest.raises(NonFiniteError, match="starting point"):
        _newton(f, _safe(f), _t([-1.0]), 10, 1e-12, progress_bar())
