"""Tests of covariant.zoo.training: learning, determinism, validation, evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covariant.errors import NonFiniteError, ShapeMismatchError
from covariant.zoo import architectures as arch
from covariant.zoo import training


@pytest.fixture(scope="module")
def mnist1k():
    pytest.importorskip("mnist1d")
    from covariant.zoo.data import load_mnist1d

    return load_mnist1d(1250, seed=0)  # 1000 train / 250 test


def _train(ds, seed=0, **kw):
    torch.manual_seed(seed)
    model = arch.preset("mlp-small")
    opts = {"epochs": 20, "lr": 1e-2, "batch_size": 64, "seed": seed, **kw}
    losses = training.train_classifier(model, ds.X_train, ds.y_train, **opts)
    return model, losses


def test_mlp_small_learns_mnist1d(mnist1k):
    model, losses = _train(mnist1k)
    # measured (seeds 0-2, 20 epochs Adam 1e-2): train accuracy 0.79-0.80, test 0.34-0.44,
    # first-epoch loss 2.02-2.04, last 0.70-0.75; chance is 0.1 and log(10) = 2.30
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 1.0
    train = training.evaluate(model, mnist1k.X_train, mnist1k.y_train)
    assert train["accuracy"] > 0.7
    assert training.accuracy(model, mnist1k.X_test, mnist1k.y_test) > 0.25
    assert train["nll"] < 1.0


def test_training_is_deterministic_and_leaves_global_rng(mnist1k):
    ds = mnist1k
    sub = ds.X_train[:300], ds.y_train[:300]
    torch.manual_seed(0)
    a, b = arch.preset("mlp-small"), arch.preset("mlp-small")
    b.load_state_dict(a.state_dict())
    rng = torch.get_rng_state()
    la = training.train_classifier(a, *sub, epochs=3, lr=1e-2, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    lb = training.train_classifier(b, *sub, epochs=3, lr=1e-2, seed=5, progress=True)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = arch.preset("mlp-small")
    c.load_state_dict(a.state_dict())
    lc = training.train_classifier(c, *sub, epochs=3, lr=1e-2, seed=6)
    assert lc[0] != la[0] and lc != la  # same start, other shuffling


def test_sgd_and_validation():
    torch.manual_seed(0)
    X = torch.randn(64, 2, dtype=torch.float64)  # cast to the model's float32
    y = (X[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    losses = training.train_classifier(model, X, y, epochs=30, lr=0.5, optimizer="sgd",
                                       momentum=0.9, batch_size=16)
    assert losses[-1] < 0.3 * losses[0]
    assert training.accuracy(model, X, y) > 0.95
    with pytest.raises(ValueError, match="adamw"):
        training.train_classifier(model, X, y, optimizer="lbfgs")
    with pytest.raises(ShapeMismatchError):
        training.train_classifier(model, X, y[:10])
    with pytest.raises(ShapeMismatchError, match="integer class labels"):
        training.train_classifier(model, X, y.double())
    bad = X.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="epoch 0"):
        training.train_classifier(model, bad, y, epochs=2)


def test_evaluate_matches_hand_computation():
    model = nn.Linear(3, 4)
    X, y = torch.randn(10, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    model.train()
    res = training.evaluate(model, X, y, batch_size=3)  # chunked sums equal the full mean
    with torch.no_grad():
        logits = model(X)
    assert res["nll"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert res["accuracy"] == int((logits.argmax(1) == y).sum()) / 10
    assert model.training  # mode restored
