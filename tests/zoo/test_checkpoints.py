"""Tests of covariant.zoo.checkpoints: exact round trips, bare state dicts, helpful errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covariant.errors import ArchitectureMismatchError
from covariant.zoo import architectures as arch
from covariant.zoo import checkpoints as ckpt


@pytest.mark.parametrize("name", ["mlp-small", "cnn-small", "resnet1d-small"])
def test_checkpoint_round_trip_is_exact(tmp_path, name):
    torch.manual_seed(1)
    model = arch.preset(name)
    path = tmp_path / "sub" / "model.pt"
    ckpt.save_checkpoint(path, model, metadata={"epochs": 3, "note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == model.arch_name and raw["arch_kwargs"] == model.arch_kwargs

    rng = torch.get_rng_state()
    loaded, meta = ckpt.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not consume the global RNG
    assert type(loaded) is type(model) and not loaded.training
    assert meta["metadata"] == {"epochs": 3, "note": "x"} and meta["source"] == "checkpoint"
    X = torch.randn(5, 40)
    assert torch.equal(loaded(X), model(X))


def test_checkpoint_keeps_float64(tmp_path):
    model = arch.preset("mlp-small").double()
    ckpt.save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = ckpt.load_checkpoint(tmp_path / "m.pt")
    assert loaded[0].weight.dtype == torch.float64
    X = torch.randn(3, 40, dtype=torch.float64)
    assert torch.equal(loaded(X), model(X))


def test_bare_state_dict_and_prefixes(tmp_path):
    torch.manual_seed(2)
    model = arch.preset("mlp-small")
    X = torch.randn(4, 40)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ArchitectureMismatchError, match=r"arch='mlp'.*'hidden': \[32, 32\]"):
        ckpt.load_checkpoint(tmp_path / "sd.pt")
    loaded, meta = ckpt.load_checkpoint(
        tmp_path / "sd.pt", arch="mlp", in_features=40, num_classes=10, hidden=[32, 32]
    )
    assert meta["source"] == "state_dict" and torch.equal(loaded(X), model(X))
    # DataParallel-style "module." prefixes are removed
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    loaded, _ = ckpt.load_checkpoint(
        tmp_path / "dp.pt", arch="mlp", in_features=40, num_classes=10, hidden=[32, 32]
    )
    assert torch.equal(loaded(X), model(X))


def test_mismatched_checkpoint_raises_with_helpful_message(tmp_path):
    path = tmp_path / "m.pt"
    ckpt.save_checkpoint(path, arch.preset("mlp-small"))
    with pytest.raises(ArchitectureMismatchError) as err:
        ckpt.load_checkpoint(path, hidden=[64, 64])
    msg = str(err.value)
    assert "0.weight: checkpoint (32, 40) vs model (64, 40)" in msg
    assert "'hidden': [32, 32]" in msg  # what would fit
    assert isinstance(err.value, ValueError)

    with pytest.raises(ArchitectureMismatchError) as err:
        ckpt.load_checkpoint(path, arch="cnn1d")
    msg = str(err.value)
    assert "missing keys [features.0.weight" in msg and "unexpected keys [0.weight" in msg

    cnn = tmp_path / "cnn.pt"
    ckpt.save_checkpoint(cnn, arch.preset("cnn-small"))
    with pytest.raises(ArchitectureMismatchError, match=r"'channels': \[8, 16\]"):
        ckpt.load_checkpoint(cnn, channels=[8, 32])


def test_save_validates_recipe(tmp_path):
    model = arch.preset("mlp-small")
    with pytest.raises(ArchitectureMismatchError, match="refusing to save"):
        ckpt.save_checkpoint(tmp_path / "bad.pt", model, hidden=[16])
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(TypeError, match="cannot be stored"):
        ckpt.save_checkpoint(tmp_path / "bad.pt", model, metadata={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="arch="):
        ckpt.save_checkpoint(tmp_path / "bad.pt", nn.Linear(2, 2))
    # a plain nn.Sequential saves when the recipe is given, and loads as an MLP
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    ckpt.save_checkpoint(tmp_path / "seq.pt", seq, "mlp", in_features=3, num_classes=2,
                         hidden=(4,))
    loaded, meta = ckpt.load_checkpoint(tmp_path / "seq.pt")
    assert meta["arch_kwargs"]["hidden"] == [4]
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), seq(x))


# --------------------------------------------------------------------------------------------
# Integrity: checksums, corrupted and unreadable files (issue 10)
# --------------------------------------------------------------------------------------------


def _small(tmp_path):
    torch.manual_seed(0)
    model = arch.build("mlp", 6, 3, hidden=(4,))
    path = tmp_path / "m.pt"
    ckpt.save_checkpoint(path, model)
    return model, path


def test_checkpoint_stores_a_sha256_of_its_contents(tmp_path):
    _, path = _small(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["sha256"], str) and len(raw["sha256"]) == 64


def test_flipped_weight_bytes_are_detected(tmp_path):
    """Bytes flipped inside a tensor's data used to load silently with other weights."""
    model, path = _small(tmp_path)
    data = bytearray(path.read_bytes())
    start = bytes(data).find(next(model.parameters()).detach().numpy().tobytes())
    assert start > 0
    for i in range(start, start + 16):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.load_checkpoint(path)


def test_changed_tensors_in_a_valid_container_fail_the_sha256(tmp_path):
    """The zip CRCs are rewritten by torch.save; the stored SHA-256 still catches the change."""
    _, path = _small(tmp_path)
    raw = torch.load(path, weights_only=True)
    torch.save(raw, path)  # re-saved unchanged: still loads
    ckpt.load_checkpoint(path)
    raw["state_dict"]["0.weight"][0, 0] += 1.0
    torch.save(raw, path)
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(path)
    raw["state_dict"]["0.weight"][0, 0] -= 1.0
    raw["metadata"] = {"note": "edited"}  # the recipe and metadata are covered too
    torch.save(raw, path)
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(path)


def test_checkpoint_without_hash_loads_with_a_warning(tmp_path):
    model, path = _small(tmp_path)
    raw = torch.load(path, weights_only=True)
    del raw["sha256"]
    torch.save(raw, path)
    with pytest.warns(UserWarning, match="no checksum"):
        loaded, _ = ckpt.load_checkpoint(path)
    X = torch.randn(2, 6)
    assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "random"])
def test_unreadable_files_raise_checkpoint_error(tmp_path, kind):
    _, path = _small(tmp_path)
    data = path.read_bytes()
    content = {"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello world\n",
               "random": bytes(range(256)) * 4}[kind]
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="empty|not a readable|corrupted"):
        ckpt.load_checkpoint(path, arch="mlp", in_features=6, num_classes=3, hidden=[4])


def test_directory_and_missing_file_are_clear_os_errors(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        ckpt.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


def test_pickled_module_says_to_save_a_state_dict(tmp_path):
    model, _ = _small(tmp_path)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ckpt.CheckpointError, match="state_dict.*save_checkpoint"):
        ckpt.load_checkpoint(path)
