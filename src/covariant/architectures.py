"""Small architectures for 1-D inputs (MNIST-1D, digits, tabular data) and their checkpoints.

Three families, all taking inputs of shape ``(N, L)`` (or one example of shape ``(L,)``, so
that ``torch.func.vmap`` over examples works) and returning logits ``(N, num_classes)``:

========== ================================================================================
``mlp``    :class:`MLP`, a ``nn.Sequential``: Linear layers at even indices, activations in
           between. Parameter names are ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ... the
           same as a hand-written ``nn.Sequential(nn.Linear, nn.Tanh, nn.Linear, ...)``.
``cnn1d``  :class:`CNN1D`, convolutions ``features.{2i}`` then a linear head ``head.{2j}``.
``resnet1d`` :class:`ResNet1D`, a stem convolution, residual blocks ``blocks.{i}`` and a
           global-average-pool head ``fc``.
========== ================================================================================

None uses BatchNorm. BatchNorm makes one example's output depend on the rest of its batch in
training mode and keeps running statistics in buffers outside the parameters, so the loss
would not be a function of the parameter vector alone; that breaks the functional view
(``torch.func.functional_call``, per-example ``vmap``) that the geometry in covariant is built
on. :class:`ResNet1D` offers GroupNorm (``norm="group"``), which is per-example and stateless.

Named presets (:data:`PRESETS`, :func:`preset`) fix sizes used across the project;
:func:`save_checkpoint` / :func:`load_checkpoint` store a model with the recipe to rebuild it.

Example
-------
>>> import torch
>>> from covariant.architectures import build, preset, num_parameters
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
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from covariant.errors import ArchitectureMismatchError

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "CNN1D",
    "MLP",
    "PRESETS",
    "ResNet1D",
    "build",
    "load_checkpoint",
    "num_parameters",
    "preset",
    "save_checkpoint",
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
}
"""Architecture name → class. Each class takes ``(in_features, num_classes, **kwargs)``."""


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
}
"""Preset name → ``(architecture, kwargs)``; counts in comments are for MNIST-1D sizes."""


def build(name: str, in_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` from :data:`ARCHITECTURES`.

    Parameters
    ----------
    name : str
        ``"mlp"``, ``"cnn1d"`` or ``"resnet1d"``.
    in_features, num_classes : int
        Input length and number of outputs.
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
    name: str, in_features: int = 40, num_classes: int = 10, **overrides: Any
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
    ===================  ============  ==============================================

    \\* for ``in_features=40, num_classes=10``.

    Example
    -------
    >>> sum(p.numel() for p in preset("mlp-80k").parameters())
    78858
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    arch, kwargs = PRESETS[name]
    return build(arch, in_features, num_classes, **{**kwargs, **overrides})


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_FORMAT = "covariant.checkpoint/1"
_PRIMITIVES = (type(None), bool, int, float, str)


def _check_primitive(value: Any, where: str) -> Any:
    """Return ``value`` with tuples turned into lists, or raise if it is not plain data."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_primitive(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where} has non-string keys; checkpoints store plain data only")
        return {k: _check_primitive(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where}={value!r} of type {type(value).__name__} cannot be stored in a checkpoint: "
        "use None, bool, int, float, str, or lists/dicts of those"
    )


def _build_quietly(arch: str, kwargs: Mapping[str, Any], device: str | None = None) -> nn.Module:
    """Build without consuming the global RNG (on the meta device when ``device='meta'``)."""
    kwargs = dict(kwargs)
    missing = [k for k in ("in_features", "num_classes") if k not in kwargs]
    if missing:
        raise ValueError(f"architecture kwargs lack {missing}; pass them, e.g. in_features=40")
    in_features, num_classes = kwargs.pop("in_features"), kwargs.pop("num_classes")
    with torch.random.fork_rng(devices=[]):
        if device is None:
            return build(arch, in_features, num_classes, **kwargs)
        with torch.device(device):
            return build(arch, in_features, num_classes, **kwargs)


def _signature(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _suggest(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Guess the architecture and kwargs that would fit a state dict, from its shapes."""
    keys = set(shapes)
    # MLP: "0.weight", "2.weight", ... all 2-D.
    lin = sorted(
        int(k.split(".")[0]) for k in keys
        if k.endswith(".weight") and k.split(".")[0].isdigit()
        and len(shapes[k]) == 2 and k.count(".") == 1
    )
    if lin and lin == list(range(0, 2 * len(lin), 2)) and all(
        k.split(".")[0].isdigit() for k in keys
    ):
        ws = [shapes[f"{i}.weight"] for i in lin]
        kw = {
            "in_features": ws[0][1],
            "num_classes": ws[-1][0],
            "hidden": [w[0] for w in ws[:-1]],
            "bias": f"{lin[0]}.bias" in keys,
        }
        return f"arch='mlp' with {kw} (the activation is not recorded in the weights)"
    if "stem.weight" in keys and "fc.weight" in keys:
        blocks = {k.split(".")[1] for k in keys if k.startswith("blocks.")}
        kw = {
            "num_classes": shapes["fc.weight"][0],
            "channels": shapes["stem.weight"][0],
            "num_blocks": len(blocks),
            "kernel_size": shapes["stem.weight"][-1],
            "norm": "group" if any(".norm" in k for k in keys) else "none",
        }
        return f"arch='resnet1d' with {kw} (any in_features)"
    convs = sorted((k for k in keys if k.startswith("features.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    heads = sorted((k for k in keys if k.startswith("head.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    if convs and heads:
        kw = {
            "num_classes": shapes[heads[-1]][0],
            "channels": [shapes[k][0] for k in convs],
            "kernel_size": shapes[convs[0]][-1],
            "hidden": [shapes[k][0] for k in heads[:-1]],
        }
        flat = shapes[heads[0]][1]
        return (f"arch='cnn1d' with {kw}; the head takes {flat} features "
                "(channels[-1] × final length with pool='flatten'), which fixes "
                "in_features together with stride")
    return "no covariant architecture recognised from the parameter names"


def _mismatch_message(
    arch: str,
    kwargs: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, tuple[int, ...]],
    *,
    limit: int = 8,
) -> str | None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k}: checkpoint {got[k]} vs model {expected[k]}"
             for k in expected if k in got and got[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return None

    def fmt(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = [f"checkpoint does not fit architecture {arch!r} with {dict(kwargs)}:"]
    if missing:
        parts.append(f"missing keys [{fmt(missing)}]")
    if unexpected:
        parts.append(f"unexpected keys [{fmt(unexpected)}]")
    if wrong:
        parts.append(f"shape mismatches [{fmt(wrong)}]")
    parts.append(f"The weights look like: {_suggest(got)}.")
    return " ".join(parts)


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    **arch_kwargs: Any,
) -> None:
    """Save ``model`` with the recipe to rebuild it, atomically (temp file + ``os.replace``).

    The file holds a dict ``{"format", "arch", "arch_kwargs", "state_dict", "metadata"}`` of
    plain data and tensors only, so it loads with ``torch.load(..., weights_only=True)``.

    Parameters
    ----------
    path : path
        Destination; parent folders are created.
    model : nn.Module
        The model to save.
    arch : str, optional
        Architecture name. Defaults to the model's own (``model.arch_name``) for models built
        by this module, whose ``arch_kwargs`` are then the defaults for ``**arch_kwargs``.
    metadata : mapping, optional
        Extra plain data to store (e.g. training settings).
    **arch_kwargs
        Constructor options, including ``in_features`` and ``num_classes``. Values must be
        None, bool, int, float, str or lists/dicts of those (tuples are stored as lists).

    Raises
    ------
    ArchitectureMismatchError
        If ``arch(**arch_kwargs)`` would not have the model's parameter names and shapes, so
        the checkpoint could not be loaded back.

    Example
    -------
    >>> import tempfile, os
    >>> m = preset("mlp-small")
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> save_checkpoint(path, m)
    >>> m2, meta = load_checkpoint(path)
    >>> meta["arch"], bool(torch.equal(m(torch.ones(1, 40)), m2(torch.ones(1, 40))))
    ('mlp', True)
    """
    own_arch = getattr(model, "arch_name", None)
    own_kwargs = getattr(model, "arch_kwargs", None)
    if arch is None:
        if own_arch is None or own_kwargs is None:
            raise ValueError(
                f"cannot tell the architecture of a {type(model).__name__}; pass "
                f"arch=... (one of {sorted(ARCHITECTURES)}) and its kwargs"
            )
        arch = own_arch
    arch = arch.lower()
    kwargs: dict[str, Any] = dict(own_kwargs) if (own_arch == arch and own_kwargs) else {}
    kwargs.update(arch_kwargs)
    kwargs = _check_primitive(kwargs, "arch_kwargs")
    meta = _check_primitive(dict(metadata or {}), "metadata")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")

    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    expected = _signature(_build_quietly(arch, kwargs, device="meta").state_dict())
    message = _mismatch_message(arch, kwargs, expected, _signature(state_dict))
    if message is not None:
        raise ArchitectureMismatchError("refusing to save: " + message)

    payload = {
        "format": _FORMAT,
        "arch": arch,
        "arch_kwargs": kwargs,
        "state_dict": state_dict,
        "metadata": meta,
    }
    from ._io import atomic_write

    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    map_location: str | torch.device = "cpu",
    **arch_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint (``torch.load(..., weights_only=True)`` only).

    Accepts a file written by :func:`save_checkpoint`, or a bare state dict (also one wrapped
    as ``{"state_dict": ...}``) when ``arch`` and at least ``in_features`` / ``num_classes``
    are given. Explicit ``arch`` / ``arch_kwargs`` override what the file records (with another
    ``arch``, only the stored ``in_features`` / ``num_classes`` are kept). The model
    takes the floating dtype of the stored weights, so a float64 model comes back float64.
    ``module.`` / ``_orig_mod.`` prefixes (DataParallel, torch.compile) are removed.

    Parameters
    ----------
    path : path
        Checkpoint file.
    arch : str, optional
        Architecture name; required for a bare state dict.
    map_location : str or torch.device, default "cpu"
        Where to put the tensors.
    **arch_kwargs
        Constructor options that override or complete the stored ones.

    Returns
    -------
    model : nn.Module
        In eval mode.
    meta : dict
        ``{"arch", "arch_kwargs", "metadata", "source"}`` where source is ``"checkpoint"`` or
        ``"state_dict"``.

    Raises
    ------
    ArchitectureMismatchError
        If the weights do not fit: the message lists missing / unexpected keys and shape
        mismatches, and what architecture and kwargs the weights look like.

    Example
    -------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "sd.pt")
    >>> torch.save(preset("mlp-small").state_dict(), path)
    >>> model, meta = load_checkpoint(path, arch="mlp", in_features=40, num_classes=10,
    ...                               hidden=[32, 32])
    >>> meta["source"], meta["arch_kwargs"]["hidden"]
    ('state_dict', [32, 32])
    """
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, Mapping):
        raise ArchitectureMismatchError(
            f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a checkpoint or state dict"
        )
    stored_kwargs: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state_dict = dict(obj["state_dict"])
        stored_arch = obj.get("arch")
        stored_kwargs = dict(obj.get("arch_kwargs") or {})
        metadata = dict(obj.get("metadata") or {})
        source = "checkpoint" if stored_arch is not None else "state_dict"
    else:
        state_dict, stored_arch, source = dict(obj), None, "state_dict"
    state_dict = _strip_prefix(state_dict)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ArchitectureMismatchError(
            f"{os.fspath(path)!r} is not a state dict: entries {bad[:8]} are not tensors"
        )
    got = _signature(state_dict)
    arch = (arch or stored_arch)
    if arch is None:
        raise ArchitectureMismatchError(
            f"{os.fspath(path)!r} is a bare state dict; pass arch=... and its kwargs. "
            f"The weights look like: {_suggest(got)}."
        )
    arch = arch.lower()
    if stored_arch is not None and arch != stored_arch:
        # another architecture: only the data sizes of the stored recipe carry over
        stored_kwargs = {k: v for k, v in stored_kwargs.items()
                         if k in ("in_features", "num_classes")}
    kwargs = {**stored_kwargs, **arch_kwargs}
    try:
        model = _build_quietly(arch, kwargs)
    except ValueError as err:
        raise ArchitectureMismatchError(
            f"cannot build {arch!r} with {kwargs}: {err}. The weights look like: {_suggest(got)}."
        ) from err
    message = _mismatch_message(arch, kwargs, _signature(model.state_dict()), got)
    if message is not None:
        raise ArchitectureMismatchError(message)
    float_dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    model.load_state_dict(state_dict, strict=True)
    model = model.to(map_location).eval()
    meta = {"arch": arch, "arch_kwargs": kwargs, "metadata": metadata, "source": source}
    return model, meta
