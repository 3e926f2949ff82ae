r"""A curvature metric of an all-``nn.Linear`` model as G = BᵀB, with B in sample space.

For G = Σ_b w_b Σ_n J_nᵀ Λ_n J_n (:mod:`covariant.metrics.curvature_base`) write each sample's
output matrix as Λ_n = S_n S_nᵀ, S_n = Q_n diag(√e_n) from its eigendecomposition, keeping the
r largest eigenvalues of every sample (those above ``rtol``·max e: a softmax's Λ_n has rank
C − 1, its null direction is dropped). Then G = BᵀB with one row of B per sample n and
column k of S_n,

.. math::

    B_{(n,k)} = \sqrt{w_b}\, S_n[:, k]ᵀ J_n .

For an ``nn.Linear`` layer l the part of that row on the layer's [W | b] is γ_{nk}^l ⊗ ā_n^l,
with ā_n^l = [a_n, 1] the layer input and γ_{nk}^l the gradient of ⟨f_n, √w_b S_n[:, k]⟩ at
the layer's output (the same signals as :mod:`~covariant.metrics.dense_linear`, r backprop
columns for all samples at once). So, with V_l the (out, in') matrix of v's entries of layer l,

.. math::

    (Bv)_{(n,k)} = Σ_l γ_{nk}^{lᵀ} V_l ā_n^l, \qquad
    (Bᵀu)_l = Σ_{n,k} u_{(n,k)}\, γ_{nk}^l ā_n^{lᵀ}, \qquad
    (BBᵀ)_{(n,k),(n',k')} = Σ_l (γ_{nk}^l · γ_{n'k'}^l)(ā_n^l · ā_{n'}^l):

products with B and Bᵀ are two matrix products per layer (a forward pass's flops) and need no
model pass; the m × m Gram matrix BBᵀ costs about 2·m²·Σ_l out_l flops. With these,
:class:`~covariant.linalg.woodbury.DampedGramFactor` solves with λI + G exactly in the
m = N·r dimensional sample space (``Damped`` does so above its dense-factor size;
docs/math.md §5.1).

Like :mod:`~covariant.metrics.dense_linear` this assumes that samples do not interact and that
Λ_b is block diagonal over the samples; both are checked at run time against one product of
the metric on a fixed random vector, and anything else gives None.

Example
-------
>>> import torch
>>> from torch import nn
>>> import covariant as cv
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
>>> data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
>>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
>>> B = space.metric.sample_space(theta)
>>> B.size                           # 5 samples × (3 − 1) softmax directions
10
>>> Bd = B.adjoint(torch.eye(B.size, dtype=torch.float64)).T      # B as a (10, 31) matrix
>>> bool(torch.allclose(Bd.T @ Bd, space.metric.dense(theta), atol=1e-14))
True
>>> bool(torch.allclose(B.gram(), Bd @ Bd.T, atol=1e-14))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from .dense_linear import LinearBlock, layer_inputs, linear_blocks
from .kfac_factors import layer_signals
from .losses import cast_input

__all__ = ["MAX_SAMPLE_SPACE_BYTES", "MAX_SAMPLE_SPACE_DIM", "DenseSampleSpace",
           "LinearSampleSpace", "linear_sample_space", "per_sample_space"]

Forward = Callable[[Tensor, Tensor], Tensor]
OutputMatvec = Callable[[int, Tensor, Tensor, Tensor], Tensor]

#: Largest m (samples × output directions) for which the m × m Gram matrix is built (its
#: float64 factor takes 8·m² bytes: 3.2 GB at this size).
MAX_SAMPLE_SPACE_DIM = 20000

#: Largest B materialized for a model that is not all ``nn.Linear`` (:func:`per_sample_space`),
#: in bytes of float64.
MAX_SAMPLE_SPACE_BYTES = 1 << 30

#: Elements of one temporary of the products and of the Gram matrix's row blocks.
SAMPLE_SPACE_CHUNK = 1 << 24


@dataclass
class _Layer:
    """One layer's part of B: the flat positions of its [W | b], ā (N, in') and γ (N, r, out),
    all samples of all batches, float64."""

    index: Tensor
    abar: Tensor
    gamma: Tensor


class LinearSampleSpace:
    """B with G = BᵀB for an all-``nn.Linear`` model (module docstring): ``apply`` (V ↦ BV),
    ``adjoint`` (U ↦ BᵀU) and ``gram`` (BBᵀ), on float64 columns; ``size`` = m rows
    (samples × ``rank`` output directions), ``dim`` = d columns."""

    def __init__(self, layers: list[_Layer], dim: int) -> None:
        self.layers, self.dim = layers, int(dim)
        self.num_samples, self.rank = (int(s) for s in layers[0].gamma.shape[:2])
        self.size = self.num_samples * self.rank

    def _chunk(self, k: int) -> int:
        widest = max(la.gamma.shape[2] for la in self.layers)
        return max(1, min(k, SAMPLE_SPACE_CHUNK // max(1, self.num_samples * widest)))

    def apply(self, V: Tensor) -> Tensor:
        """B V for V of shape (d, k): (m, k)."""
        N, r = self.num_samples, self.rank
        parts = []
        step = self._chunk(V.shape[1])
        for s in range(0, V.shape[1], step):
            Vs = V[:, s:s + step]
            k = Vs.shape[1]
            acc = Vs.new_zeros(N, r, k)
            for la in self.layers:
                out, width = la.gamma.shape[2], la.abar.shape[1]
                Vl = Vs[la.index].reshape(out, width, k).permute(1, 0, 2).reshape(width, -1)
                t = (la.abar @ Vl).reshape(N, out, k)             # V_l ā_n for every n
                acc += torch.bmm(la.gamma, t)                      # γ_nkᵀ (V_l ā_n)
            parts.append(acc.reshape(N * r, k))
        return torch.cat(parts, 1)

    def adjoint(self, U: Tensor) -> Tensor:
        """Bᵀ U for U of shape (m, k): (d, k)."""
        N, r = self.num_samples, self.rank
        res = U.new_zeros(self.dim, U.shape[1])
        step = self._chunk(U.shape[1])
        for s in range(0, U.shape[1], step):
            U3 = U[:, s:s + step].reshape(N, r, -1)
            k = U3.shape[2]
            for la in self.layers:
                out, width = la.gamma.shape[2], la.abar.shape[1]
                t = torch.bmm(la.gamma.transpose(1, 2), U3)        # Σ_k u_nk γ_nk: (N, out, k)
                Vl = la.abar.T @ t.reshape(N, -1)                  # (in', out·k)
                res[la.index, s:s + k] = Vl.reshape(width, out, k).permute(1, 0, 2).reshape(-1, k)
        return res

    def gram(self, lower_only: bool = False) -> Tensor:
        """B Bᵀ, (m, m), built in row blocks of whole samples. With ``lower_only`` only the
        lower triangle (by blocks of samples) is formed, half the flops; the rest of the
        matrix is left unset (what a Cholesky factorization reads is the lower triangle)."""
        N, r, m = self.num_samples, self.rank, self.size
        K = self.layers[0].gamma.new_empty(m, m)
        rows = max(1, min(SAMPLE_SPACE_CHUNK // max(1, m * r), -(-N // 16)))
        grams = [la.abar @ la.abar.T for la in self.layers]        # (N, N) each
        flat = [la.gamma.reshape(m, -1) for la in self.layers]     # (m, out) each
        for s in range(0, N, rows):
            n = min(rows, N - s)
            cols = s + n if lower_only else N                      # samples 0 .. cols - 1
            block = K[s * r:(s + n) * r, :cols * r].view(n, r, cols, r)
            block.zero_()
            for A, Gam in zip(grams, flat, strict=True):
                GG = (Gam[s * r:(s + n) * r] @ Gam[:cols * r].T).view(n, r, cols, r)
                block.addcmul_(GG, A[s:s + n, None, :cols, None])
        return K


def _output_factor(output_matvec: OutputMatvec, b: int, out: Tensor, y: Tensor, w: float,
                   rtol: float) -> Tensor | None:
    """√w S_n for every sample of one batch, as backprop columns (r, N, C): the eigenvectors of
    Λ_n scaled by √e, the r largest eigenvalues (r: the most any sample has above rtol·max e).
    None when ``out`` is not (N, C) or some Λ_n is not positive semi-definite."""
    if out.ndim != 2:
        return None
    N, C = out.shape
    with torch.no_grad():
        eye = torch.eye(C, dtype=out.dtype, device=out.device)
        lam = torch.stack([output_matvec(b, out, y, e.expand(N, C)) for e in eye])  # Λ_n[c, k]
        Lam = lam.permute(1, 2, 0).to(torch.float64)
        e, Q = torch.linalg.eigh(0.5 * (Lam + Lam.mT))                       # ascending
    top = float(e.max().clamp_min(0))
    if top == 0 or float(e.min()) < -math.sqrt(torch.finfo(out.dtype).eps) * top:
        return None
    r = max(1, int((e > rtol * top).sum(-1).max()))
    S = Q[..., -r:] * (w * e[..., -r:].clamp_min(0)).sqrt()[:, None, :]     # (N, C, r)
    return S.permute(2, 0, 1)


def _batch_layers(blocks: list[LinearBlock], layers: list, forward: Forward,
                  output_matvec: OutputMatvec, b: int, w: float, X: Tensor, y: Tensor,
                  p: Tensor, rtol: float) -> list[tuple[Tensor, Tensor]] | None:
    """(ā, γ) of every layer for one batch (float64), or None when it does not qualify."""
    factor: dict[str, Tensor | None] = {}

    def columns(out: Tensor) -> Tensor:
        S = _output_factor(output_matvec, b, out.detach(), y, w, rtol)
        factor["S"] = S
        return out.new_zeros(1, *out.shape) if S is None else S.to(out.dtype)

    sig = layer_signals(layers, forward, p, cast_input(X, p), columns)
    if factor.get("S") is None or sig.out.ndim != 2 or len(sig.xs) != len(blocks):
        return None
    xs = [sig.xs[blk.name] for blk in blocks]
    N = sig.out.shape[0]
    if any(x.shape[1] != 1 or x.shape[0] != N for x in xs):
        return None
    return [(layer_inputs(blk, x[:, 0]).detach().to(torch.float64),
             sig.gs[blk.name][:, :, 0].detach().to(torch.float64).permute(1, 0, 2))
            for blk, x in zip(blocks, xs, strict=True)]


class DenseSampleSpace:
    """B materialized as an (m, d) float64 matrix, for models that are not all ``nn.Linear``
    (:func:`per_sample_space`): the same interface as :class:`LinearSampleSpace`."""

    def __init__(self, B: Tensor, num_samples: int, rank: int) -> None:
        self.B, self.num_samples, self.rank = B, int(num_samples), int(rank)
        self.size, self.dim = (int(s) for s in B.shape)

    def apply(self, V: Tensor) -> Tensor:
        """B V for V of shape (d, k)."""
        return self.B @ V

    def adjoint(self, U: Tensor) -> Tensor:
        """Bᵀ U for U of shape (m, k)."""
        return self.B.T @ U

    def gram(self, lower_only: bool = False) -> Tensor:
        """B Bᵀ, (m, m) (the whole matrix, also with ``lower_only``)."""
        return self.B @ self.B.T


def per_sample_space(forward: Forward, output_matvec: OutputMatvec,
                     batches: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                     p: Tensor, *, rtol: float = 1e-14, max_size: int = MAX_SAMPLE_SPACE_DIM,
                     max_bytes: int = MAX_SAMPLE_SPACE_BYTES) -> DenseSampleSpace | None:
    """B of G = BᵀB for any model whose samples do not interact, from per-sample Jacobians
    (``vmap`` over the samples of ``jacrev`` of a batch of one): rows √w_b S_n[:, k]ᵀ J_n as
    in the module docstring, materialized. None when an output is not (N, C), some Λ_n is
    indefinite, the model cannot be run on one sample under ``vmap``, m > ``max_size``,
    m >= d, or B would take more than ``max_bytes``. Not checked against a product here."""
    p = p.detach()
    d = p.shape[0]
    factors = []
    with torch.no_grad():
        for b, (w, (X, y)) in enumerate(zip(weights, batches, strict=True)):
            out = forward(p, cast_input(X, p))
            S = _output_factor(output_matvec, b, out, y.to(device=p.device), float(w), rtol)
            if S is None:
                return None
            factors.append(S)
    r = max(S.shape[0] for S in factors)
    n = sum(S.shape[1] for S in factors)
    if n * r > max_size or n * r >= d or n * r * d * 8 > max_bytes:
        return None

    def one(q: Tensor, x: Tensor) -> Tensor:
        return forward(q, x[None])[0]

    B = p.new_zeros(n, r, d, dtype=torch.float64)
    start = 0
    for S, (X, _) in zip(factors, batches, strict=True):
        Xc = cast_input(X, p)
        C = S.shape[2]
        step = max(1, SAMPLE_SPACE_CHUNK // max(1, C * d))
        for s in range(0, Xc.shape[0], step):
            try:
                J = vmap(jacrev(one), in_dims=(None, 0))(p, Xc[s:s + step])   # (c, C, d)
            except (RuntimeError, NotImplementedError):  # not batchable, or not per sample
                return None
            if J.shape[1:] != (C, d):
                return None
            rows = torch.einsum("knc,ncd->nkd", S[:, s:s + step], J.to(torch.float64))
            B[start + s:start + s + rows.shape[0], :S.shape[0]] = rows
        start += Xc.shape[0]
    return DenseSampleSpace(B.reshape(n * r, d), n, r)


def linear_sample_space(forward: Forward, output_matvec: OutputMatvec,
                        batches: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                        p: Tensor, layers: list, *, rtol: float = 1e-14,
                        max_size: int = MAX_SAMPLE_SPACE_DIM) -> LinearSampleSpace | None:
    """B of G = Σ_b w_b J_bᵀ Λ_b J_b = BᵀB for the ``nn.Linear`` layer records ``layers`` of
    an all-Linear model (module docstring), or None when the batches do not have the assumed
    shape, some Λ_n is indefinite, or m > ``max_size`` or m >= d (then the d × d matrix is
    the smaller one). Not checked against a product here: callers do that
    (``CurvatureMetric.sample_space``)."""
    if not layers:
        return None
    blocks = linear_blocks(layers)
    per_batch = []
    for b, (w, (X, y)) in enumerate(zip(weights, batches, strict=True)):
        got = _batch_layers(blocks, layers, forward, output_matvec, b, float(w), X,
                            y.to(device=p.device), p.detach(), rtol)
        if got is None:
            return None
        per_batch.append(got)
    r = max(g.shape[1] for batch in per_batch for _, g in batch)
    n = sum(batch[0][0].shape[0] for batch in per_batch)
    if n * r > max_size or n * r >= p.shape[0]:
        return None
    out = []
    for i, blk in enumerate(blocks):
        abar = torch.cat([batch[i][0] for batch in per_batch])
        gam = torch.cat([nn.functional.pad(batch[i][1], (0, 0, 0, r - batch[i][1].shape[1]))
                         for batch in per_batch])               # zero rows up to r
        out.append(_Layer(blk.index.to(p.device), abar, gam))
    return LinearSampleSpace(out, p.shape[0])
