"""Shared pieces of the optimizer tests."""

from __future__ import annotations

from torch import nn


class ElementScale(nn.Module):
    """W = s ⊙ Ω per entry: a linear ``torch.nn.utils.parametrize`` chart."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, omega):
        return self.s * omega

    def right_inverse(self, w):
        return w / self.s
