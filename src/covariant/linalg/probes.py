"""Random probe vectors for the stochastic estimators, and their standard error.

A probe ``z`` has ``E[z zᵀ] = I``: Rademacher entries (±1, the default) or standard Gaussian
ones. Probes are drawn on the CPU from a :class:`torch.Generator` seeded with ``seed`` and
then moved to the target device, so that a seed gives the same probes on every device. They
are drawn one at a time, so the stream does not depend on how probes are batched: the ``l``-th
probe of :func:`~covariant.linalg.hutchinson` and :func:`~covariant.linalg.slq` with the same
seed is the same vector.

Example
-------
>>> import torch
>>> Z = _probes(_generator(0), 5, 3, "rademacher", torch.float64, None)
>>> Z.shape, bool((Z.abs() == 1).all())
(torch.Size([5, 3]), True)
>>> g = _generator(0)
>>> torch.equal(Z[:, 1], (_probe(g, 5, "rademacher", torch.float64, None),
...                       _probe(g, 5, "rademacher", torch.float64, None))[1])
True
>>> round(_stderr(torch.tensor([1.0, 3.0], dtype=torch.float64)), 12)  # std √2 over √2
1.0
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Distribution = Literal["rademacher", "gaussian"]
"""Probe distribution: ±1 entries or standard normal entries."""


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the source of every probe."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _probe(
    gen: torch.Generator,
    dim: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """One probe vector, drawn on the CPU (device-independent stream) and moved to ``device``."""
    if distribution == "rademacher":
        # drawn directly in the floating dtype: the same stream as int64, without a copy
        z = torch.randint(0, 2, (dim,), generator=gen, dtype=dtype).mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}.")
    return z.to(device)


def _probes(
    gen: torch.Generator,
    dim: int,
    num: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """``num`` probes as the columns of a ``(dim, num)`` block; drawn one by one so that the
    stream does not depend on how probes are batched."""
    cols = [_probe(gen, dim, distribution, dtype, device) for _ in range(num)]
    return torch.stack(cols, dim=1)


def probe_block(
    seed: int,
    dim: int,
    num: int,
    distribution: str = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``num`` probes of length ``dim`` as the columns of a ``(dim, num)`` block, from a CPU
    generator seeded with ``seed``: the same stream every estimator of this package draws."""
    return _probes(_generator(seed), dim, num, distribution, dtype, device)


def _stderr(samples: Tensor) -> float:
    """Standard error of the mean of exchangeable samples, ``std / √n`` (NaN for ``n < 2``)."""
    n = samples.numel()
    if n < 2:
        return math.nan
    return float(samples.std(unbiased=True)) / math.sqrt(n)
