"""Bundled and generated datasets; nothing is ever downloaded.

* :func:`load_mnist1d` runs the `mnist1d <https://github.com/greydanus/mnist1d>`_ *generator*
  (``mnist1d.data.make_dataset``) locally. It never calls ``get_dataset(download=True)`` and
  never touches the URL in the generator's arguments.
* :func:`load_digits` uses the 8×8 digits that ship inside scikit-learn.
* :func:`make_synthetic_classification`, :func:`make_synthetic_regression` and
  :func:`make_synthetic_images` (CIFAR-shaped, 3 × 32 × 32) are pure torch.

mnist1d and scikit-learn are optional (``pip install 'covariant[data]'``); they are imported
only when their loader is called. Every loader returns a :class:`Dataset`.

Example
-------
>>> from covariant.zoo.data import load_dataset, batches
>>> ds = load_dataset("synthetic", num_samples=100, num_features=5, num_classes=3)
>>> ds.X_train.shape, ds.num_classes
(torch.Size([80, 5]), 3)
>>> len(batches(ds.X_train, ds.y_train, 32))
3
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_savez
from ..errors import ShapeMismatchError, require

__all__ = [
    "DATASETS",
    "Dataset",
    "batches",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "make_synthetic_classification",
    "make_synthetic_images",
    "make_synthetic_regression",
]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of a supervised dataset.

    Attributes
    ----------
    X_train, X_test : torch.Tensor
        Features, shape ``(n, num_features)``.
    y_train, y_test : torch.Tensor
        Targets: ``int64`` class labels of shape ``(n,)`` for classification, floating
        targets of shape ``(n, num_outputs)`` for regression.
    num_classes : int
        Number of classes; ``0`` for a regression dataset.
    name : str
        Short name, e.g. ``"mnist1d"``.

    Example
    -------
    >>> ds = make_synthetic_classification(50, 4, 2, seed=0)
    >>> ds.to(torch.float64).X_train.dtype
    torch.float64
    >>> ds.num_features, ds.is_classification
    (4, True)
    """

    X_train: torch.Tensor = dataclasses.field(repr=False)
    y_train: torch.Tensor = dataclasses.field(repr=False)
    X_test: torch.Tensor = dataclasses.field(repr=False)
    y_test: torch.Tensor = dataclasses.field(repr=False)
    num_classes: int
    name: str

    @property
    def num_features(self) -> int:
        """Number of input features (the length of one input vector)."""
        return int(self.X_train.shape[-1])

    @property
    def is_classification(self) -> bool:
        """``True`` when the targets are class labels."""
        return self.num_classes > 0

    def to(
        self, dtype: torch.dtype | None = None, *, device: torch.device | str | None = None
    ) -> Dataset:
        """Return a copy with the features (and floating targets) cast to ``dtype``/``device``.

        Integer class labels keep their ``int64`` dtype; only their device changes.
        """

        def cast(t: torch.Tensor) -> torch.Tensor:
            keep = not t.is_floating_point()
            return t.to(device=device, dtype=None if keep else dtype)

        return dataclasses.replace(
            self,
            X_train=cast(self.X_train),
            y_train=cast(self.y_train),
            X_test=cast(self.X_test),
            y_test=cast(self.y_test),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, num_classes={self.num_classes}, "
            f"X_train={tuple(self.X_train.shape)}, X_test={tuple(self.X_test.shape)}, "
            f"dtype={self.X_train.dtype})"
        )


# --------------------------------------------------------------------------------------------
# MNIST-1D
# --------------------------------------------------------------------------------------------

_MNIST1D_FIXED = ("num_samples", "seed", "train_split", "url")


def _mnist1d_generate(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the mnist1d generator with ``args`` without disturbing the global RNGs."""
    mdata = require("mnist1d.data", "data")
    gen_args = mdata.get_dataset_args()
    for key, value in args.items():
        setattr(gen_args, key, value)
    # make_dataset seeds Python's and NumPy's *global* generators: restore them afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        raw = mdata.make_dataset(gen_args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}


def _mnist1d_args(num_samples: int, seed: int, train_split: float,
                  generator_args: dict[str, Any]) -> dict[str, Any]:
    """The generator's arguments: its defaults (without the URL) updated with ours, checked."""
    if num_samples < 20:
        raise ValueError(f"num_samples={num_samples} is too small: use at least 20 (2 per class)")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split={train_split} must lie strictly between 0 and 1")
    mdata = require("mnist1d.data", "data")
    defaults = mdata.get_dataset_args(as_dict=True)
    allowed = sorted(k for k in defaults if k not in _MNIST1D_FIXED)
    unknown = sorted(set(generator_args) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown mnist1d generator argument(s) {unknown}; choose from {allowed} "
            "(num_samples, seed and train_split are arguments of load_mnist1d itself)"
        )
    args = {k: v for k, v in defaults.items() if k != "url"}
    args.update(generator_args, num_samples=num_samples, seed=seed, train_split=train_split)
    return args


def _mnist1d_cached(args: dict[str, Any], cache_dir: str | os.PathLike[str]
                    ) -> dict[str, np.ndarray]:
    """The generated arrays from ``cache_dir/mnist1d-<key>.npz``, keyed by every generator
    argument and the mnist1d version; generated and written (atomically) when missing."""
    try:
        mnist1d_version = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - editable/odd installs
        mnist1d_version = "unknown"
    key_doc = json.dumps({"args": args, "mnist1d": mnist1d_version}, sort_keys=True)
    key = hashlib.sha256(key_doc.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key_doc:
                    return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable or foreign cache file: regenerate and overwrite
    arrays = _mnist1d_generate(args)
    atomic_savez(path, key=np.array(key_doc), **arrays)
    return arrays


def load_mnist1d(
    num_samples: int = 4000,
    *,
    seed: int = 42,
    train_split: float = 0.8,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    **generator_args: Any,
) -> Dataset:
    """Generate MNIST-1D locally with the ``mnist1d`` package's generator.

    The generator makes ``num_samples // 10`` examples per class, shuffles them, centres and
    scales the whole set to mean 0 and standard deviation 1, and splits it into the first
    ``int(train_split * n)`` examples for training and the rest for testing. With the default
    ``seed=42`` and ``num_samples=5000`` this is the published MNIST-1D.

    Parameters
    ----------
    num_samples : int, default 4000
        Total number of examples before the split (rounded down to a multiple of 10).
    seed : int, default 42
        Seed of the generator. The global ``random`` / ``numpy.random`` states, which the
        generator reseeds, are restored afterwards.
    train_split : float, default 0.8
        Fraction of examples in the training set, in (0, 1).
    dtype : torch.dtype, default torch.float32
        Dtype of the features. Labels are ``int64``.
    cache_dir : path, optional
        If given, the generated arrays are cached in ``cache_dir/mnist1d-<key>.npz`` (written
        atomically), keyed by all generator arguments and the mnist1d version.
    **generator_args
        Other arguments of ``mnist1d.data.get_dataset_args()``, e.g. ``iid_noise_scale`` or
        ``shuffle_seq``.

    Returns
    -------
    Dataset
        ``X_*`` of shape ``(n, 40)`` (``final_seq_length``), ``y_*`` of dtype ``int64``,
        ``num_classes=10``, ``name="mnist1d"``.

    Raises
    ------
    covariant.errors.MissingDependencyError
        If mnist1d is not installed (``pip install 'covariant[data]'``).

    Example
    -------
    >>> ds = load_mnist1d(200, seed=0)
    >>> ds.X_train.shape, ds.X_test.shape, ds.num_classes
    (torch.Size([160, 40]), torch.Size([40, 40]), 10)
    """
    args = _mnist1d_args(int(num_samples), int(seed), train_split, generator_args)
    arrays = _mnist1d_generate(args) if cache_dir is None else _mnist1d_cached(args, cache_dir)

    def feats(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64)).to(dtype)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.int64))

    return Dataset(
        X_train=feats(arrays["x"]),
        y_train=labels(arrays["y"]),
        X_test=feats(arrays["x_test"]),
        y_test=labels(arrays["y_test"]),
        num_classes=10,
        name="mnist1d",
    )


# --------------------------------------------------------------------------------------------
# sklearn digits
# --------------------------------------------------------------------------------------------


def load_digits(
    *, seed: int = 0, test_fraction: float = 0.2, dtype: torch.dtype = torch.float32
) -> Dataset:
    """The 8×8 handwritten digits bundled with scikit-learn (1797 images, 10 classes).

    The split is stratified and seeded. Features are standardised with the *training*
    mean and standard deviation per pixel, x ← (x − μ_train) / σ_train; pixels that are
    constant in the training set (σ = 0) are only centred.

    Parameters
    ----------
    seed : int, default 0
        Seed of the stratified train/test split.
    test_fraction : float, default 0.2
        Fraction of examples in the test set, in (0, 1).
    dtype : torch.dtype, default torch.float32
        Dtype of the features. Labels are ``int64``.

    Returns
    -------
    Dataset
        ``X_*`` of shape ``(n, 64)``, ``num_classes=10``, ``name="digits"``.

    Example
    -------
    >>> ds = load_digits()
    >>> ds.X_train.shape, ds.X_test.shape
    (torch.Size([1437, 64]), torch.Size([360, 64]))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    skd = require("sklearn.datasets", "data")
    skms = require("sklearn.model_selection", "data")
    X, y = skd.load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = skms.train_test_split(
        X.astype(np.float64), y.astype(np.int64),
        test_size=test_fraction, random_state=seed, stratify=y,
    )
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std[std == 0] = 1.0
    X_tr = (X_tr - mean) / std
    X_te = (X_te - mean) / std
    return Dataset(
        X_train=torch.as_tensor(X_tr).to(dtype),
        y_train=torch.as_tensor(y_tr),
        X_test=torch.as_tensor(X_te).to(dtype),
        y_test=torch.as_tensor(y_te),
        num_classes=10,
        name="digits",
    )


# --------------------------------------------------------------------------------------------
# Synthetic data (pure torch)
# --------------------------------------------------------------------------------------------


def _num_train(num_samples: int, test_fraction: float) -> int:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie in [0, 1)")
    n_train = num_samples - round(test_fraction * num_samples)
    if n_train < 1:
        raise ValueError(f"num_samples={num_samples} leaves no training examples")
    return n_train


def make_synthetic_classification(
    num_samples: int = 1000,
    num_features: int = 20,
    num_classes: int = 3,
    seed: int = 0,
    *,
    separation: float = 2.0,
    noise: float = 1.0,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Gaussian blobs: balanced classes around random centres.

    Centres c_k ~ N(0, separation² I) for k < num_classes; each example is
    x = c_y + noise · ε with ε ~ N(0, I). Labels are balanced (``i % num_classes``) and
    shuffled; the last ``round(test_fraction · num_samples)`` examples form the test set.

    Parameters
    ----------
    num_samples, num_features, num_classes : int
        Sizes.
    seed : int, default 0
        Seed of a private ``torch.Generator``; the global RNG is untouched.
    separation, noise : float
        Scale of the centres and of the within-class noise.
    test_fraction : float, default 0.2
        Fraction of examples in the test set, in [0, 1).
    dtype : torch.dtype, default torch.float32
        Dtype of the features.

    Example
    -------
    >>> ds = make_synthetic_classification(100, 5, 4, seed=1)
    >>> ds.X_train.shape, ds.y_train.dtype, int(ds.y_train.max()) < 4
    (torch.Size([80, 5]), torch.int64, True)
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    if num_features < 1 or num_samples < 1:
        raise ValueError("num_samples and num_features must be positive")
    n_train = _num_train(num_samples, test_fraction)
    g = torch.Generator().manual_seed(int(seed))
    centres = separation * torch.randn(num_classes, num_features, generator=g, dtype=torch.float64)
    y = torch.arange(num_samples) % num_classes
    y = y[torch.randperm(num_samples, generator=g)]
    eps = torch.randn(num_samples, num_features, generator=g, dtype=torch.float64)
    X = (centres[y] + noise * eps).to(dtype)
    return Dataset(X[:n_train], y[:n_train], X[n_train:], y[n_train:], num_classes, "synthetic")


def make_synthetic_regression(
    num_samples: int = 1000,
    num_features: int = 10,
    seed: int = 0,
    *,
    num_outputs: int = 1,
    hidden: int = 16,
    noise: float = 0.1,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Targets from a random one-hidden-layer tanh teacher plus Gaussian noise.

    x ~ N(0, I), and y = tanh(x W₁ / √num_features) W₂ / √hidden + noise · ε with
    W₁, W₂, ε standard normal. ``hidden=0`` gives a linear teacher y = x W / √num_features.

    Parameters
    ----------
    num_samples, num_features : int
        Sizes.
    seed : int, default 0
        Seed of a private ``torch.Generator``.
    num_outputs : int, default 1
        Target dimension; ``y`` has shape ``(n, num_outputs)``.
    hidden : int, default 16
        Width of the teacher (0: linear teacher).
    noise : float, default 0.1
        Standard deviation of the label noise.
    test_fraction : float, default 0.2
        Fraction of examples in the test set, in [0, 1).
    dtype : torch.dtype, default torch.float32
        Dtype of features and targets.

    Returns
    -------
    Dataset
        With ``num_classes=0`` and ``name="synthetic-regression"``.

    Example
    -------
    >>> ds = make_synthetic_regression(50, 3, seed=0, num_outputs=2)
    >>> ds.y_train.shape, ds.num_classes
    (torch.Size([40, 2]), 0)
    """
    if num_features < 1 or num_samples < 1 or num_outputs < 1:
        raise ValueError("num_samples, num_features and num_outputs must be positive")
    n_train = _num_train(num_samples, test_fraction)
    g = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    X = torch.randn(num_samples, num_features, generator=g, dtype=f64)
    if hidden > 0:
        W1 = torch.randn(num_features, hidden, generator=g, dtype=f64)
        W2 = torch.randn(hidden, num_outputs, generator=g, dtype=f64)
        clean = torch.tanh(X @ W1 / math.sqrt(num_features)) @ W2 / math.sqrt(hidden)
    else:
        W = torch.randn(num_features, num_outputs, generator=g, dtype=f64)
        clean = X @ W / math.sqrt(num_features)
    y = clean + noise * torch.randn(num_samples, num_outputs, generator=g, dtype=f64)
    X, y = X.to(dtype), y.to(dtype)
    return Dataset(X[:n_train], y[:n_train], X[n_train:], y[n_train:], 0, "synthetic-regression")


def make_synthetic_images(
    num_samples: int = 1000, num_classes: int = 10, seed: int = 0, *, channels: int = 3,
    size: int = 32, noise: float = 1.0, test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """CIFAR-shaped images (3 × 32 × 32 by default): a smooth class template plus noise.

    Each class k has a template T_k, a ``channels × 4 × 4`` standard normal grid upsampled
    bilinearly to ``size × size``; an example is x = T_y + noise · ε with ε ~ N(0, I).
    Labels are balanced and shuffled. Images are stored flat, ``(n, channels·size²)``, like
    every :class:`Dataset` (``X.view(-1, channels, size, size)`` gives them back); the image
    models of :mod:`covariant.zoo.vision` take either form.

    Example
    -------
    >>> ds = make_synthetic_images(20, 10, seed=0)
    >>> ds.X_train.shape, ds.num_features == 3 * 32 * 32, ds.name
    (torch.Size([16, 3072]), True, 'synthetic-images')
    """
    if num_classes < 2 or channels < 1 or size < 1 or num_samples < 1:
        raise ValueError("num_classes must be at least 2; num_samples, channels, size positive")
    n_train = _num_train(num_samples, test_fraction)
    g = torch.Generator().manual_seed(int(seed))
    grid = torch.randn(num_classes, channels, 4, 4, generator=g, dtype=torch.float64)
    templates = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear",
                                                align_corners=False).flatten(1)
    y = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=g)]
    eps = torch.randn(num_samples, templates.shape[1], generator=g, dtype=torch.float64)
    X = (templates[y] + noise * eps).to(dtype)
    return Dataset(X[:n_train], y[:n_train], X[n_train:], y[n_train:], num_classes,
                   "synthetic-images")


# --------------------------------------------------------------------------------------------
# Registry and batching
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "synthetic": make_synthetic_classification,
    "synthetic-regression": make_synthetic_regression,
    "synthetic-images": make_synthetic_images,
}
"""Name → loader. ``load_dataset(name, **kw)`` calls ``DATASETS[name](**kw)``."""


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by name: ``"mnist1d"``, ``"digits"``, ``"synthetic"``,
    ``"synthetic-regression"`` or ``"synthetic-images"``; keyword arguments go to the loader.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`DATASETS`; the message lists the choices.

    Example
    -------
    >>> load_dataset("synthetic", num_samples=10, num_features=2, num_classes=2).name
    'synthetic'
    """
    key = name.lower().replace("_", "-")
    if key == "mnist-1d":
        key = "mnist1d"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[key](**kwargs)


def batches(
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``(X, y)`` into mini-batches that cover every example exactly once.

    All batches have ``batch_size`` examples except possibly the last, which holds the rest.
    With ``shuffle=True`` the order is a permutation drawn from a private generator seeded
    with ``seed`` (the global RNG is untouched).

    Parameters
    ----------
    X, y : torch.Tensor
        Inputs and targets with the same first dimension.
    batch_size : int
        Positive batch size.
    shuffle : bool, default False
        Shuffle before splitting.
    seed : int, default 0
        Seed of the permutation.

    Returns
    -------
    list of (X_batch, y_batch)

    Example
    -------
    >>> X, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    >>> [b[1].tolist() for b in batches(X, y, 2)]
    [[0, 1], [2, 3], [4]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if X.shape[0] != y.shape[0]:
        raise ShapeMismatchError(
            f"X has {X.shape[0]} examples but y has {y.shape[0]}; they must match"
        )
    n = X.shape[0]
    if shuffle:
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=g).to(X.device)
        return [
            (X[idx], y[idx.to(y.device)])
            for idx in torch.split(order, batch_size)
        ]
    return list(zip(torch.split(X, batch_size), torch.split(y, batch_size), strict=True))
