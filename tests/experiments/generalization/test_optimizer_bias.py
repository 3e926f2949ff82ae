"""The optimizer-bias sharpness against dense float64 linear algebra, and the comparison."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from covariant.experiments.generalization.optimizer_bias import compare, model_sharpness


def _tiny_adam_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    X = torch.randn(24, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, (X, y), opt


def _dense_truth(model, data, opt):
    X, y = data
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = hessian(lambda w: F.cross_entropy(_logits(model, w, X), y))(w0)
    state = opt.state_dict()
    v = torch.cat([state["state"][i]["exp_avg_sq"].reshape(-1) for i in range(4)])
    t = float(state["state"][0]["step"])
    adam = (v / (1 - 0.99 ** t)).sqrt() + 1e-6
    H = H.detach().numpy()
    D = np.diag(adam.numpy())
    out = {}
    for key, metric in (("euclidean", np.eye(len(D))), ("own", D)):
        ev = scipy.linalg.eigh(H, metric, eigvals_only=True)
        out[key] = {"trace": float(np.trace(np.linalg.solve(metric, H))), "max_eig": ev[-1]}
    return out


def _logits(model, w, X):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    parts = dict(zip(names, (t.reshape(s) for t, s in
                             zip(torch.split(w, sizes), shapes, strict=True)), strict=True))
    return functional_call(model, parts, (X,))


def test_sharpness_in_each_metric_matches_dense_float64():
    model, data, opt = _tiny_adam_model()
    got = model_sharpness(model, data, "adam", 0.05, opt.state_dict(), method="dense")
    want = _dense_truth(model, data, opt)
    for metric in ("euclidean", "own"):
        for q in ("trace", "max_eig"):
            assert got[metric][q] == pytest.approx(want[metric][q], rel=1e-8), (metric, q)
    assert got["own"]["lr_max_eig"] == pytest.approx(0.05 * want["own"]["max_eig"], rel=1e-8)
    # Adam's own metric is not the Euclidean one: the two sharpnesses differ
    assert abs(got["own"]["max_eig"] / got["euclidean"]["max_eig"] - 1) > 0.5
    # an SGD model's own metric is the Euclidean one
    sgd = model_sharpness(model, data, "sgd", 0.1, None, method="dense")
    assert sgd["own"]["max_eig"] == sgd["euclidean"]["max_eig"]
    assert sgd["own"]["lr_max_eig"] == pytest.approx(0.1 * want["euclidean"]["max_eig"],
                                                     rel=1e-8)


def test_compare_medians_ratio_and_interval():
    opts = ["sgd", "momentum", "sgd", "adam", "adam", "adam"]
    vals = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]
    r = compare(opts, vals, n_boot=300, seed=0)
    assert r["n"] == {"sgd": 2, "momentum": 1, "adam": 3}
    assert r["median"] == {"sgd": 2.0, "momentum": 2.0, "adam": 20.0}
    assert r["ratio_adam_over_sgd"] == 10.0          # median(10, 20, 30) / median(1, 2, 3)
    lo, hi = r["ratio_ci"]
    assert 10.0 / 3.0 <= lo <= 10.0 <= hi <= 30.0     # every replicate lies in [10/3, 30]
    assert r["adam_sharper"] is True
    same = compare(opts, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0], n_boot=300, seed=0)
    assert same["ratio_adam_over_sgd"] == 1.0 and same["adam_sharper"] is None
