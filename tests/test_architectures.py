"""Tests of covariant.architectures (models, presets, checkpoints) and covariant.training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covariant import architectures as arch
from covariant import training
from covariant.errors import ArchitectureMismatchError, NonFiniteError, ShapeMismatchError

# --------------------------------------------------------------------------------------------
# Models and presets
# --------------------------------------------------------------------------------------------


def test_preset_parameter_counts():
    counts = {name: arch.num_parameters(arch.preset(name)) for name in arch.PRESETS}
    assert counts == {
        "mlp-small": 2698,
        "mlp-80k": 78858,
        "cnn-small": 2314,
        "cnn-1m": 1005998,
        "resnet1d-small": 31434,
    }
    assert abs(counts["mlp-80k"] / 80_000 - 1) < 0.10
    assert abs(counts["cnn-1m"] / 1_000_000 - 1) < 0.10
    assert 2000 <= counts["mlp-small"] <= 5000
    assert isinstance(arch.preset("cnn-1m"), arch.CNN1D)
    # sizes follow the data: digits has 64 inputs
    assert arch.preset("mlp-small", in_features=64).arch_kwargs["in_features"] == 64
    with pytest.raises(ValueError, match="mlp-80k"):
        arch.preset("mlp-huge")


def test_mlp_parameter_names_and_forward_formula():
    torch.manual_seed(0)
    m = arch.MLP(5, 3, hidden=(4, 6), activation="tanh")
    assert [n for n, _ in m.named_parameters()] == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias",
    ]
    p = dict(m.named_parameters())
    x = torch.randn(7, 5)
    h = torch.tanh(x @ p["0.weight"].T + p["0.bias"])
    h = torch.tanh(h @ p["2.weight"].T + p["2.bias"])
    torch.testing.assert_close(m(x), h @ p["4.weight"].T + p["4.bias"])
    # a hand-written nn.Sequential has the same state dict
    seq = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    seq.load_state_dict(m.state_dict())
    assert torch.equal(seq(x), m(x))
    relu = arch.MLP(5, 3, hidden=(4,), activation="relu", bias=False)
    assert [n for n, _ in relu.named_parameters()] == ["0.weight", "2.weight"]
    assert isinstance(relu[1], nn.ReLU)


@pytest.mark.parametrize("name", ["mlp-small", "cnn-small", "resnet1d-small"])
def test_input_shapes_vmap_and_batch_independence(name):
    torch.manual_seed(0)
    model = arch.preset(name)
    X = torch.randn(6, 40)
    out = model(X)
    assert out.shape == (6, 10)
    torch.testing.assert_close(model(X[2]), out[2])  # single example (L,)
    # per-example vmap (what torch.func-based metrics do) equals the batched call
    torch.testing.assert_close(torch.func.vmap(model)(X), out)
    # no BatchNorm: an example's output does not depend on its batch; no hidden buffers
    model.train()
    torch.testing.assert_close(model(X[:1]), out[:1])
    assert list(model.buffers()) == []


def test_cnn_and_resnet_options():
    cnn = arch.CNN1D(40, 10, channels=(4, 8), stride=2, hidden=(12,), pool="mean")
    assert cnn(torch.randn(3, 1, 40)).shape == (3, 10)
    assert cnn.feature_length == 10
    assert [n for n, _ in cnn.named_parameters()] == [
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
        "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias",
    ]
    assert cnn.head[0].in_features == 8  # mean pooling keeps only channels
    flat = arch.CNN1D(40, 10, channels=(4, 8), stride=2)
    assert flat.head[0].in_features == 8 * 10
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        flat(torch.randn(2, 3, 40))

    gn = arch.ResNet1D(40, 10, channels=8, num_blocks=2, norm="group", num_groups=4)
    names = [n for n, _ in gn.named_parameters()]
    assert "blocks.1.norm2.weight" in names and names[-1] == "fc.bias"
    X = torch.randn(3, 40)
    torch.testing.assert_close(torch.func.vmap(gn)(X), gn(X))  # GroupNorm is per-example
    with pytest.raises(ValueError, match="divide"):
        arch.ResNet1D(40, 10, channels=6, norm="group", num_groups=4)


def test_build_registry_and_errors():
    assert set(arch.ARCHITECTURES) == {"mlp", "cnn1d", "resnet1d"}
    m = arch.build("mlp", 40, 10, hidden=[8])
    assert arch.num_parameters(m) == 40 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(ValueError, match=r"cnn1d.*mlp.*resnet1d"):
        arch.build("transformer", 40, 10)
    with pytest.raises(ValueError, match="channels"):
        arch.build("mlp", 40, 10, channels=(3,))
    with pytest.raises(ValueError, match="swish"):
        arch.build("mlp", 40, 10, activation="swish")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp-small", "cnn-small", "resnet1d-small"])
def test_checkpoint_round_trip_is_exact(tmp_path, name):
    torch.manual_seed(1)
    model = arch.preset(name)
    path = tmp_path / "sub" / "model.pt"
    arch.save_checkpoint(path, model, metadata={"epochs": 3, "note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == model.arch_name and raw["arch_kwargs"] == model.arch_kwargs

    rng = torch.get_rng_state()
    loaded, meta = arch.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not consume the global RNG
    assert type(loaded) is type(model) and not loaded.training
    assert meta["metadata"] == {"epochs": 3, "note": "x"} and meta["source"] == "checkpoint"
    X = torch.randn(5, 40)
    assert torch.equal(loaded(X), model(X))


def test_checkpoint_keeps_float64(tmp_path):
    model = arch.preset("mlp-small").double()
    arch.save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = arch.load_checkpoint(tmp_path / "m.pt")
    assert loaded[0].weight.dtype == torch.float64
    X = torch.randn(3, 40, dtype=torch.float64)
    assert torch.equal(loaded(X), model(X))


def test_bare_state_dict_and_prefixes(tmp_path):
    torch.manual_seed(2)
    model = arch.preset("mlp-small")
    X = torch.randn(4, 40)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ArchitectureMismatchError, match=r"arch='mlp'.*'hidden': \[32, 32\]"):
        arch.load_checkpoint(tmp_path / "sd.pt")
    loaded, meta = arch.load_checkpoint(
        tmp_path / "sd.pt", arch="mlp", in_features=40, num_classes=10, hidden=[32, 32]
    )
    assert meta["source"] == "state_dict" and torch.equal(loaded(X), model(X))
    # DataParallel-style "module." prefixes are removed
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    loaded, _ = arch.load_checkpoint(
        tmp_path / "dp.pt", arch="mlp", in_features=40, num_classes=10, hidden=[32, 32]
    )
    assert torch.equal(loaded(X), model(X))


def test_mismatched_checkpoint_raises_with_helpful_message(tmp_path):
    path = tmp_path / "m.pt"
    arch.save_checkpoint(path, arch.preset("mlp-small"))
    with pytest.raises(ArchitectureMismatchError) as err:
        arch.load_checkpoint(path, hidden=[64, 64])
    msg = str(err.value)
    assert "0.weight: checkpoint (32, 40) vs model (64, 40)" in msg
    assert "'hidden': [32, 32]" in msg  # what would fit
    assert isinstance(err.value, ValueError)

    with pytest.raises(ArchitectureMismatchError) as err:
        arch.load_checkpoint(path, arch="cnn1d")
    msg = str(err.value)
    assert "missing keys [features.0.weight" in msg and "unexpected keys [0.weight" in msg

    cnn = tmp_path / "cnn.pt"
    arch.save_checkpoint(cnn, arch.preset("cnn-small"))
    with pytest.raises(ArchitectureMismatchError, match=r"'channels': \[8, 16\]"):
        arch.load_checkpoint(cnn, channels=[8, 32])


def test_save_validates_recipe(tmp_path):
    model = arch.preset("mlp-small")
    with pytest.raises(ArchitectureMismatchError, match="refusing to save"):
        arch.save_checkpoint(tmp_path / "bad.pt", model, hidden=[16])
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(TypeError, match="cannot be stored"):
        arch.save_checkpoint(tmp_path / "bad.pt", model, metadata={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="arch="):
        arch.save_checkpoint(tmp_path / "bad.pt", nn.Linear(2, 2))
    # a plain nn.Sequential saves when the recipe is given, and loads as an MLP
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    arch.save_checkpoint(tmp_path / "seq.pt", seq, "mlp", in_features=3, num_classes=2,
                         hidden=(4,))
    loaded, meta = arch.load_checkpoint(tmp_path / "seq.pt")
    assert meta["arch_kwargs"]["hidden"] == [4]
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), seq(x))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1k():
    pytest.importorskip("mnist1d")
    from covariant.data import load_mnist1d

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
