"""Tests of covariant.zoo.architectures: models, presets, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covariant.zoo import architectures as arch


def test_preset_parameter_counts():
    counts = {name: arch.num_parameters(arch.preset(name)) for name in arch.PRESETS}
    assert counts == {
        "mlp-small": 2698,
        "mlp-80k": 78858,
        "cnn-small": 2314,
        "cnn-1m": 1005998,
        "resnet1d-small": 31434,
        "resnet20-bn": 272474,
        "resnet8-bn": 78042,
        "vit-small": 207946,
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
    assert set(arch.ARCHITECTURES) == {"mlp", "cnn1d", "resnet1d", "resnet2d", "vit"}
    m = arch.build("mlp", 40, 10, hidden=[8])
    assert arch.num_parameters(m) == 40 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(ValueError, match=r"cnn1d.*mlp.*resnet1d"):
        arch.build("transformer", 40, 10)
    with pytest.raises(ValueError, match="channels"):
        arch.build("mlp", 40, 10, channels=(3,))
    with pytest.raises(ValueError, match="swish"):
        arch.build("mlp", 40, 10, activation="swish")
