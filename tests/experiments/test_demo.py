"""The demo (``covariant demo``): its docs/math.md §8 part."""

from __future__ import annotations

import pytest

from covariant.experiments.demo import toy_part


def test_demo_toy_part_invariant_and_naive_differs():
    r = toy_part()
    assert r["max_invariant_deviation"] < 1e-12
    assert r["original"]["trace"] == pytest.approx(5.57746, abs=5e-6)
    for name, dev in r["naive_max_eig_deviation"].items():
        assert dev > 0.1, name
