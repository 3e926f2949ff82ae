r"""The curvature metrics of a model space: GGN, Fisher and empirical Fisher.

Each is G = Σ_b w_b J_bᵀ Λ_b J_b (see :mod:`covariant.metrics.curvature_base`) with

- :class:`GGN`: Λ_b = ∇²_f ℓ(f, y_b), the Hessian of the loss in the outputs;
- :class:`Fisher`: Λ_b = Σ_n c_n E_{ỹ ~ p(·|f_n)}[∇_f ℓ_n(ỹ) ∇_f ℓ_n(ỹ)ᵀ], exact or Monte Carlo;
- :class:`EmpiricalFisher`: Λ_b = Σ_n c_n ∇_f ℓ_n(y_n) ∇_f ℓ_n(y_n)ᵀ, the observed labels.

Example
-------
>>> import torch, covariant as cv
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
>>> X, y = torch.randn(20, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
>>> space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y), metric="ggn")
>>> G = space.metric.dense(theta)
>>> G.shape, bool(torch.allclose(G, G.T))
(torch.Size([17, 17]), True)
>>> fisher = cv.metrics.Fisher.from_space(space)          # = GGN for MSE
>>> bool(torch.allclose(fisher.dense(theta), G))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from .curvature_base import CurvatureMetric, Forward, LossFn
from .losses import (
    CrossEntropyRows,
    generic_output_hvp,
    mc_outer_rows,
    outer_rows,
    reduction_factor,
    rows_of,
)
from .shard import shard_noise

__all__ = ["GGN", "EmpiricalFisher", "Fisher"]


class GGN(CurvatureMetric):
    r"""Generalized Gauss-Newton metric G = Σ_b w_b J_bᵀ H_b J_b.

    J_b = ∂f(θ, X_b)/∂θ is the model Jacobian and H_b = ∇²_f ℓ(f, y_b) the Hessian of the loss
    w.r.t. the outputs, in closed form for cross-entropy (c · (diag p − ppᵀ) per sample,
    respecting ``reduction``, ``ignore_index`` and ``label_smoothing``), MSE (2c·I) and
    BCE-with-logits (c · σ(1−σ)); an autodiff Hessian-vector product of the loss otherwise.
    For a loss that is not convex in the outputs the GGN can be indefinite.

    See :class:`CurvatureMetric` for the parameters; ``GGN.from_space(space)`` builds it
    from a model space (in that space's chart).

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(3, 2).double()
    >>> X = torch.randn(10, 3, dtype=torch.float64)
    >>> y = torch.randn(10, 2, dtype=torch.float64)
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.MSELoss(), (X, y))
    >>> G = cv.metrics.GGN.from_space(space)
    >>> # a linear model with MSE: G = (2 / numel) Σ_n J_nᵀ J_n, with J_n the same for each
    >>> # output; for the weights: (2 / 20) XᵀX per output row
    >>> Gd = G.dense(theta)
    >>> bool(torch.allclose(Gd[:3, :3], 2 / 20 * X.T @ X))
    True
    """

    name = "GGN"
    loss_hessian = True

    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        kind = self.info.kind
        if kind == "ce":
            return CrossEntropyRows(out, y, self.info).hvp(u)
        if kind == "mse":
            return 2 * reduction_factor(self.info, out) * u
        if kind == "bce":
            s = torch.sigmoid(out)
            return reduction_factor(self.info, out) * s * (1 - s) * u
        target = y.to(out.dtype) if y.is_floating_point() else y
        return generic_output_hvp(self.loss_fn, out, target, u)

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        if self.info.kind == "ce":
            ce = CrossEntropyRows(out, y, self.info)
            return int(ce.valid.sum()) * (ce.C - 1)
        return out.numel()


class Fisher(CurvatureMetric):
    r"""Fisher information of the model's predictive distribution, exact or Monte Carlo.

    F = Σ_b w_b Σ_n c_n J_nᵀ E_{ỹ ~ p(·|f_n)}[∇_f ℓ_n(ỹ) ∇_f ℓ_n(ỹ)ᵀ] J_n, with ℓ_n and c_n the
    per-sample negative log-likelihood and reduction factor of the module docstring. The
    predictive distribution is the one the loss is the NLL of: categorical (softmax) for
    cross-entropy, Gaussian of variance ½ for MSE, Bernoulli for BCE-with-logits.

    - ``mc_samples=None``: the exact Fisher, which equals the GGN for these
      exponential-family losses.
    - ``mc_samples=S``: the Monte-Carlo Fisher, (1/S) Σ_s of outer products of the gradients
      at S sampled labels per sample. The randomness (uniforms for categorical / Bernoulli
      labels, normals for Gaussian ones) is drawn once from ``seed``, so the metric is a
      deterministic function of the point (and piecewise smooth in it). Its error shrinks
      like 1/√S.

    Other losses raise: their predictive distribution is unknown here. If such a loss is the
    NLL of an exponential family in its natural parameters, its Fisher is the :class:`GGN`.

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(3, 4).double()
    >>> X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 4, (30,))
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    >>> exact = cv.metrics.Fisher.from_space(space)
    >>> ggn = cv.metrics.GGN.from_space(space)
    >>> bool(torch.allclose(exact.dense(theta), ggn.dense(theta)))
    True
    >>> mc = cv.metrics.Fisher.from_space(space, mc_samples=2000, seed=0)
    >>> err = (mc.dense(theta) - exact.dense(theta)).norm() / exact.dense(theta).norm()
    >>> bool(err < 0.1)
    True
    """

    name = "Fisher"

    def __init__(
        self,
        forward: Forward,
        loss_fn: LossFn,
        batches: Any,
        weights: Sequence[float] | None = None,
        *,
        mc_samples: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(forward, loss_fn, batches, weights, **kwargs)
        if self.info.kind == "generic":
            raise ValueError(
                f"Fisher: the predictive distribution of {type(loss_fn).__name__} is unknown; "
                "the Fisher is implemented for CrossEntropyLoss (without class weights), "
                "MSELoss and BCEWithLogitsLoss (without weight/pos_weight). If your loss is "
                "the negative log-likelihood of an exponential family in its natural "
                "parameters, the Fisher equals the GGN: use metric='ggn' / covariant.metrics.GGN."
            )
        if mc_samples is not None and (int(mc_samples) != mc_samples or mc_samples < 1):
            raise ValueError(
                f"Fisher: mc_samples must be a positive integer or None, got {mc_samples!r}"
            )
        self.mc_samples = None if mc_samples is None else int(mc_samples)
        self.seed = int(seed)
        self._noise: list[Tensor] = []
        self._noise_cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        if self.mc_samples is not None:
            self._noise = list(shard_noise(self.info, self.batches, self.mc_samples,
                                           self.seed, self.shard))

    @property
    def loss_hessian(self) -> bool:  # type: ignore[override]
        """True for the exact Fisher: it is the GGN of these losses, Λ_b = ∇²_f ℓ_b."""
        return self.mc_samples is None

    def _noise_for(self, b: int, like: Tensor) -> Tensor:
        key = (b, like.dtype, like.device)
        if key not in self._noise_cache:
            self._noise_cache[key] = self._noise[b].to(dtype=like.dtype, device=like.device)
        return self._noise_cache[key]

    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        kind = self.info.kind
        if self.mc_samples is None:  # the exact Fisher = the GGN of these losses
            if kind == "ce":
                return CrossEntropyRows(out, y, self.info).hvp(u)
            if kind == "mse":
                return 2 * reduction_factor(self.info, out) * u
            s = torch.sigmoid(out)
            return reduction_factor(self.info, out) * s * (1 - s) * u
        if kind == "ce":
            ce = CrossEntropyRows(out, y, self.info)
            g = ce.mc_grads(self._noise_for(b, out))  # (M, S, C)
            return ce.unrows(mc_outer_rows(g, ce.rows(u), ce.c * ce.weight[:, None]))
        c = reduction_factor(self.info, out)
        noise = self._noise_for(b, out)  # (S, *out.shape)
        if kind == "mse":
            g = math.sqrt(2.0) * noise  # ∇ℓ = 2(f − ỹ), ỹ = f + z/√2
        else:
            g = torch.sigmoid(out) - (noise < torch.sigmoid(out).detach()).to(out.dtype)
        S = noise.shape[0]
        g_rows = g.reshape(S, *rows_of(out).shape).movedim(0, 1)  # (N, S, k)
        return mc_outer_rows(g_rows, rows_of(u), c).reshape(out.shape)

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        if self.info.kind == "ce":
            ce = CrossEntropyRows(out, y, self.info)
            k = ce.C - 1
            rows = int(ce.valid.sum())
        else:
            rows, k = rows_of(out).shape
        if self.mc_samples is not None:
            k = min(k, self.mc_samples)
        return rows * k

    def __repr__(self) -> str:
        if self.mc_samples is None:
            mc = "exact"
        else:
            mc = f"mc_samples={self.mc_samples}, seed={self.seed}"
        return super().__repr__()[:-1] + f", {mc})"


class EmpiricalFisher(CurvatureMetric):
    r"""Empirical Fisher: gradient outer products at the observed labels.

    EF = Σ_b w_b Σ_n c_n g_n g_nᵀ with g_n = ∇_θ ℓ_n(f(θ, x_n), y_n) the gradient of the
    per-sample loss (scaling convention of the module docstring). Over a mean-reduced
    cross-entropy data set this is (1/N) Σ_n g_n g_nᵀ. Matrix-free: g_n = J_nᵀ ∇_f ℓ_n, so
    EF v = Σ_b w_b J_bᵀ [c_n ∇_f ℓ_n (∇_f ℓ_nᵀ (J_b v)_n)]_n; per-sample parameter gradients are
    never formed. Its rank is at most the number of samples. It assumes that the samples of a
    batch do not interact (no batch norm in training mode).

    Example
    -------
    >>> import torch, covariant as cv
    >>> from torch import nn
    >>> model = nn.Linear(2, 3).double()
    >>> X, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 3, (5,))
    >>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    >>> EF = cv.metrics.EmpiricalFisher.from_space(space)
    >>> g = [torch.func.grad(lambda p: nn.functional.cross_entropy(
    ...     torch.func.functional_call(model, space.unflatten(p), (X[n:n+1],)), y[n:n+1]))(theta)
    ...     for n in range(5)]
    >>> truth = sum(torch.outer(gn, gn) for gn in g) / 5
    >>> bool(torch.allclose(EF.dense(theta), truth))
    True
    """

    name = "EmpiricalFisher"

    def _output_matvec(self, b: int, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        kind = self.info.kind
        if kind == "ce":
            ce = CrossEntropyRows(out, y, self.info)
            return ce.unrows(outer_rows(ce.grads(), ce.rows(u), ce.c))
        if kind in ("mse", "bce"):
            yt = y.to(out.dtype)
            g = 2 * (out - yt) if kind == "mse" else torch.sigmoid(out) - yt
            c = reduction_factor(self.info, out)
            return outer_rows(rows_of(g), rows_of(u), c).reshape(out.shape)
        yt = y.to(out.dtype) if y.is_floating_point() else y
        ghat = grad(lambda o: self.loss_fn(o, yt))(out)  # = c_n ∇ℓ_n per row
        n = out.shape[0] if out.ndim > 1 else out.numel()
        inv_c = float(n) if self.info.reduction == "mean" else 1.0
        return outer_rows(rows_of(ghat), rows_of(u), inv_c).reshape(out.shape)

    def _output_rank_bound(self, b: int, out: Tensor, y: Tensor) -> int:
        if self.info.kind == "ce":
            return int(CrossEntropyRows(out, y, self.info).valid.sum())
        return rows_of(out).shape[0]


