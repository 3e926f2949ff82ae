r"""The fast paths of a curvature metric whose model is a stack of ``nn.Linear`` layers.

:class:`LinearStructure` is a mixin of :class:`~covariant.metrics.curvature_base.CurvatureMetric`.
When every trainable parameter of the metric's module lives in an ``nn.Linear`` layer applied
once per sample, and samples do not interact, G = Σ_b w_b J_bᵀ Λ_b J_b has two exact structured
forms, each checked against one product of the metric before it is used:

- the dense (d, d) matrix from per-layer Kronecker sums
  (:mod:`~covariant.metrics.dense_linear`), which lets ``solve`` factor G up to
  :data:`~covariant.metrics.base.MAX_DENSE_DIM` coordinates;
- G = BᵀB with B in sample space (:mod:`~covariant.metrics.sample_space`), which lets a damped
  metric solve by the Woodbury identity above that size (``Damped.sample_space_factor``).

Any other model whose samples do not interact gets the second form too, from per-sample
Jacobians (B materialized, up to ``MAX_SAMPLE_SPACE_BYTES``).

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> data = (torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,)))
>>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
>>> space.metric.dense_solve_dim(theta)          # qualifies: dense factor up to 4096
4096
>>> conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)).double()
>>> data = (torch.randn(6, 1, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
>>> space, theta = cv.ParameterSpace.from_module(conv, nn.CrossEntropyLoss(), data, "ggn")
>>> space.metric.dense_solve_dim(theta), theta.shape[0]
(2048, 14)
>>> B = space.metric.sample_space(theta)        # per-sample Jacobians: 6 samples × 1
>>> B.size, bool(torch.allclose(B.B.T @ B.B, space.metric.dense(theta), atol=1e-14))
(6, True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._fast import is_plain
from .base import DENSE_SOLVE_DIM, MAX_DENSE_DIM
from .dense_linear import linear_dense, linear_layers
from .sample_space import (
    DenseSampleSpace,
    LinearSampleSpace,
    linear_sample_space,
    per_sample_space,
)

__all__ = ["LinearStructure"]


class LinearStructure:
    """Mixin: the ``nn.Linear`` fast paths (module docstring). The class it is mixed into
    provides ``module``, ``shard``, ``info``, ``forward``, ``batches``, ``weights``,
    ``_output_matvec``, ``local_matvec`` and a ``_linear_layers`` cache (None at first)."""

    module: Any
    shard: Any
    info: Any
    forward: Any
    batches: list
    weights: list
    _linear_layers: list | None
    _output_matvec: Any
    local_matvec: Any

    def dense_solve_dim(self, p: Tensor) -> int:
        """:data:`MAX_DENSE_DIM` when the dense G comes from per-layer Kronecker sums
        (:meth:`_linear_dense`: about 2·N·d² flops, far below the CG solves it replaces),
        else the generic :data:`~covariant.metrics.base.DENSE_SOLVE_DIM`."""
        return MAX_DENSE_DIM if self._qualifying_layers(p) else DENSE_SOLVE_DIM

    def _qualifying_layers(self, p: Tensor) -> list:
        """The model's ``nn.Linear`` layers when the dense G may come from per-layer
        Kronecker sums at ``p`` (a module, no shard, a known loss, a plain point; cached),
        else []."""
        if self.module is None or self.shard is not None or self.info.kind == "generic" \
                or not is_plain(p):
            return []
        if self._linear_layers is None:
            self._linear_layers = linear_layers(self.module, p.shape[0]) or []
        return self._linear_layers

    def _linear_dense(self, p: Tensor) -> Tensor | None:
        """G(p) by :func:`~covariant.metrics.dense_linear.linear_dense` for a module of
        ``nn.Linear`` layers at a plain point, checked against one product on a fixed random
        vector (relative ‖ΔGv‖ <= √eps); None otherwise (the caller takes d products)."""
        if not self._qualifying_layers(p):
            return None
        G = linear_dense(self.module, self.forward, self._output_matvec, self.batches,
                         self.weights, p, self._linear_layers)
        if G is None:
            self._linear_layers = []
            return None
        if not self._matches_one_product(p, lambda v: G @ v.to(G)):
            self._linear_layers = []  # samples interact, or forward is not the module's
            return None
        return G

    def _matches_one_product(self, p: Tensor, product: Any) -> bool:
        """True when ``product(v)`` (a structured G v, v float64) equals one ordinary product
        of the metric on a fixed random vector, to relative √eps of the point's dtype."""
        v = torch.randn(p.shape[0], generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        ref = self.local_matvec(p.detach(), v.to(p)).to(torch.float64)
        approx = product(v).reshape(-1).to(torch.float64)
        return bool((approx - ref).norm() <= torch.finfo(p.dtype).eps ** 0.5 * ref.norm())

    def sample_space(self, p: Tensor) -> LinearSampleSpace | DenseSampleSpace | None:
        """B with G(p) = BᵀB at a plain point without a shard
        (:mod:`~covariant.metrics.sample_space`): from the layer signals of an all-``nn.Linear``
        module, else from per-sample Jacobians (materialized, within
        ``MAX_SAMPLE_SPACE_BYTES``); checked against one product like :meth:`_linear_dense`.
        None where neither applies or the check fails (samples that interact)."""
        if self.shard is not None or not is_plain(p):
            return None
        B = None
        if self._qualifying_layers(p):
            B = linear_sample_space(self.forward, self._output_matvec, self.batches,
                                    self.weights, p, self._linear_layers)
        if B is None:
            B = per_sample_space(self.forward, self._output_matvec, self.batches, self.weights,
                                 p)
        if B is None or not self._matches_one_product(
                p, lambda v: B.adjoint(B.apply(v.reshape(-1, 1)))):
            return None
        return B
