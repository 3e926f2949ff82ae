"""Tests of covariant.zoo.data: generated / bundled datasets, registry and batching."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from covariant.errors import MissingDependencyError, ShapeMismatchError
from covariant.zoo import data

# --------------------------------------------------------------------------------------------
# MNIST-1D (generator only)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_small() -> data.Dataset:
    pytest.importorskip("mnist1d")
    return data.load_mnist1d(500, seed=0)


def test_mnist1d_shapes_dtypes_and_classes(mnist_small):
    ds = mnist_small
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.num_features == 40
    assert ds.X_train.shape == (400, 40) and ds.X_test.shape == (100, 40)
    assert ds.y_train.shape == (400,) and ds.y_test.shape == (100,)
    assert ds.X_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    y = torch.cat([ds.y_train, ds.y_test])
    # the generator makes num_samples // 10 examples of each class
    assert torch.bincount(y, minlength=10).tolist() == [50] * 10
    assert set(ds.y_train.tolist()) == set(range(10))


def test_mnist1d_is_standardised(mnist_small):
    X = torch.cat([mnist_small.X_train, mnist_small.X_test]).double()
    # the generator centres and scales the whole set (train + test) to mean 0, std 1
    assert abs(X.mean().item()) < 1e-6
    assert X.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(X).all()


def test_mnist1d_seed_determinism(mnist_small):
    again = data.load_mnist1d(500, seed=0)
    assert torch.equal(again.X_train, mnist_small.X_train)
    assert torch.equal(again.y_test, mnist_small.y_test)
    other = data.load_mnist1d(500, seed=1)
    assert (other.X_train - mnist_small.X_train).abs().max() > 1.0
    assert not torch.equal(other.y_train, mnist_small.y_train)


def test_mnist1d_options_dtype_split_and_generator_args(mnist_small):
    ds = data.load_mnist1d(500, seed=0, train_split=0.5, dtype=torch.float64)
    assert ds.X_train.shape == (250, 40) and ds.X_test.shape == (250, 40)
    assert ds.X_train.dtype == torch.float64
    # same generator draw, other split point: the first 250 rows agree up to float32 rounding
    torch.testing.assert_close(ds.X_train[:250].float(), mnist_small.X_train[:250])
    shuffled = data.load_mnist1d(500, seed=0, shuffle_seq=True)
    assert torch.equal(shuffled.y_train, mnist_small.y_train)
    assert not torch.allclose(shuffled.X_train, mnist_small.X_train)
    with pytest.raises(ValueError, match="iid_noise_scale"):
        data.load_mnist1d(500, not_an_arg=1)
    with pytest.raises(ValueError, match="train_split"):
        data.load_mnist1d(500, train_split=1.0)


def test_mnist1d_restores_global_rngs(mnist_small):
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    expected = (random.random(), np.random.rand())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    data.load_mnist1d(100, seed=7)
    assert (random.random(), np.random.rand()) == expected  # noqa: NPY002


def test_mnist1d_never_downloads(monkeypatch, mnist_small):
    import mnist1d.data as mdata
    import requests

    def forbidden(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(mdata, "get_dataset", forbidden)
    monkeypatch.setattr(requests, "get", forbidden)
    monkeypatch.setattr(requests.Session, "request", forbidden)
    ds = data.load_mnist1d(500, seed=0)
    assert torch.equal(ds.X_train, mnist_small.X_train)


def test_mnist1d_cache(tmp_path, monkeypatch, mnist_small):
    ds = data.load_mnist1d(500, seed=0, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("mnist1d-") and files[0].suffix == ".npz"
    assert torch.equal(ds.X_train, mnist_small.X_train)

    def no_generation(args):
        raise AssertionError("cache miss")

    monkeypatch.setattr(data, "_mnist1d_generate", no_generation)
    cached = data.load_mnist1d(500, seed=0, cache_dir=tmp_path, dtype=torch.float64)
    assert torch.equal(cached.X_train.float(), mnist_small.X_train)
    assert torch.equal(cached.y_test, mnist_small.y_test)
    monkeypatch.undo()

    # another seed is another key; a corrupt file is regenerated and overwritten atomically
    data.load_mnist1d(200, seed=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2
    files[0].write_bytes(b"not a zip file")
    again = data.load_mnist1d(500, seed=0, cache_dir=tmp_path)
    assert torch.equal(again.X_train, mnist_small.X_train)
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(MissingDependencyError, match=r"covariant\[data\]"):
        data.load_mnist1d(100)


# --------------------------------------------------------------------------------------------
# sklearn digits
# --------------------------------------------------------------------------------------------


def test_digits_shapes_standardisation_and_stratification():
    pytest.importorskip("sklearn")
    ds = data.load_digits(seed=0)
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.X_train.shape == (1437, 64) and ds.X_test.shape == (360, 64)
    assert ds.y_train.dtype == torch.int64
    mean = ds.X_train.double().mean(0)
    std = ds.X_train.double().std(0, correction=0)
    assert mean.abs().max() < 1e-6
    varying = std > 0
    assert int(varying.sum()) >= 60  # a few border pixels are always 0
    torch.testing.assert_close(std[varying], torch.ones_like(std[varying]), atol=1e-5, rtol=0)
    counts = torch.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 per class
    again = data.load_digits(seed=0)
    assert torch.equal(again.X_train, ds.X_train)
    other = data.load_digits(seed=1)
    assert not torch.equal(other.y_train, ds.y_train)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def test_synthetic_classification():
    state = torch.get_rng_state()
    ds = data.make_synthetic_classification(300, 5, 3, seed=4, separation=10.0, noise=0.1)
    assert torch.equal(torch.get_rng_state(), state)  # private generator only
    assert ds.X_train.shape == (240, 5) and ds.X_test.shape == (60, 5)
    y = torch.cat([ds.y_train, ds.y_test])
    assert torch.bincount(y).tolist() == [100, 100, 100]
    # well separated blobs: nearest class mean (fitted on train) classifies the test set
    means = torch.stack([ds.X_train[ds.y_train == k].mean(0) for k in range(3)])
    pred = torch.cdist(ds.X_test, means).argmin(1)
    assert (pred == ds.y_test).float().mean().item() == 1.0
    again = data.make_synthetic_classification(300, 5, 3, seed=4, separation=10.0, noise=0.1)
    assert torch.equal(again.X_test, ds.X_test)
    assert not torch.equal(data.make_synthetic_classification(300, 5, 3, seed=5).y_train,
                           ds.y_train)


def test_synthetic_regression_linear_teacher_is_exact():
    ds = data.make_synthetic_regression(
        100, 4, seed=0, num_outputs=2, hidden=0, noise=0.0, dtype=torch.float64
    )
    assert ds.num_classes == 0 and not ds.is_classification
    assert ds.y_train.shape == (80, 2) and ds.y_train.dtype == torch.float64
    W = torch.linalg.lstsq(ds.X_train, ds.y_train).solution
    torch.testing.assert_close(ds.X_test @ W, ds.y_test, atol=1e-10, rtol=0)
    noisy = data.make_synthetic_regression(100, 4, seed=0, noise=0.5)
    clean = data.make_synthetic_regression(100, 4, seed=0, noise=0.0)
    resid = (noisy.y_train - clean.y_train).std().item()
    assert 0.4 < resid < 0.6


def test_dataset_to_casts_features_not_labels():
    ds = data.make_synthetic_classification(20, 3, 2).to(torch.float64)
    assert ds.X_train.dtype == torch.float64 and ds.y_train.dtype == torch.int64
    reg = data.make_synthetic_regression(20, 3).to(torch.float64)
    assert reg.y_test.dtype == torch.float64
    assert "X_train=(16, 3)" in repr(ds)


def test_load_dataset_registry():
    ds = data.load_dataset("synthetic", num_samples=50, num_features=3, num_classes=2, seed=1)
    ref = data.make_synthetic_classification(50, 3, 2, seed=1)
    assert torch.equal(ds.X_train, ref.X_train)
    assert {"mnist1d", "digits", "synthetic"} <= set(data.DATASETS)
    with pytest.raises(ValueError, match=r"mnist1d.*synthetic"):
        data.load_dataset("cifar10")


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_each_example_once(shuffle):
    X = torch.arange(100.0).reshape(50, 2)
    y = torch.arange(50)
    out = data.batches(X, y, 16, shuffle=shuffle, seed=3)
    assert [len(b[1]) for b in out] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in out])
    assert sorted(seen.tolist()) == list(range(50))
    for xb, yb in out:  # rows stay paired with their labels
        assert torch.equal(xb[:, 0], 2.0 * yb)
    assert torch.equal(seen, y) != shuffle


def test_batches_shuffle_is_seeded_and_validated():
    X, y = torch.randn(30, 3), torch.arange(30)
    a = torch.cat([b[1] for b in data.batches(X, y, 7, shuffle=True, seed=0)])
    b = torch.cat([b[1] for b in data.batches(X, y, 7, shuffle=True, seed=0)])
    c = torch.cat([b[1] for b in data.batches(X, y, 7, shuffle=True, seed=1)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(data.batches(X, y, 100)) == 1
    with pytest.raises(ShapeMismatchError):
        data.batches(X, y[:-1], 4)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(X, y, 0)
