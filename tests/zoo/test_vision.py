"""Tests of covariant.zoo.vision (ResNet2D with batch norm, ViT) and the generated images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covariant as cv
from covariant.zoo import architectures as arch
from covariant.zoo import data
from covariant.zoo.vision import ResNet2D, ViT


def resnet_count(C: int, w: int, n: int, K: int, norm: bool = True) -> int:
    """Parameters of a CIFAR ResNet-(6n+2) with 1×1-conv shortcuts, by formula."""
    per_norm = 2 if norm else 0
    bias = 0 if norm else 1  # convolutions have a bias only without batch norm
    total = 9 * C * w + (per_norm + bias) * w
    c_in = w
    for s in range(3):
        c_out = w * 2**s
        for _ in range(n):
            total += 9 * c_in * c_out + 9 * c_out * c_out + 2 * (per_norm + bias) * c_out
            if c_in != c_out:
                total += c_in * c_out + (per_norm + bias) * c_out
            c_in = c_out
    return total + 4 * w * K + K


def vit_count(C: int, S: int, P: int, d: int, depth: int, r: int, K: int) -> int:
    """Parameters of the ViT, by formula."""
    tokens = (S // P) ** 2
    attention = (3 * d * d + 3 * d) + (d * d + d)
    block = 2 * d + attention + 2 * d + (d * r * d + r * d) + (r * d * d + d)
    return C * P * P * d + d + tokens * d + depth * block + 2 * d + d * K + K


def test_parameter_counts_by_formula():
    assert resnet_count(3, 16, 3, 10) == 272474  # ResNet-20 on CIFAR-10: the usual 0.27M
    assert arch.num_parameters(arch.preset("resnet20-bn")) == resnet_count(3, 16, 3, 10)
    assert arch.num_parameters(arch.preset("resnet8-bn")) == resnet_count(3, 16, 1, 10)
    assert arch.num_parameters(arch.preset("vit-small")) == vit_count(3, 32, 4, 64, 4, 4, 10)
    assert abs(resnet_count(3, 16, 3, 10) / 300_000 - 1) < 0.10
    assert abs(vit_count(3, 32, 4, 64, 4, 4, 10) / 200_000 - 1) < 0.05
    assert arch.num_parameters(ResNet2D(64, 3, in_channels=1, width=3, num_blocks=2,
                                        norm="none")) == resnet_count(1, 3, 2, 3, norm=False)
    assert arch.num_parameters(ViT(192, 5, patch_size=2, dim=12, depth=2, heads=3,
                                   mlp_ratio=3)) == vit_count(3, 8, 2, 12, 2, 3, 5)
    bn = [m for m in arch.preset("resnet20-bn").modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 1 + 3 * 3 * 2 + 2  # stem, two per block, two shortcuts


@pytest.mark.parametrize("name", ["resnet20-bn", "vit-small"])
def test_forward_shapes_flat_and_image_inputs(name):
    torch.manual_seed(0)
    model = arch.preset(name).float().eval()
    ds = data.make_synthetic_images(12, 10, seed=0)
    X = ds.X_train[:4]
    out = model(X)
    assert out.shape == (4, 10)
    torch.testing.assert_close(model(X.view(4, 3, 32, 32)), out)
    torch.testing.assert_close(model(X[1]), out[1], rtol=1e-5, atol=1e-6)  # one example
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        model(torch.zeros(2, 40))


def test_digits_shaped_models_and_registry():
    for name in ("resnet2d", "vit"):
        m = arch.build(name, 64, 10, in_channels=1, **({"dim": 16, "heads": 2}
                                                        if name == "vit" else {"width": 4}))
        assert m.eval()(torch.zeros(3, 64)).shape == (3, 10)
    assert {"resnet2d", "vit"} <= set(arch.ARCHITECTURES)
    with pytest.raises(ValueError, match="image side"):
        arch.build("resnet2d", 40, 10)
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        arch.build("vit", 3072, 10, patch_size=3)


def test_manual_attention_equals_multihead_attention():
    """The written-out attention is nn.MultiheadAttention's function, same parameters."""
    torch.manual_seed(0)
    manual = ViT(3 * 8 * 8, 4, patch_size=2, dim=12, depth=2, heads=3).double()
    torch_ = ViT(3 * 8 * 8, 4, patch_size=2, dim=12, depth=2, heads=3, attention="torch").double()
    rename = {"attn.qkv.weight": "attn.mha.in_proj_weight",
              "attn.qkv.bias": "attn.mha.in_proj_bias",
              "attn.proj.weight": "attn.mha.out_proj.weight",
              "attn.proj.bias": "attn.mha.out_proj.bias"}
    state = {}
    for k, v in manual.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        state[k] = v
    torch_.load_state_dict(state)
    X = torch.randn(5, 3 * 8 * 8, dtype=torch.float64)
    torch.testing.assert_close(torch_.eval()(X), manual.eval()(X), rtol=1e-12, atol=1e-12)
    assert arch.num_parameters(torch_) == arch.num_parameters(manual)


def test_synthetic_images_are_seeded_balanced_and_learnable():
    a = data.make_synthetic_images(200, 4, seed=1, size=8)
    b = data.load_dataset("synthetic-images", num_samples=200, num_classes=4, seed=1, size=8)
    assert torch.equal(a.X_train, b.X_train) and a.X_train.shape == (160, 3 * 64)
    assert torch.bincount(torch.cat([a.y_train, a.y_test])).tolist() == [50] * 4
    # the class templates carry the label: nearest class mean on the test set beats chance
    means = torch.stack([a.X_train[a.y_train == k].mean(0) for k in range(4)])
    pred = torch.cdist(a.X_test, means).argmin(1)
    assert (pred == a.y_test).float().mean() > 0.9


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("resnet"):
        m = ResNet2D(3 * 4 * 4, 3, width=1, num_blocks=1)
        m.train(name.endswith("train"))
    else:
        m = ViT(1 * 8 * 8, 3, in_channels=1, patch_size=4, dim=8, depth=1, heads=2, mlp_ratio=2)
    return m.double()


@pytest.mark.parametrize("name", ["resnet-train", "resnet-eval", "vit"])
def test_tiny_models_dense_vs_stochastic_trace(name):
    model = _tiny(name)
    g = torch.Generator().manual_seed(0)
    n_in = 3 * 4 * 4 if name.startswith("resnet") else 64
    X = torch.randn(16, n_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    if name == "resnet-eval":  # running statistics away from (0, 1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    H = torch.autograd.functional.hessian(space.loss_function, theta)  # not torch.func
    dense = cv.flatness(space, theta, measures=("trace",), method="dense")["trace"].value
    assert dense == pytest.approx(float(torch.trace(H)), rel=1e-10)
    est = cv.flatness(space, theta, measures=("trace",), method="stochastic", num_probes=1000,
                      seed=0)["trace"]
    assert abs(est.value - dense) <= 4 * est.stderr
    assert est.stderr < 0.15 * abs(dense)


@pytest.mark.parametrize("name", ["resnet2d", "vit"])
def test_checkpoint_round_trip_keeps_running_statistics(tmp_path, name):
    from covariant.zoo.checkpoints import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = arch.build(name, 3 * 8 * 8, 4, **({"width": 2} if name == "resnet2d" else
                                              {"patch_size": 4, "dim": 8, "heads": 2}))
    X = torch.randn(6, 3 * 8 * 8)
    model.train()(X)  # running statistics away from their initial values
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["arch"] == name
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    torch.testing.assert_close(loaded.eval()(X), model.eval()(X), rtol=0, atol=0)
