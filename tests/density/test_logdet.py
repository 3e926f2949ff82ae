"""log det G three ways (closed / dense / SLQ), in float64, against dense truth
(docs/math.md §5, §7)."""

from __future__ import annotations

import pytest
import torch

from covariant import density as cvd
from covariant.density.logdet import _hutchinson_probes
from covariant.linalg.probes import _generator, _probes
from covariant.metrics import Euclidean, Pullback
from covariant.reparam import Affine, Compose, Log, Sinh, WeightNorm

from ._helpers import _dense_field, _t


@pytest.mark.parametrize("chart", [Sinh(0.7, 1.3, 0.2), Log(),
                                   Compose(Affine(_t([[1.0, 0.5], [0.0, 2.0]])), Sinh(0.5))])
def test_closed_form_logdet_equals_dense(chart):
    G = Pullback(Euclidean(), chart)
    psi = _t([0.6, 1.3])
    closed = cvd.logdet(G, psi, "closed")
    dense = cvd.logdet(G, psi, "dense")
    assert torch.allclose(closed, dense, atol=1e-12)
    gc = torch.func.grad(lambda q: cvd.logdet(G, q, "closed"))(psi)
    gd = torch.func.grad(lambda q: cvd.logdet(G, q, "dense"))(psi)
    assert torch.allclose(gc, gd, atol=1e-10)


def test_pseudo_logdet_of_a_weight_norm_pullback():
    h = WeightNorm((3, 4))
    g = torch.Generator().manual_seed(1)
    psi = h.inverse(torch.randn(12, generator=g, dtype=torch.float64))
    psi[3:] = psi[3:] * 1.7  # ‖v‖ ≠ g
    G = Pullback(Euclidean(), h)
    evals = torch.linalg.eigvalsh(G.dense(psi))
    assert int((evals < 1e-10).sum()) == 3          # one gauge direction per row
    truth = evals[3:].log().sum()
    assert torch.allclose(cvd.logdet(G, psi, "closed"), truth, atol=1e-10)
    assert torch.allclose(cvd.logdet(G, psi, "dense"), truth, atol=1e-10)


def test_slq_logdet_and_gradient_within_error_bars():
    G, p = _dense_field(30)
    truth = float(cvd.logdet(G, p, "dense"))
    g_true = torch.func.grad(lambda q: cvd.logdet(G, q, "dense"))(p)
    est = cvd.logdet_estimate(G, p, num_probes=30, num_steps=25, with_grad=True,
                              grad_probes=600, seed=3)
    assert abs(est.value - truth) < 4 * est.stderr + 1e-6
    assert est.stderr < 0.05 * abs(truth)
    z = (est.grad - g_true) / est.grad_stderr
    assert float(z.abs().max()) < 4.5
    # honest error bars, neither tiny nor huge: mean z² ≈ 1 (a 10% bias gives about 5)
    assert 0.4 < float((z**2).mean()) < 2.5
    # a wrong gradient would be caught
    assert float(((est.grad + g_true) / est.grad_stderr).abs().max()) > 10
    # more probes, smaller error bars
    est_small = cvd.logdet_estimate(G, p, num_probes=4, with_grad=True, grad_probes=20, seed=3)
    assert float(est_small.grad_stderr.mean()) > 2 * float(est.grad_stderr.mean())


def test_slq_logdet_as_a_loss_term_has_the_estimated_gradient():
    G, p = _dense_field(20, seed=2)
    q = p.clone().requires_grad_(True)
    val = cvd.logdet(G, q, "slq", num_probes=10, grad_probes=50, seed=5)
    val.backward()
    est = cvd.logdet_estimate(G, p, num_probes=10, with_grad=True, grad_probes=50, seed=5)
    assert abs(float(val.detach()) - est.value) < 1e-10
    assert torch.allclose(q.grad, est.grad, atol=1e-10)
    g_true = torch.func.grad(lambda x: cvd.logdet(G, x, "dense"))(p)
    assert float(((q.grad - g_true) / est.grad_stderr).abs().max()) < 4.5


def test_estimate_reports_its_cg_solves():
    G, p = _dense_field(12, seed=4)
    est = cvd.logdet_estimate(G, p, num_probes=3, num_steps=8, with_grad=True, grad_probes=5)
    assert est.converged and est.info["cg_converged"] == [True] * 5
    assert len(est.info["cg_iters"]) == 5
    assert est.info["cg_matvecs"] >= sum(est.info["cg_iters"])
    assert est.num_matvecs == 3 * 8                  # SLQ's products only
    plain = cvd.logdet_estimate(G, p, num_probes=3, num_steps=8)
    assert plain.converged and plain.grad is None and plain.info == {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("seed", "dim", "num"), [(0, 7, 3), (5, 100, 50), (123, 1, 9)])
def test_gradient_probes_are_the_linalg_probes_of_seed_plus_7919(seed, dim, num, dtype):
    """The gradient's probe stream equals covariant.linalg.probes' Rademacher stream for the
    seed ``seed + 7919`` (the same generator, seed arithmetic and dtype)."""
    ours = _hutchinson_probes(dim, num, seed, torch.zeros(1, dtype=dtype))
    theirs = _probes(_generator(seed + 7919), dim, num, "rademacher", dtype, None).T
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_logdet_bad_inputs():
    G, p = _dense_field(4)
    with pytest.raises(ValueError, match="no closed form"):
        cvd.logdet(G, p, "closed")
    with pytest.raises(ValueError, match="method"):
        cvd.logdet(G, p, "cholesky")
    with pytest.raises(ValueError, match="torch.autograd"):  # not silently a zero gradient
        torch.func.grad(lambda q: cvd.logdet(G, q, "slq"))(p)
