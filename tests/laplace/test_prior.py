"""Prior selection by the Laplace evidence: chart dependence, the conjugate optimum."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from covariant import density as cvd
from covariant import laplace as cvl
from covariant.reparam import Sinh


def test_prior_selection_classic_depends_on_the_chart_invariant_does_not(model_problem):
    space, theta, _ = model_problem
    d = theta.shape[0]
    h = Sinh(torch.linspace(0.5, 1.2, d, dtype=torch.float64), 1.1, 0.05)
    new = space.reparametrize(h)
    grid = [0.1, 0.3, 1.0, 3.0, 10.0]
    kw = {"method": "posthoc", "grid": grid, "refine": False, "hessian": "ggn"}
    ref = cvl.optimize_prior_precision(space, theta, riemannian=True, **kw)
    inv = cvl.optimize_prior_precision(new, h.inverse(theta), riemannian=True, **kw)
    assert max(abs(a - b) for a, b in zip(ref.log_evidences, inv.log_evidences,
                                           strict=True)) < 1e-7
    assert ref.prior_precision == inv.prior_precision
    psi_c = cvd.map_estimate(new, h.inverse(theta), riemannian=False).point
    cls = cvl.optimize_prior_precision(new, psi_c, riemannian=False, **kw)
    assert max(abs(a - b) for a, b in zip(ref.log_evidences, cls.log_evidences,
                                           strict=True)) > 1e-2


def test_prior_selection_by_refit_finds_the_evidence_maximum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(25, 1, generator=g, dtype=torch.float64)
    y = 0.8 * X + 0.5 * torch.randn(25, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False).double()
    space, theta = cvl.posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.5)
    res = cvl.optimize_prior_precision(space, theta, riemannian=False, grid=[0.1, 1.0, 10.0])
    # conjugate linear-Gaussian model: Laplace is exact; the optimum of the exact evidence
    s2 = 0.25
    xx, xy = float((X**2).sum()), float((X * y).sum())

    def exact(lam):
        a = lam + xx / s2
        return 0.5 * math.log(lam / a) + 0.5 * (xy / s2) ** 2 / a

    lams = torch.logspace(-2, 2, 4001).tolist()
    best = max(lams, key=exact)
    assert abs(math.log(res.prior_precision / best)) < 0.01
    assert res.to_dict()["method"] == "refit"
    back = json.loads(json.dumps(res.to_dict()))
    assert back["prior_precision"] == res.prior_precision and back["log_evidences"] == \
        res.log_evidences
    assert back["point"] == res.point.tolist() and back["info"]["refined"] is True
    assert back["info"]["num_evaluations"] > 3


def test_prior_selection_bad_inputs(model_problem, problem):
    space, theta, _ = model_problem
    with pytest.raises(ValueError, match="refit"):
        cvl.optimize_prior_precision(space, theta, method="bogus")
    with pytest.raises(ValueError, match="positive"):
        cvl.optimize_prior_precision(space, theta, grid=[0.0, 1.0])
    plain, p = problem
    with pytest.raises(ValueError, match="posterior_space"):
        cvl.optimize_prior_precision(plain, p)
