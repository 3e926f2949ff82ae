r"""Output-space curvature of the common losses: what the model metrics need of ℓ.

A curvature metric of a model is G = Σ_b w_b J_bᵀ Λ_b J_b with an output-space matrix Λ_b.
For the losses below Λ_b has a closed form (a loss is written ℓ = Σ_n c_n ℓ_n with c_n the
reduction factor):

- cross-entropy: ∇²_z ℓ_n = s_n (diag p_n − p_n p_nᵀ), p_n = softmax(z_n), s_n = Σ_c t_nc;
- MSE: ∇²_f ℓ = 2c I;
- BCE with logits: ∇²_f ℓ = c σ(f)(1 − σ(f)) elementwise.

Any other loss gets an autodiff Hessian-vector product in output space.

Example
-------
>>> import torch
>>> from torch import nn
>>> info = loss_info(nn.CrossEntropyLoss())
>>> z, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
>>> u = torch.randn(4, 3, dtype=torch.float64)
>>> closed = CrossEntropyRows(z, y, info).hvp(u)
>>> bool(torch.allclose(closed, generic_output_hvp(nn.CrossEntropyLoss(), z, y, u)))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp

__all__ = [
    "CrossEntropyRows",
    "LossInfo",
    "cast_input",
    "generic_output_hvp",
    "loss_info",
    "mc_noise",
    "mc_outer_rows",
    "outer_rows",
    "reduction_factor",
    "rows_of",
]

LossFn = Callable[[Tensor, Tensor], Tensor]




@dataclass(frozen=True)
class LossInfo:
    """The kind of a loss and the options that its closed forms need."""

    kind: str  # "ce", "mse", "bce" or "generic"
    reduction: str
    ignore_index: int = -100
    label_smoothing: float = 0.0


def loss_info(loss_fn: LossFn) -> LossInfo:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"curvature metrics need a scalar loss: reduction={reduction!r} is not supported. "
            "Use reduction='mean' (averaged like the full-batch loss) or 'sum'."
        )
    if loss_fn is F.cross_entropy:
        return LossInfo("ce", "mean")
    if loss_fn is F.mse_loss:
        return LossInfo("mse", "mean")
    if loss_fn is F.binary_cross_entropy_with_logits:
        return LossInfo("bce", "mean")
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None:
        return LossInfo(
            "ce", reduction, int(loss_fn.ignore_index), float(loss_fn.label_smoothing)
        )
    if type(loss_fn) is nn.MSELoss:
        return LossInfo("mse", reduction)
    if (
        type(loss_fn) is nn.BCEWithLogitsLoss
        and loss_fn.weight is None
        and loss_fn.pos_weight is None
    ):
        return LossInfo("bce", reduction)
    return LossInfo("generic", reduction)


def cast_input(X: Tensor, p: Tensor) -> Tensor:
    if X.is_floating_point():
        return X.to(device=p.device, dtype=p.dtype)
    return X.to(device=p.device)


class CrossEntropyRows:
    """Cross-entropy in rows: logits (M, C), target distributions (M, C), reduction factor."""

    def __init__(self, out: Tensor, y: Tensor, info: LossInfo) -> None:
        self.squeeze = out.ndim == 1
        if self.squeeze:  # a single unbatched sample of C logits
            y = y[None] if y.is_floating_point() and y.shape == out.shape else y.reshape(1)
            out = out[None]
        C = out.shape[1]
        self.moved_shape = out.movedim(1, -1).shape
        z = out.movedim(1, -1).reshape(-1, C)
        if y.is_floating_point() and y.shape == out.shape:  # class probabilities
            T = y.to(z.dtype).movedim(1, -1).reshape(-1, C)
            valid = torch.ones(T.shape[0], dtype=z.dtype, device=z.device)
            count = T.shape[0]
        else:  # class indices
            t = y.reshape(-1).to(device=z.device)
            mask = t != info.ignore_index
            T = F.one_hot(torch.where(mask, t, torch.zeros_like(t)).long(), C).to(z.dtype)
            valid = mask.to(z.dtype)
            T = T * valid[:, None]
            count = valid.sum().clamp_min(1)
        eps = info.label_smoothing
        if eps:
            T = (1 - eps) * T + (eps / C) * valid[:, None]
        self.C = C
        self.probs = torch.softmax(z, dim=-1)
        self.T = T
        self.weight = T.sum(-1)  # 1 per valid row, 0 per ignored one
        self.valid = valid
        self.c = 1.0 / count if info.reduction == "mean" else 1.0

    def rows(self, u: Tensor) -> Tensor:
        if self.squeeze:
            u = u[None]
        return u.movedim(1, -1).reshape(-1, self.C)

    def unrows(self, r: Tensor) -> Tensor:
        out = r.reshape(self.moved_shape).movedim(-1, 1)
        return out[0] if self.squeeze else out

    def hvp(self, u: Tensor) -> Tensor:
        """H u with H = c · s_n (diag p_n − p_n p_nᵀ) per row (s_n = Σ_c t_nc)."""
        p, ur = self.probs, self.rows(u)
        pu = (p * ur).sum(-1, keepdim=True)
        return self.unrows(self.c * self.weight[:, None] * (p * ur - p * pu))

    def grads(self) -> Tensor:
        """Per-row gradients ∇_z ℓ_n = s_n p_n − t_n of the unreduced losses."""
        return self.weight[:, None] * self.probs - self.T

    def mc_grads(self, uniforms: Tensor) -> Tensor:
        """(M, S, C) gradients p_n − e_ỹ with ỹ ~ Cat(p_n) by inverse-CDF sampling."""
        cdf = torch.cumsum(self.probs.detach(), dim=-1)
        labels = torch.searchsorted(cdf, uniforms.T.contiguous()).clamp_max(self.C - 1)
        return self.probs[:, None, :] - F.one_hot(labels, self.C).to(self.probs.dtype)


def mc_noise(info: LossInfo, batches: Sequence[tuple[Tensor, Tensor]], samples: int,
             seed: int) -> tuple[Tensor, ...]:
    """The Monte-Carlo noise of ``samples`` label draws per sample, batch by batch, from a CPU
    generator seeded by ``seed`` (float64): uniforms for categorical / Bernoulli labels,
    standard normals for Gaussian ones. One definition for ``Fisher(mc_samples, seed)`` and
    ``KFAC(fisher_type="mc")``, so both see the same sampled labels."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = []
    for _, y in batches:
        if info.kind == "ce":
            shape = (y.shape[0], *y.shape[2:]) if y.is_floating_point() and y.ndim >= 2 \
                else tuple(y.shape)
            noise = torch.rand(samples, *shape, generator=gen, dtype=torch.float64)
            noise = noise.reshape(samples, -1)
        elif info.kind == "mse":
            noise = torch.randn(samples, *y.shape, generator=gen, dtype=torch.float64)
        else:
            noise = torch.rand(samples, *y.shape, generator=gen, dtype=torch.float64)
        out.append(noise)
    return tuple(out)


def rows_of(x: Tensor) -> Tensor:
    """Per-sample rows (N, k) of a batched output (a 1-D output is one row per entry)."""
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)


def outer_rows(g: Tensor, u: Tensor, scale: Tensor | float) -> Tensor:
    """Σ_n scale · g_n (g_nᵀ u_n) for rows g, u of shape (N, k)."""
    return scale * g * (g * u).sum(-1, keepdim=True)


def mc_outer_rows(g: Tensor, u: Tensor, scale: Tensor | float) -> Tensor:
    """(scale / S) Σ_s g_sn (g_snᵀ u_n) for g of shape (N, S, k) and u of shape (N, k)."""
    a = (g * u[:, None, :]).sum(-1, keepdim=True)
    return scale * (g * a).mean(1)


def reduction_factor(info: LossInfo, out: Tensor) -> float:
    """c for elementwise losses (MSE, BCE): 1/numel for 'mean', 1 for 'sum'."""
    return 1.0 / out.numel() if info.reduction == "mean" else 1.0


def generic_output_hvp(loss_fn: LossFn, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """∇²_f ℓ · u = ∇_f (∇_f ℓ · u), reverse-over-forward autodiff.

    Forward-over-reverse (``jvp`` of ``grad``) and reverse-over-reverse trip over ZeroTensors
    in ``F.mse_loss`` (alone or under an outer ``jvp``); this order composes with every
    ``torch.func`` transform the metric meets (vmap, jvp, grad).
    """
    return grad(lambda o: jvp(lambda oo: loss_fn(oo, y), (o,), (u,))[1])(out)


