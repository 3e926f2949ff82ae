"""Batch norm in both modes (issue 11 item 3): dense float64 truth, untouched running
statistics, and invariance of the flatness under weight norm.

Training mode: each batch given to ``from_module`` is one batch-norm batch, normalized by its
own statistics; the running statistics are never read nor updated. Eval mode: the running
statistics. The truth is a plain re-implementation of the forward (no nn.BatchNorm).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import covariant as cv

EPS = 1e-5
GEN = torch.Generator().manual_seed(3)
X = torch.randn(12, 3, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (12,), generator=GEN)
SPLIT = [(X[:5], Y[:5]), (X[5:], Y[5:])]


def _model(train: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=EPS), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    with torch.no_grad():  # affine parameters away from (1, 0), running statistics away from (0, 1)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.train(train)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def _plain_forward(model: nn.Sequential, train: bool):
    """(θ, X) ↦ logits, batch norm written out: batch statistics (biased variance) in
    training mode, the running statistics in eval mode."""
    shapes = [p.shape for p in model.parameters()]
    mean0, var0 = model[1].running_mean.clone(), model[1].running_var.clone()

    def forward(theta, Xb):
        W0, b0, g, beta, W1, b1 = (t.view(s) for t, s in zip(
            torch.split(theta, [s.numel() for s in shapes]), shapes, strict=True))
        h = Xb @ W0.T + b0
        if train:
            mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
        else:
            mean, var = mean0, var0
        h = torch.tanh((h - mean) / torch.sqrt(var + EPS) * g + beta)
        return h @ W1.T + b1

    return forward


def _truth(model, train, batches, f=None):
    """Loss, gradient, Hessian, GGN and empirical Fisher of Σ_b w_b CE(f(θ, X_b), y_b)."""
    f = _plain_forward(model, train) if f is None else f
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n = sum(len(y) for _, y in batches)
    weights = [len(y) / n for _, y in batches]

    def loss(t):
        return sum(w * nn.functional.cross_entropy(f(t, Xb), yb)
                   for w, (Xb, yb) in zip(weights, batches, strict=True))

    G = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    F = torch.zeros_like(G)
    for w, (Xb, yb) in zip(weights, batches, strict=True):
        out = f(theta, Xb)
        J = jacrev(f)(theta, Xb).reshape(out.numel(), -1)
        H = hessian(lambda o, yb=yb, shape=out.shape: nn.functional.cross_entropy(
            o.view(shape), yb))(out.reshape(-1))
        G += w * J.T @ H @ J
        # per-example gradients of ℓ_n(f(θ, X_b)_n) through the whole batch's forward
        per = jacrev(lambda t, Xb=Xb, yb=yb: nn.functional.cross_entropy(
            f(t, Xb), yb, reduction="none"))(theta)
        F += w * per.T @ per / len(yb)
    return theta, loss(theta), torch.func.grad(loss)(theta), hessian(loss)(theta), G, F


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("split", [False, True], ids=["one-batch", "two-batches"])
def test_loss_grad_hvp_ggn_match_dense_truth(train, split):
    model = _model(train)
    batches = SPLIT if split else [(X, Y)]
    theta, L, g, H, G, F = _truth(model, train, batches)
    data = batches if split else (X, Y)
    space, p = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    ef, _ = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "empirical_fisher")
    assert torch.equal(p, theta)
    V = torch.randn(3, p.numel(), generator=GEN, dtype=torch.float64)
    torch.testing.assert_close(space.loss(p), L, rtol=1e-12, atol=0)
    torch.testing.assert_close(space.grad(p), g, rtol=1e-10, atol=1e-13)
    for v in V:
        torch.testing.assert_close(space.hvp(p, v, riemannian=False), H @ v, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(space.metric.matvec(p, v), G @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ef.metric.matvec(p, v), F @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(space.metric.dense(p), G, rtol=1e-10, atol=1e-12)


def _conv_model_and_plain(train: bool):
    """Conv2d → BatchNorm2d → tanh → Linear, and its forward written out (statistics over the
    batch and both image axes)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, eps=EPS), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train(train)
    shapes = [p.shape for p in model.parameters()]
    mean0, var0 = model[1].running_mean.clone(), model[1].running_var.clone()

    def forward(theta, Xb):
        K, c, g, beta, W, b = (t.view(s) for t, s in zip(
            torch.split(theta, [s.numel() for s in shapes]), shapes, strict=True))
        h = nn.functional.conv2d(Xb.view(-1, 1, 4, 4), K, c)
        if train:
            mean = h.mean((0, 2, 3), keepdim=True)
            var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)
        else:
            mean, var = mean0.view(1, -1, 1, 1), var0.view(1, -1, 1, 1)
        h = torch.tanh((h - mean) / torch.sqrt(var + EPS) * g.view(1, -1, 1, 1)
                       + beta.view(1, -1, 1, 1))
        return h.flatten(1) @ W.T + b

    return model, forward


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm2d_matches_dense_truth(train):
    model, f = _conv_model_and_plain(train)
    Xi = torch.randn(10, 16, generator=GEN, dtype=torch.float64)
    Yi = torch.randint(0, 3, (10,), generator=GEN)
    batches = [(Xi[:6], Yi[:6]), (Xi[6:], Yi[6:])]
    theta, L, g, H, G, _ = _truth(model, train, batches, f)
    data = [(X.view(-1, 1, 4, 4), y) for X, y in batches]
    space, p = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
    before = _buffers(model)
    torch.testing.assert_close(space.loss(p), L, rtol=1e-12, atol=0)
    torch.testing.assert_close(space.grad(p), g, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(space.hessian(p, riemannian=False), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(space.metric.dense(p), G, rtol=1e-10, atol=1e-12)
    for name, t in model.named_buffers():
        assert torch.equal(t, before[name]), name


def test_the_forward_follows_the_module_mode_at_each_call():
    """Like dropout, batch norm follows the module's mode when the loss is evaluated; the two
    modes are different functions (so the tests above can tell them apart)."""
    model = _model(True)
    space, p = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, Y))
    train_loss = space.loss(p)
    torch.testing.assert_close(train_loss, _truth(model, True, [(X, Y)])[1], rtol=1e-12, atol=0)
    model.eval()
    eval_loss = space.loss(p)
    torch.testing.assert_close(eval_loss, _truth(model, False, [(X, Y)])[1], rtol=1e-12, atol=0)
    assert abs(float(train_loss - eval_loss)) > 1e-3


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_running_statistics_are_never_mutated(train):
    model = _model(train)
    before = _buffers(model)
    for metric in ("euclidean", "ggn", "fisher", "empirical_fisher"):
        space, p = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), SPLIT, metric)
        v = torch.randn(p.numel(), generator=GEN, dtype=torch.float64)
        space.loss(p), space.grad(p), space.hvp(p, v, riemannian=False)
        space.metric.matvec(p, v)
        if metric != "euclidean":  # vmapped products, and the forward-over-forward form
            space.metric.dense(p), space.metric.inner(p, v, v)
            continue
        for method in ("dense", "stochastic"):  # a singular GGN has no flatness: Euclidean
            rep = cv.flatness(space, p, measures=("trace",), method=method, num_probes=4, seed=0)
            assert math.isfinite(rep["trace"].value)
    after = dict(model.named_buffers())
    assert set(after) == set(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
        assert after[name].dtype == t.dtype
    assert model.training is train


def test_a_batch_of_one_in_training_mode_is_a_typed_error():
    from covariant.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="batch 1 has one example.*batch norm"):
        cv.ParameterSpace.from_module(_model(True), nn.CrossEntropyLoss(),
                                      [(X[:11], Y[:11]), (X[11:], Y[11:])])
    space, _ = cv.ParameterSpace.from_module(_model(False), nn.CrossEntropyLoss(),
                                             [(X[:11], Y[:11]), (X[11:], Y[11:])])
    assert space.binding is not None


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_weight_norm_invariant_trace_naive_changes(train):
    """tr E under weight norm at ‖v‖·{0.1, 1, 10} equals the w-chart value (dense, float64);
    the Euclidean trace in the (g, v) chart does not."""
    model = _model(train)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, Y))
    ref = cv.flatness(space, theta, measures=("trace",), method="dense")["trace"].value
    wn = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    base = wn.chart.inverse(theta)
    naive = []
    for s in (0.1, 1.0, 10.0):
        psi = base.clone()
        for name, block in wn.chart.blocks.items():
            sl = wn.chart.psi_slices[name]
            psi[sl.start + block.num_slices: sl.stop] *= s
        torch.testing.assert_close(wn.chart.forward(psi), theta, rtol=1e-12, atol=1e-14)
        inv = cv.flatness(wn, psi, measures=("trace",), method="dense")
        assert inv["trace"].value == pytest.approx(ref, rel=1e-8)
        naive.append(cv.flatness(wn.with_metric(cv.metrics.Euclidean()), psi,
                                 measures=("trace",), method="dense")["trace"].value)
    assert max(naive) - min(naive) > abs(ref)
    assert all(abs(n - ref) > 0.2 * abs(ref) for n in naive)


def test_instance_norm_with_running_statistics_in_training_mode():
    """InstanceNorm1d(track_running_stats=True) in training mode: statistics per example and
    channel, running statistics untouched, dense Hessian exact (against autograd)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Unflatten(1, (2, 3)), nn.InstanceNorm1d(2, affine=True,
                                                                     track_running_stats=True),
                          nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).double().train()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    before = _buffers(model)
    Xi = torch.randn(7, 6, generator=GEN, dtype=torch.float64)
    Yi = torch.randint(0, 3, (7,), generator=GEN)
    space, p = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (Xi, Yi))

    def plain(theta):
        g, b, W, c = torch.split(theta, [2, 2, 18, 3])
        h = Xi.view(7, 2, 3)
        h = (h - h.mean(2, keepdim=True)) / torch.sqrt(h.var(2, unbiased=False, keepdim=True)
                                                       + 1e-5)
        h = torch.tanh(h * g.view(1, 2, 1) + b.view(1, 2, 1)).flatten(1)
        return nn.functional.cross_entropy(h @ W.view(3, 6).T + c, Yi)

    torch.testing.assert_close(space.loss(p), plain(p), rtol=1e-12, atol=0)
    H = torch.autograd.functional.hessian(plain, p)
    torch.testing.assert_close(space.hessian(p, riemannian=False), H, rtol=1e-10, atol=1e-12)
    for name, t in model.named_buffers():
        assert torch.equal(t, before[name]), name
