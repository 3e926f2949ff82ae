"""Probes of covariant.linalg.probes: one stream, shared by every stochastic estimator."""

from __future__ import annotations

import pytest
import torch

from covariant.linalg import hutchinson, slq
from covariant.linalg.probes import _generator, _probe, _probes

from ._matrices import F64, _mv, _spd


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_probes_do_not_depend_on_batching(distribution):
    block = _probes(_generator(7), 25, 6, distribution, F64, None)
    gen = _generator(7)
    one_by_one = torch.stack([_probe(gen, 25, distribution, F64, None) for _ in range(6)], 1)
    assert torch.equal(block, one_by_one)
    if distribution == "rademacher":
        assert bool((block.abs() == 1).all())
    # float32 probes are the float64 ones rounded
    z32 = _probes(_generator(7), 25, 6, distribution, torch.float32, None)
    assert torch.equal(z32, block.float())


def test_slq_and_hutchinson_share_the_probe_stream():
    # with f(x) = x, SLQ is exact (a polynomial of degree 1), so each of its samples is the
    # same quadratic form zᵀ A z as Hutchinson's with the same seed
    a = _spd(40, cond=1e2)
    h = hutchinson(_mv(a), 40, 6, seed=11)
    s = slq(_mv(a), 40, num_probes=6, num_steps=10, fn=lambda x: x, seed=11)
    assert torch.allclose(s.samples, h.samples, rtol=1e-10, atol=0)


def test_unknown_distribution_raises():
    with pytest.raises(ValueError, match="distribution"):
        _probe(_generator(0), 3, "uniform", F64, None)
