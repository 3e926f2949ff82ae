r"""The dense curvature metric of a model whose parameters all live in ``nn.Linear`` layers.

For G = Σ_b w_b Σ_n J_nᵀ Λ_n J_n (:mod:`covariant.metrics.curvature_base`) and a network
whose trainable parameters are the weights and biases of ``nn.Linear`` layers applied once to
(N, features) inputs (an MLP), the Jacobian of sample n w.r.t. layer l's [W | b] is
g_nᵀ ⊗ ā_n with ā_n = [a_n, 1] the layer input (a 1 appended for the bias) and g_n
(out × C) the Jacobian of the C network outputs w.r.t. the layer's output. So every block is

.. math::

    G_{lm} = Σ_b w_b Σ_n (g_n^l Λ_n g_n^{mᵀ}) ⊗ (ā_n^l ā_n^{mᵀ}),

one matrix product of (N, out_l·out_m) by (N, in_l·in_m) per pair of layers: about 2·N·d²
flops, instead of the 2·N·C·d² and the d model passes of d Gauss-Newton products. The inputs
ā come from forward hooks and the g from C vector-Jacobian products (one per output, all
samples at once), the same signals as the exact K-FAC factors
(:func:`~covariant.metrics.kfac_factors.layer_signals`); Λ_n from C products of the metric's
own output-space matrix, so the GGN, the Fisher (exact or Monte Carlo) and the empirical
Fisher all take this path.

It assumes that samples do not interact (f_n depends on x_n only) and that Λ_b is block
diagonal over the samples. Both are checked at run time: the dense matrix is compared with
one Gauss-Newton product on a fixed random vector, and anything else gives None (the caller
then builds G from d products).

Example
-------
>>> import torch
>>> from torch import nn
>>> import covariant as cv
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> data = (torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,)))
>>> space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")
>>> G = space.metric                      # GGN.dense takes this path for this model
>>> fast = G.dense(theta)
>>> slow = torch.stack([G.matvec(theta, e) for e in torch.eye(26, dtype=torch.float64)])
>>> bool(torch.allclose(fast, slow, rtol=1e-12, atol=1e-14))
True
>>> len(linear_layers(model, 26))          # both layers are nn.Linear: it qualifies
2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layout import ParameterLayout
from .kfac_factors import candidate_layers, layer_signals
from .losses import cast_input

__all__ = ["LINEAR_DENSE_CHUNK", "LinearBlock", "layer_inputs", "linear_blocks", "linear_dense",
           "linear_layers"]

Forward = Callable[[Tensor, Tensor], Tensor]
OutputMatvec = Callable[[int, Tensor, Tensor, Tensor], Tensor]

#: Elements of one (samples × pair) operand of the block products; bounds their memory.
LINEAR_DENSE_CHUNK = 1 << 22


@dataclass(frozen=True)
class LinearBlock:
    """One ``nn.Linear``: its name, whether it has a weight / bias in the layout, and the flat
    positions of its [W | b] (out, in + 1) entries, row-major."""

    name: str
    weight: bool
    bias: bool
    index: Tensor


def linear_layers(model: nn.Module, dim: int) -> list | None:
    """The ``nn.Linear`` layers (``kfac_factors`` layer records) holding every trainable
    parameter of ``model``, or None when some parameter lives elsewhere or the trainable
    layout has not ``dim`` entries."""
    layout = ParameterLayout.from_module(model)
    if layout.dim != dim:
        return None
    layers = candidate_layers(model, layout)
    if any(type(la.module) is not nn.Linear for la in layers):
        return None
    covered = sum((la.weight.stop - la.weight.start if la.weight is not None else 0)
                  + (la.bias.stop - la.bias.start if la.bias is not None else 0)
                  for la in layers)
    return layers if covered == layout.dim else None


def linear_blocks(layers: list) -> list[LinearBlock]:
    """One :class:`LinearBlock` per layer record of :func:`linear_layers`."""
    out = []
    for la in layers:
        rows, cols = la.module.out_features, []
        if la.weight is not None:
            cols.append(torch.arange(la.weight.start, la.weight.stop).reshape(rows, -1))
        if la.bias is not None:
            cols.append(torch.arange(la.bias.start, la.bias.stop).reshape(rows, 1))
        out.append(LinearBlock(la.name, la.weight is not None, la.bias is not None,
                               torch.cat(cols, 1).reshape(-1)))
    return out


def layer_inputs(blk: LinearBlock, x: Tensor) -> Tensor:
    """ā (N, in') of a layer: its input, a 1 appended for the bias (only a 1 without W)."""
    ones = x.new_ones(x.shape[0], 1)
    if not blk.weight:
        return ones
    return torch.cat([x, ones], 1) if blk.bias else x


def _pairs(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs a <= b of n indices (rows, columns), and the (n·n,) map of every (a, b) to
    its pair (symmetric)."""
    r, c = torch.triu_indices(n, n, device=device)
    k = torch.arange(r.numel(), device=device)
    full = torch.empty(n, n, dtype=torch.long, device=device)
    full[r, c] = k
    full[c, r] = k
    return r, c, full.reshape(-1)


def _pair_term(g: Tensor, h: Tensor, a: Tensor, a2: Tensor, same: bool) -> Tensor:
    """Σ_n vec(B_n) vec(ā_n ā'_nᵀ)ᵀ with B_n = Σ_c g[c, n] h[c, n]ᵀ: (out·out', in·in'). For a
    diagonal block (``same``) both factors are symmetric, so only the pairs a <= b and
    i <= j are formed (a quarter of the products; :func:`_expand` restores the rest)."""
    P = torch.einsum("cna,cnb->nab", g, h).reshape(g.shape[1], -1)
    Q = (a[:, :, None] * a2[:, None, :]).reshape(a.shape[0], -1)
    if same:  # whole-row selections (a gather along the last dim of g would be slow)
        ro, co, _ = _pairs(g.shape[2], g.device)
        ri, ci, _ = _pairs(a.shape[1], a.device)
        P = P.index_select(1, ro * g.shape[2] + co)
        Q = Q.index_select(1, ri * a.shape[1] + ci)
    return P.T @ Q


def _expand(M: Tensor, n_out: int, n_in: int) -> Tensor:
    """A diagonal block's pair sums (:func:`_pair_term`) as the full (n_out², n_in²)."""
    _, _, fo = _pairs(n_out, M.device)
    _, _, fi = _pairs(n_in, M.device)
    return M[fo][:, fi]


def _batch_terms(blocks: list[LinearBlock], layers: list, forward: Forward,
                 output_matvec: OutputMatvec, b: int, w: float, X: Tensor, y: Tensor,
                 p: Tensor, acc: dict[tuple[int, int], Tensor]) -> bool:
    """Add batch b's Σ_n B_n^{lm} ⊗ ā^l ā^{mᵀ} (as (out_l·out_m, in_l·in_m)) to ``acc``;
    False when the batch does not have the assumed shape."""

    def basis(out: Tensor) -> Tensor:  # one column per output, every sample at once
        if out.ndim != 2:  # not (N, C): this batch is rejected below
            return out.new_zeros(1, *out.shape)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return eye[:, None, :].expand(-1, out.shape[0], -1)

    sig = layer_signals(layers, forward, p, cast_input(X, p), basis)
    out = sig.out
    if out.ndim != 2 or len(sig.xs) != len(blocks):
        return False
    N = out.shape[0]
    xs = [sig.xs[blk.name] for blk in blocks]
    if any(x.shape[1] != 1 or x.shape[0] != N for x in xs):
        return False
    yb = y.to(device=p.device)
    lam = torch.stack([output_matvec(b, out, yb, e) for e in basis(out)])  # Λ_n[c, k] at k,n,c
    gs = [sig.gs[blk.name][:, :, 0] for blk in blocks]  # (C, N, out_l)
    hs = [torch.einsum("knc,knb->cnb", lam, g) for g in gs]  # Λ_n g^m
    abar = [layer_inputs(blk, x[:, 0]) for blk, x in zip(blocks, xs, strict=True)]
    for i in range(len(blocks)):
        for j in range(i, len(blocks)):
            width = max(gs[i].shape[2] * gs[j].shape[2], abar[i].shape[1] * abar[j].shape[1])
            step = max(1, LINEAR_DENSE_CHUNK // width)
            for s in range(0, N, step):
                sl = slice(s, s + step)
                term = _pair_term(gs[i][:, sl], hs[j][:, sl], abar[i][sl], abar[j][sl], i == j)
                acc[i, j] = w * term if (i, j) not in acc else acc[i, j] + w * term
    return True


def linear_dense(model: nn.Module, forward: Forward, output_matvec: OutputMatvec,
                 batches: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                 p: Tensor, layers: list | None = None) -> Tensor | None:
    """The dense Σ_b w_b J_bᵀ Λ_b J_b of an all-``nn.Linear`` model (module docstring), or None
    when ``model`` does not qualify. ``output_matvec(b, out, y, u)`` is Λ_b u; ``forward``
    must be the model's functional forward over its trainable parameters (as
    ``ParameterSpace.from_module`` builds it). Not checked against a product here: callers
    do that (``CurvatureMetric.dense``)."""
    layers = linear_layers(model, p.shape[0]) if layers is None else layers
    if not layers:
        return None
    blocks = linear_blocks(layers)
    acc: dict[tuple[int, int], Tensor] = {}
    with torch.no_grad():
        for b, (w, (X, y)) in enumerate(zip(weights, batches, strict=True)):
            if not _batch_terms(blocks, layers, forward, output_matvec, b, float(w), X, y, p,
                                acc):
                return None
    d = p.shape[0]
    G = p.new_zeros(d, d)
    for (i, j), M in acc.items():
        bi, bj = blocks[i], blocks[j]
        oi, oj = bi.index.numel(), bj.index.numel()
        out_i, out_j = layers[i].module.out_features, layers[j].module.out_features
        if i == j:
            M = _expand(M, out_i, oi // out_i)
        blk = M.reshape(out_i, out_j, oi // out_i, oj // out_j).permute(0, 2, 1, 3)
        blk = blk.reshape(oi, oj)
        ii, jj = bi.index.to(p.device), bj.index.to(p.device)
        G[ii[:, None], jj[None, :]] = blk
        if i != j:
            G[jj[:, None], ii[None, :]] = blk.T
    return G  # exactly symmetric: diagonal blocks from pairs, the others set twice
