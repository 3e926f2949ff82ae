"""Test matrices with known spectra (float64) and operators built from them."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


def _rotation(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _sym(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q."""
    q = _rotation(eigs.numel(), seed)
    a = q @ torch.diag(eigs.to(F64)) @ q.T
    return (a + a.T) / 2


def _spd(n: int = 120, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    return _sym(torch.logspace(0, np.log10(cond), n, dtype=F64), seed)


def _separated(n: int, indefinite: bool) -> torch.Tensor:
    """A spread spectrum whose three extremes on each side are well separated."""
    if indefinite:
        low, bulk, high = [-10.0, -7.0, -5.0], (-2.0, 3.0), [8.0, 12.0, 20.0]
    else:
        low, bulk, high = [0.1, 0.2, 0.3], (1.0, 5.0), [20.0, 30.0, 50.0]
    mid = torch.linspace(*bulk, n - 6, dtype=F64)
    return torch.cat([torch.tensor(low, dtype=F64), mid, torch.tensor(high, dtype=F64)])


def _mv(a: torch.Tensor):
    return lambda v: a @ v


def _mm(a: torch.Tensor):
    """A block operator: the statistical tests batch their probes to stay fast."""
    return lambda x: a @ x
