"""Result types: to_dict() is plain JSON whose numbers equal the attributes."""

from __future__ import annotations

import json
import math

import torch

from covariant import density as cvd
from covariant.reparam import Log

from ._helpers import _dense_field, _lognormal_space, _t


def _round_trip(result):
    return json.loads(json.dumps(result.to_dict(), allow_nan=False))


def test_logdet_estimate_to_dict_round_trip():
    G, p = _dense_field(8, seed=1)
    est = cvd.logdet_estimate(G, p, num_probes=4, num_steps=6, with_grad=True, grad_probes=3)
    d = _round_trip(est)
    assert set(d) == {"value", "stderr", "num_matvecs", "grad", "grad_stderr", "converged",
                      "info"}
    assert d["value"] == est.value and d["stderr"] == est.stderr
    assert d["num_matvecs"] == est.num_matvecs and d["converged"] is est.converged
    assert torch.equal(_t(d["grad"]), est.grad)
    assert torch.equal(_t(d["grad_stderr"]), est.grad_stderr)
    assert d["info"] == est.info and d["info"]["cg_iters"] == est.info["cg_iters"]


def test_logdet_estimate_to_dict_without_gradient_and_one_probe():
    G, p = _dense_field(6)
    est = cvd.logdet_estimate(G, p, num_probes=1, num_steps=4, with_grad=True, grad_probes=1)
    assert math.isnan(est.stderr) and bool(est.grad_stderr.isnan().all())
    d = _round_trip(est)                               # NaN becomes None, still JSON
    assert d["value"] == est.value and d["stderr"] is None
    assert d["grad_stderr"] == [None] * 6
    plain = _round_trip(cvd.logdet_estimate(G, p, num_probes=2, num_steps=4))
    assert plain["grad"] is None and plain["info"] == {} and plain["converged"] is True


def test_map_result_to_dict_round_trip():
    y_space = _lognormal_space().reparametrize(Log())
    res = cvd.map_estimate(y_space, _t([1.0]), riemannian=True)
    d = _round_trip(res)
    assert d["point"] == res.point.tolist() and d["value"] == res.value
    assert d["converged"] is res.converged is True
    assert d["num_iters"] == res.num_iters and d["grad_norm"] == res.grad_norm
    assert d["riemannian"] is True and d["method"] == "newton"
    assert d["history"] == res.history
    assert d["info"] == res.info == {"tol": 1e-9, "steps": 100, "logdet_method": "auto"}
