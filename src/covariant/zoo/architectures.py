"""Small architectures for 1-D inputs (MNIST-1D, digits, tabular data), and the registry.

Three 1-D families, all taking inputs of shape ``(N, L)`` (or one example of shape ``(L,)``, so
that ``torch.func.vmap`` over examples works) and returning logits ``(N, num_classes)``:

========== ================================================================================
``mlp``    :class:`MLP`, a ``nn.Sequential``: Linear layers at even indices, activations in
           between. Parameter names are ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ... the
           same as a hand-written ``nn.Sequential(nn.Linear, nn.Tanh, nn.Linear, ...)``.
``cnn1d``  :class:`CNN1D`, convolutions ``features.{2i}`` then a linear head ``head.{2j}``.
``resnet1d`` :class:`ResNet1D`, a stem convolution, residual blocks ``blocks.{i}`` and a
           global-average-pool head ``fc``.
========== ================================================================================

The registry :data:`ARCHITECTURES` also holds the image models of :mod:`covariant.zoo.vision`:
``resnet2d`` (:class:`~covariant.zoo.vision.ResNet2D`, a CIFAR-style ResNet with batch norm)
and ``vit`` (:class:`~covariant.zoo.vision.ViT`, a small vision transformer).

None of the 1-D families uses BatchNorm: in training mode it makes one example's output
depend on the rest of its batch, which breaks per-example ``vmap`` over a batch.
``ParameterSpace.from_module`` handles it (each batch it is given is one batch-norm batch,
and the running statistics are never updated). :class:`ResNet1D` offers GroupNorm
(``norm="group"``), which is per-example and stateless.

Named presets (:data:`PRESETS`, :func:`preset`) fix sizes used across the project;
:mod:`covariant.zoo.checkpoints` stores a model with the recipe to rebuild it.

Example
-------
>>> import torch
>>> from covariant.zoo.architectures import build, preset, num_parameters
>>> model = build("mlp", 40, 10, hidden=(16,))
>>> model(torch.zeros(3, 40)).shape
torch.Size([3, 10])
>>> [name for name, _ in model.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
>>> num_parameters(preset("mlp-small"))
2698
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .vision import ResNet2D, ViT

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "CNN1D",
    "MLP",
    "PRESETS",
    "ResNet1D",
    "ResNet2D",
    "ViT",
    "build",
    "num_parameters",
    "preset",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
}
"""Activation name → module class. Smooth ones (tanh, gelu, silu, softplus) have non-zero
second derivatives, which matters for Hessians and Christoffel symbols."""


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        ) from None


def _ints(name: str, values: int | Sequence[int], *, allow_empty: bool = True) -> tuple[int, ...]:
    out = (int(values),) if isinstance(values, int) else tuple(int(v) for v in values)
    if any(v < 1 for v in out) or (not out and not allow_empty):
        raise ValueError(f"{name}={values!r} must be {'a' if allow_empty else 'a non-empty'} "
                         "sequence of positive integers")
    return out


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not).

    Example
    -------
    >>> num_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters())


def _as_batched(x: torch.Tensor, in_features: int | None) -> tuple[torch.Tensor, bool]:
    """Bring ``(L,)``, ``(N, L)`` or ``(N, 1, L)`` to ``(N, 1, L)``; report if unbatched."""
    if x.dim() == 1:
        return x.reshape(1, 1, -1), True
    if x.dim() == 2:
        return x.unsqueeze(1), False
    if x.dim() == 3 and x.shape[1] == 1:
        return x, False
    raise ValueError(
        f"expected input of shape (L,), (N, L) or (N, 1, L), got {tuple(x.shape)}"
        + (f" with L={in_features}" if in_features is not None else "")
    )


class MLP(nn.Sequential):
    """Multi-layer perceptron ``Linear → act → ... → Linear``.

    It is an ``nn.Sequential``: Linear layers sit at the even indices, so parameters are named
    ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ..., and the output layer is
    ``f"{2 * len(hidden)}.weight"``. A state dict of the equivalent hand-written
    ``nn.Sequential`` loads directly.

    Parameters
    ----------
    in_features, num_classes : int
        Input and output sizes.
    hidden : sequence of int, default (64, 64)
        Hidden widths; ``()`` gives a linear (softmax-regression) model.
    activation : str, default "tanh"
        One of :data:`ACTIVATIONS`.
    bias : bool, default True
        Whether the Linear layers have biases.

    Example
    -------
    >>> m = MLP(40, 10, hidden=(8, 8), activation="relu")
    >>> m(torch.zeros(2, 40)).shape, sum(p.numel() for p in m.parameters())
    (torch.Size([2, 10]), 490)
    """

    arch_name = "mlp"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        bias: bool = True,
    ) -> None:
        hidden = _ints("hidden", hidden)
        sizes = (int(in_features), *hidden, int(num_classes))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            if i > 0:
                layers.append(_activation(activation))
            layers.append(nn.Linear(a, b, bias=bias))
        super().__init__(*layers)
        self.arch_kwargs: dict[str, Any] = {
            "in_features": int(in_features),
            "num_classes": int(num_classes),
            "hidden": list(hidden),
            "activation": activation,
            "bias": bool(bias),
        }


class CNN1D(nn.Module):
    """1-D convolutional network: ``[Conv1d → act] × k``, flatten or average-pool, MLP head.

    Inputs ``(N, L)`` get a channel dimension inside. Convolutions use padding
    ``kernel_size // 2`` and stride ``stride``, so each one maps length L to
    ``(L - 1) // stride + 1`` (for odd kernel sizes).

    Parameter names: convolutions ``features.{2i}.weight`` / ``.bias``; head Linear layers
    ``head.{2j}.weight`` / ``.bias``, the last one being the output layer.

    Parameters
    ----------
    in_features : int
        Input length L (needed by the ``"flatten"`` head).
    num_classes : int
        Number of outputs.
    channels : sequence of int, default (16, 32)
        Output channels of each convolution.
    kernel_size : int, default 5
        Kernel size of every convolution.
    stride : int, default 2
        Stride of every convolution.
    hidden : sequence of int, default ()
        Hidden widths of the head between the pooled features and the output layer.
    activation : str, default "relu"
        One of :data:`ACTIVATIONS`.
    pool : {"flatten", "mean"}, default "flatten"
        Flatten channels × length, or average over length (then L may vary).

    Example
    -------
    >>> m = CNN1D(40, 10, channels=(4, 8))
    >>> m(torch.zeros(2, 40)).shape
    torch.Size([2, 10])
    >>> m.feature_length  # 40 -> 20 -> 10
    10
    """

    arch_name = "cnn1d"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
        stride: int = 2,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        pool: str = "flatten",
    ) -> None:
        super().__init__()
        channels = _ints("channels", channels, allow_empty=False)
        hidden = _ints("hidden", hidden)
        if pool not in ("flatten", "mean"):
            raise ValueError(f"pool={pool!r} must be 'flatten' or 'mean'")
        if kernel_size < 1 or stride < 1:
            raise ValueError("kernel_size and stride must be positive")
        self.in_features = int(in_features)
        self.pool = pool
        feats: list[nn.Module] = []
        length, c_in = self.in_features, 1
        for c_out in channels:
            feats += [
                nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2),
                _activation(activation),
            ]
            length = (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1
            c_in = c_out
        if length < 1:
            raise ValueError(
                f"in_features={in_features} is too short for {len(channels)} convolutions "
                f"with kernel_size={kernel_size}, stride={stride}"
            )
        self.feature_length = length
        self.features = nn.Sequential(*feats)
        width = c_in * length if pool == "flatten" else c_in
        head: list[nn.Module] = []
        for h in hidden:
            head += [nn.Linear(width, h), _activation(activation)]
            width = h
        head.append(nn.Linear(width, int(num_classes)))
        self.head = nn.Sequential(*head)
        self.arch_kwargs: dict[str, Any] = {
            "in_features": self.in_features,
            "num_classes": int(num_classes),
            "channels": list(channels),
            "kernel_size": int(kernel_size),
            "stride": int(stride),
            "hidden": list(hidden),
            "activation": activation,
            "pool": pool,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)`` (or ``(num_classes,)`` for one example)."""
        x, single = _as_batched(x, self.in_features)
        z = self.features(x)
        z = z.flatten(1) if self.pool == "flatten" else z.mean(-1)
        out = self.head(z)
        return out.squeeze(0) if single else out


class _ResidualBlock(nn.Module):
    """``act(x + norm2(conv2(act(norm1(conv1(x))))))`` at constant width and length."""

    def __init__(self, channels: int, kernel_size: int, activation: str, norm: str,
                 num_groups: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding=pad)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=pad)
        if norm == "group":
            self.norm1: nn.Module = nn.GroupNorm(num_groups, channels)
            self.norm2: nn.Module = nn.GroupNorm(num_groups, channels)
        else:
            self.norm1 = nn.Identity()
            self.norm2 = nn.Identity()
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(x + self.norm2(self.conv2(h)))


class ResNet1D(nn.Module):
    """A small residual network for MNIST-1D.

    ``stem`` (Conv1d 1 → C, then act) → ``blocks.0 … blocks.{B-1}`` (two convolutions each,
    identity skip) → average over length → ``fc`` (Linear C → num_classes). Length and width
    stay constant, so any input length works; ``in_features`` is recorded for checkpoints only.

    No BatchNorm (see the module docstring); ``norm="group"`` adds GroupNorm with
    ``num_groups`` groups, whose affine parameters are ``blocks.{i}.norm{1,2}.weight/bias``.

    Parameters
    ----------
    in_features, num_classes : int
        Input length and number of outputs.
    channels : int, default 32
        Width C of every convolution.
    num_blocks : int, default 3
        Number of residual blocks.
    kernel_size : int, default 5
        Odd kernel size of every convolution.
    activation : str, default "relu"
        One of :data:`ACTIVATIONS`.
    norm : {"none", "group"}, default "none"
        Normalisation inside the blocks.
    num_groups : int, default 8
        Groups of GroupNorm (must divide ``channels``).

    Example
    -------
    >>> m = ResNet1D(40, 10, channels=8, num_blocks=2)
    >>> m(torch.zeros(2, 40)).shape, sum(p.numel() for p in m.parameters())
    (torch.Size([2, 10]), 1450)
    """

    arch_name = "resnet1d"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        channels: int = 32,
        num_blocks: int = 3,
        kernel_size: int = 5,
        activation: str = "relu",
        norm: str = "none",
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd (to keep the length)")
        if channels < 1 or num_blocks < 0:
            raise ValueError("channels must be positive and num_blocks non-negative")
        if norm not in ("none", "group"):
            raise ValueError(f"norm={norm!r} must be 'none' or 'group'")
        if norm == "group" and channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide channels={channels}")
        self.in_features = int(in_features)
        self.stem = nn.Conv1d(1, channels, kernel_size, padding=kernel_size // 2)
        self.act = _activation(activation)
        self.blocks = nn.Sequential(
            *(_ResidualBlock(channels, kernel_size, activation, norm, num_groups)
              for _ in range(num_blocks))
        )
        self.fc = nn.Linear(channels, int(num_classes))
        self.arch_kwargs: dict[str, Any] = {
            "in_features": self.in_features,
            "num_classes": int(num_classes),
            "channels": int(channels),
            "num_blocks": int(num_blocks),
            "kernel_size": int(kernel_size),
            "activation": activation,
            "norm": norm,
            "num_groups": int(num_groups),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)`` (or ``(num_classes,)`` for one example)."""
        x, single = _as_batched(x, None)
        z = self.blocks(self.act(self.stem(x)))
        out = self.fc(z.mean(-1))
        return out.squeeze(0) if single else out


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "resnet1d": ResNet1D,
    "resnet2d": ResNet2D,
    "vit": ViT,
}
"""Architecture name → class. Each class takes ``(in_features, num_classes, **kwargs)``; the
image models take flat images, ``in_features = in_channels·S²``."""


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # parameter counts for in_features=40, num_classes=10 (MNIST-1D):
    "mlp-small": ("mlp", {"hidden": (32, 32), "activation": "tanh"}),  # 2,698
    "mlp-80k": ("mlp", {"hidden": (256, 256), "activation": "tanh"}),  # 78,858
    "cnn-small": ("cnn1d", {"channels": (8, 16), "kernel_size": 5, "stride": 2}),  # 2,314
    "cnn-1m": (  # 1,005,998
        "cnn1d",
        {"channels": (64, 128, 256), "kernel_size": 5, "stride": 2, "hidden": (620,)},
    ),
    "resnet1d-small": ("resnet1d", {"channels": 32, "num_blocks": 3}),  # 31,434
    # image models, for in_features=3·32·32 (CIFAR-shaped), num_classes=10:
    "resnet20-bn": ("resnet2d", {"width": 16, "num_blocks": 3}),  # 272,474
    "resnet8-bn": ("resnet2d", {"width": 16, "num_blocks": 1}),  # 78,042
    "vit-small": ("vit", {"patch_size": 4, "dim": 64, "depth": 4, "heads": 4}),  # 207,946
}
"""Preset name → ``(architecture, kwargs)``; counts in comments are for MNIST-1D sizes (1-D
models) and CIFAR-10 sizes (image models)."""


def build(name: str, in_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` from :data:`ARCHITECTURES`.

    Parameters
    ----------
    name : str
        ``"mlp"``, ``"cnn1d"``, ``"resnet1d"``, ``"resnet2d"`` or ``"vit"``.
    in_features, num_classes : int
        Input length (``in_channels·S²`` for the image models) and number of outputs.
    **kwargs
        Architecture options (see the class docstrings).

    Raises
    ------
    ValueError
        On an unknown name, or an option the architecture does not take (the message lists
        the accepted ones).

    Example
    -------
    >>> build("resnet1d", 40, 10, channels=8, num_blocks=1).arch_kwargs["channels"]
    8
    """
    key = name.lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted[2:]))
    if unknown:
        raise ValueError(
            f"architecture {key!r} does not take {unknown}; it accepts {accepted[2:]}"
        )
    return cls(in_features, num_classes, **kwargs)


def preset(
    name: str, in_features: int | None = None, num_classes: int = 10, **overrides: Any
) -> nn.Module:
    """Build a named preset from :data:`PRESETS`, optionally overriding some options.

    ===================  ============  ==============================================
    preset               params*       recipe
    ===================  ============  ==============================================
    ``mlp-small``        2,698         MLP 40-32-32-10, tanh
    ``mlp-80k``          78,858        MLP 40-256-256-10, tanh
    ``cnn-small``        2,314         CNN1D channels (8, 16), k=5, stride 2, flatten
    ``cnn-1m``           1,005,998     CNN1D channels (64, 128, 256), k=5, stride 2,
                                       flatten, head 1280-620-10
    ``resnet1d-small``   31,434        ResNet1D 32 channels, 3 blocks, k=5
    ``resnet20-bn``      272,474†      ResNet2D (ResNet-20), width 16, batch norm
    ``resnet8-bn``       78,042†       ResNet2D (ResNet-8), width 16, batch norm
    ``vit-small``        207,946†      ViT patch 4, dim 64, depth 4, 4 heads, MLP 256
    ===================  ============  ==============================================

    \\* for ``in_features=40, num_classes=10`` (the default ``in_features`` of the 1-D
    models); † for ``in_features=3·32·32, num_classes=10`` (the default of the image models).

    Example
    -------
    >>> sum(p.numel() for p in preset("mlp-80k").parameters())
    78858
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    arch, kwargs = PRESETS[name]
    if in_features is None:
        in_features = getattr(ARCHITECTURES[arch], "default_in_features", 40)
    return build(arch, in_features, num_classes, **{**kwargs, **overrides})
