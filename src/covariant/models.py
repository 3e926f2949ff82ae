"""A functional view of ``nn.Module``: parameter layout, flatten / unflatten, functional calls.

A point of a model's parameter space is one flat 1-D tensor. :class:`ParameterLayout` records
which slice of it belongs to which named parameter, so that charts can be applied by name and
``space.unflatten(p)`` gives back the parameter dict.

Example
-------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
>>> layout = ParameterLayout.from_module(model)
>>> layout.names
('0.weight', '0.bias', '2.weight', '2.bias')
>>> p = layout.flatten(dict(model.named_parameters()))
>>> p.shape
torch.Size([11])
>>> layout.unflatten(p)["2.weight"].shape
torch.Size([1, 2])
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ShapeMismatchError

__all__ = ["ParameterLayout", "match_names"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and slices of the parameters packed into one flat vector.

    Parameters
    ----------
    names : tuple of str
        Parameter names, in packing order.
    shapes : tuple of torch.Size
        Shape of each parameter.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ShapeMismatchError("layout: names and shapes must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ShapeMismatchError(f"layout: duplicate parameter names in {self.names}")

    @classmethod
    def from_module(cls, module: nn.Module, *, trainable_only: bool = True) -> ParameterLayout:
        """Layout of ``module.named_parameters()`` (only those that require grad by default)."""
        items = [
            (n, p.shape)
            for n, p in module.named_parameters()
            if p.requires_grad or not trainable_only
        ]
        return cls(tuple(n for n, _ in items), tuple(torch.Size(s) for _, s in items))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Iterable[int]]) -> ParameterLayout:
        """Layout from an ordered mapping ``name -> shape``."""
        return cls(tuple(shapes), tuple(torch.Size(tuple(s)) for s in shapes.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        """Total number of coordinates."""
        return sum(self.numels)

    @property
    def slices(self) -> dict[str, slice]:
        """``name -> slice`` of the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels, strict=True):
            out[name] = slice(start, start + n)
            start += n
        return out

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Pack a parameter dict into one flat vector, in layout order."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ShapeMismatchError(f"flatten: parameters {missing} are missing")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = params[name]
            if t.shape != shape:
                raise ShapeMismatchError(
                    f"flatten: parameter {name!r} has shape {tuple(t.shape)}, "
                    f"the layout expects {tuple(shape)}"
                )
            parts.append(t.reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, p: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into the parameter dict (views, differentiable)."""
        if p.ndim != 1 or p.shape[0] != self.dim:
            raise ShapeMismatchError(
                f"unflatten: expected a flat point of length {self.dim}, got shape {tuple(p.shape)}"
            )
        # torch.split: one backward node for all pieces (slicing builds a full-length zero
        # vector per parameter in the backward pass; measured in benchmarks/)
        pieces = torch.split(p, list(self.numels))
        return {
            name: piece.view(shape)
            for name, shape, piece in zip(self.names, self.shapes, pieces, strict=True)
        }


def match_names(names: Iterable[str], patterns: Iterable[str]) -> dict[str, str]:
    """Map each parameter name to the first glob pattern that matches it.

    A pattern that matches nothing raises :class:`~covariant.errors.ShapeMismatchError`, since a
    silently ignored chart would change the analysis without telling anyone.

    >>> match_names(["0.weight", "0.bias", "2.weight"], ["*.weight"])
    {'0.weight': '*.weight', '2.weight': '*.weight'}
    """
    names = list(names)
    out: dict[str, str] = {}
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ShapeMismatchError(
                f"reparametrize: pattern {pattern!r} matches no parameter; "
                f"the parameters are {names}"
            )
        for n in hits:
            out.setdefault(n, pattern)
    return {n: out[n] for n in names if n in out}
