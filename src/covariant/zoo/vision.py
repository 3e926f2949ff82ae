"""Image architectures: a CIFAR-style ResNet with batch norm and a small vision transformer.

Both take images of ``in_channels`` × S × S given flat, ``(N, in_features)`` with
``in_features = in_channels·S²`` (the layout of every :class:`~covariant.zoo.data.Dataset`,
e.g. ``make_synthetic_images`` at 3 × 32 × 32, or sklearn's 8 × 8 digits with
``in_channels=1``), or as ``(N, in_channels, S, S)``, and return logits ``(N, num_classes)``.
They are registered in :data:`covariant.zoo.architectures.ARCHITECTURES` as ``"resnet2d"`` and
``"vit"``.

- :class:`ResNet2D` (He et al. 2016, CIFAR variant): a 3 × 3 stem, three stages of
  ``num_blocks`` basic blocks at widths w, 2w, 4w (stride 2 between stages, 1 × 1
  convolution + batch norm shortcuts where the shape changes), global average pooling, a
  linear head. ``num_blocks=3`` is ResNet-20 (272,474 parameters at w = 16 for CIFAR-10),
  ``num_blocks=1`` ResNet-8. With ``norm="batch"`` an example's output depends on its batch
  in training mode: ``ParameterSpace.from_module`` then uses the batch statistics of each
  batch it is given and never updates the running ones (docs/api.md, "Batch norm and
  dropout").
- :class:`ViT`: patch embedding (a strided convolution), learned position embeddings,
  ``depth`` pre-norm blocks (LayerNorm, multi-head self-attention, LayerNorm, GELU MLP), a
  final LayerNorm, mean pooling over patches, a linear head. ``attention="manual"`` (default)
  writes attention as matmul + softmax, so that every second-order product works through it
  on any backend; ``attention="torch"`` uses ``nn.MultiheadAttention`` (same parameters,
  same function).

Example
-------
>>> import torch
>>> from covariant.zoo.vision import ResNet2D, ViT
>>> net = ResNet2D(3 * 32 * 32, 10)
>>> net(torch.zeros(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters())
(torch.Size([2, 10]), 272474)
>>> vit = ViT(64, 10, in_channels=1, patch_size=4, dim=16, depth=1, heads=2)   # digits 8×8
>>> vit(torch.zeros(5, 64)).shape
torch.Size([5, 10])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["ResNet2D", "ViT"]


def image_side(in_features: int, in_channels: int) -> int:
    """S with ``in_features = in_channels·S²``; ValueError if there is none.

    >>> image_side(3072, 3)
    32
    """
    side = math.isqrt(max(int(in_features) // max(int(in_channels), 1), 0))
    if in_channels < 1 or in_channels * side * side != in_features or side < 1:
        raise ValueError(f"in_features={in_features} is not in_channels={in_channels} × S × S "
                         "for an integer image side S")
    return side


def as_images(x: torch.Tensor, channels: int, side: int) -> tuple[torch.Tensor, bool]:
    """``(L,)``, ``(N, L)``, ``(C, S, S)`` or ``(N, C, S, S)`` as ``(N, C, S, S)``; report if
    the input was one example."""
    shape = (channels, side, side)
    if x.dim() == 1 and x.shape[0] == channels * side * side:
        return x.reshape(1, *shape), True
    if x.dim() == 2 and x.shape[1] == channels * side * side:
        return x.reshape(-1, *shape), False
    if x.dim() == 3 and tuple(x.shape) == shape:
        return x.unsqueeze(0), True
    if x.dim() == 4 and tuple(x.shape[1:]) == shape:
        return x, False
    raise ValueError(f"expected images of shape (N, {channels * side * side}) or "
                     f"(N, {channels}, {side}, {side}), got {tuple(x.shape)}")


def _norm2d(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class _BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none")
        self.bn1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=norm == "none")
        self.bn2 = _norm2d(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=norm == "none"),
                _norm2d(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet2D(nn.Module):
    """CIFAR-style ResNet-(6n+2) with batch norm (see the module docstring).

    Parameter names: ``stem.weight``, ``stem_norm.weight/bias``, ``stages.{s}.{b}.conv1.weight``,
    ``….bn1.weight``, ``….shortcut.{0,1}.*`` (first block of stages 1 and 2), ``fc.weight/bias``.
    Convolutions have no bias when batch norm follows them.

    Parameters
    ----------
    in_features, num_classes : int
        ``in_channels·S²`` and the number of outputs.
    in_channels : int, default 3
    width : int, default 16
        Width w of the first stage (then 2w, 4w).
    num_blocks : int, default 3
        Basic blocks per stage (3: ResNet-20, 1: ResNet-8).
    norm : {"batch", "none"}, default "batch"

    Example
    -------
    >>> m = ResNet2D(64, 10, in_channels=1, width=4, num_blocks=1).eval()   # 8 × 8 digits
    >>> m(torch.zeros(64)).shape   # one example, flat (eval mode: the running statistics)
    torch.Size([10])
    """

    arch_name = "resnet2d"
    default_in_features = 3 * 32 * 32

    def __init__(self, in_features: int, num_classes: int, in_channels: int = 3,
                 width: int = 16, num_blocks: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm={norm!r} must be 'batch' or 'none'")
        if width < 1 or num_blocks < 1:
            raise ValueError("width and num_blocks must be positive")
        self.side = image_side(in_features, in_channels)
        self.in_channels = int(in_channels)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none")
        self.stem_norm = _norm2d(norm, width)
        stages, c_in = [], width
        for s in range(3):
            c_out = width * 2**s
            blocks = []
            for b in range(num_blocks):
                blocks.append(_BasicBlock(c_in, c_out, 2 if (s > 0 and b == 0) else 1, norm))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, int(num_classes))
        self.arch_kwargs: dict[str, Any] = {
            "in_features": int(in_features), "num_classes": int(num_classes),
            "in_channels": int(in_channels), "width": int(width),
            "num_blocks": int(num_blocks), "norm": norm,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` (``(num_classes,)`` for one example)."""
        x, single = as_images(x, self.in_channels, self.side)
        z = self.stages(torch.relu(self.stem_norm(self.stem(x))))
        out = self.fc(z.mean((-2, -1)))
        return out.squeeze(0) if single else out


class _SelfAttention(nn.Module):
    """Multi-head self-attention written out: softmax(QKᵀ/√d_h) V, heads concatenated.

    ``qkv`` holds W_Q, W_K, W_V stacked like ``nn.MultiheadAttention.in_proj_weight``, ``proj``
    is its ``out_proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(N, T, D))


class _TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first) as a self-attention x ↦ MHA(x, x, x)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads) if attention == "manual" \
            else _TorchAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer (see the module docstring).

    Parameter names: ``patch.weight/bias``, ``pos``, ``blocks.{i}.norm1.*``,
    ``blocks.{i}.attn.qkv.*`` and ``….attn.proj.*`` (``….attn.mha.*`` with
    ``attention="torch"``), ``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.{0,2}.*``, ``norm.*``,
    ``head.*``.

    Parameters
    ----------
    in_features, num_classes : int
        ``in_channels·S²`` and the number of outputs.
    in_channels : int, default 3
    patch_size : int, default 4
        Must divide S; the sequence has (S / patch_size)² tokens.
    dim, depth, heads : int, default 64, 4, 4
        Token width, number of blocks, attention heads (``heads`` divides ``dim``).
    mlp_ratio : int, default 4
        Hidden width of the MLPs is ``mlp_ratio · dim``.
    attention : {"manual", "torch"}, default "manual"

    Example
    -------
    >>> sum(p.numel() for p in ViT(3 * 32 * 32, 10).parameters())   # CIFAR-shaped
    207946
    """

    arch_name = "vit"
    default_in_features = 3 * 32 * 32

    def __init__(self, in_features: int, num_classes: int, in_channels: int = 3,
                 patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 4, attention: str = "manual") -> None:
        super().__init__()
        self.side = image_side(in_features, in_channels)
        if patch_size < 1 or self.side % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the image side {self.side}")
        if heads < 1 or dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        if attention not in ("manual", "torch"):
            raise ValueError(f"attention={attention!r} must be 'manual' or 'torch'")
        if depth < 1 or mlp_ratio < 1:
            raise ValueError("depth and mlp_ratio must be positive")
        self.in_channels = int(in_channels)
        tokens = (self.side // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp_ratio * dim, attention)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, int(num_classes))
        self.arch_kwargs: dict[str, Any] = {
            "in_features": int(in_features), "num_classes": int(num_classes),
            "in_channels": int(in_channels), "patch_size": int(patch_size), "dim": int(dim),
            "depth": int(depth), "heads": int(heads), "mlp_ratio": int(mlp_ratio),
            "attention": attention,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` (``(num_classes,)`` for one example)."""
        x, single = as_images(x, self.in_channels, self.side)
        z = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        out = self.head(self.norm(self.blocks(z)).mean(1))
        return out.squeeze(0) if single else out
