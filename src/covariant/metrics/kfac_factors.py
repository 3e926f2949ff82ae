r"""The Kronecker factors of K-FAC and EK-FAC at a point, from one pass of hooks per column.

For a layer ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (groups 1, zero padding) with weight
matrix W (out × in; a convolution's W.reshape(out, -1)) the curvature block is B ⊗ A on the
row-major vec(W) (docs/math.md §9):

- A = Σ_{n,t} x_nt x_ntᵀ / (N·T) (``"expand"``) or Σ_n x̄_n x̄_nᵀ / N (``"reduce"``), with
  x_nt the layer input at sample n and weight-sharing position t (a convolution's unfolded
  patch; every leading position of a Linear's (N, …, in) input), N the number of data points;
- B = Σ_k Σ_{n,t} g_ntk g_ntkᵀ (``"reduce"``: g_nk = Σ_t g_ntk), with g_·k the gradient of
  ⟨f_b, S_b[:, k]⟩ at the layer's output and S_b a square root of the weighted output Hessian,
  S_b S_bᵀ = w_b ∇²_f ℓ_b (``"type2"``), or the seeded Monte-Carlo gradients of the Fisher
  (``"mc"``, the same draws as ``covariant.metrics.Fisher(mc_samples=M, seed=...)``).

The layer inputs and outputs are reached by forward hooks that fire inside the space's
functional forward; the backprop columns are ``torch.func`` vector-Jacobian products with
respect to zero perturbations added to the layer outputs (all columns at once, vmapped).
With a point that requires grad and ``differentiable=True`` the graph is kept, so the
factors (and the metric) can be differentiated in the point by reverse mode.

Parameters of any other module ("uncovered") get the exact diagonal of the same curvature,
Σ_b Σ_n Σ_k (∂⟨f_n, S_b[n, k]⟩/∂θ_i)², from per-sample vector-Jacobian products (vmapped).
Like K-FAC itself this assumes that the samples of a batch do not interact (no batch norm in
training mode).

Example
-------
>>> import torch
>>> from torch import nn
>>> from covariant.layout import ParameterLayout, functional_forward
>>> _ = torch.manual_seed(0)
>>> lin = nn.Linear(3, 2).double()
>>> layout = ParameterLayout.from_module(lin)
>>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
>>> p = layout.flatten(dict(lin.named_parameters())).detach()
>>> fs = compute_factors(lin, layout, functional_forward(lin, layout), nn.MSELoss(),
...                      [(X, y)], [1.0], p, FactorOptions())
>>> [b.name for b in fs.blocks]
['weight', 'bias']
>>> # MSE on a linear layer: B = 2c·N·I and A = XᵀX/N, so B ⊗ A is the exact GGN block
>>> bool(torch.allclose(torch.kron(fs.blocks[0].B, fs.blocks[0].A),
...                     torch.kron(torch.eye(2, dtype=torch.float64), X.T @ X / 5)))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from ..errors import ShapeMismatchError, UnsupportedStructureError
from ..layout import ParameterLayout
from .kronecker import KroneckerBlock, block_spectrum
from .losses import CrossEntropyRows, LossInfo, cast_input, loss_info, reduction_factor
from .shard import DataShard

__all__ = [
    "FISHER_TYPES",
    "KFAC_APPROX",
    "SUPPORTED_LOSSES",
    "FactorOptions",
    "FactorSet",
    "compute_factors",
    "kfac_loss_info",
    "layer_signals",
    "output_columns",
]

FISHER_TYPES = ("type2", "mc")
KFAC_APPROX = ("expand", "reduce")
SUPPORTED_LOSSES = (
    "nn.CrossEntropyLoss (without class weights; any reduction 'mean'/'sum', ignore_index, "
    "label_smoothing), nn.MSELoss, nn.BCEWithLogitsLoss (without weight / pos_weight), or "
    "their functional forms"
)

#: Samples per vmapped call of the exact diagonal of the uncovered parameters.
DIAG_CHUNK = 16

Forward = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FactorOptions:
    """What to compute: the curvature (``fisher_type``), weight sharing (``kfac_approx``),
    bias handling, EK-FAC eigenvalues, and the Monte-Carlo draws (one tensor per batch)."""

    fisher_type: str = "type2"
    kfac_approx: str = "expand"
    separate_bias: bool = True
    ekfac: bool = False
    noise: tuple[Tensor, ...] | None = None


@dataclass
class FactorSet:
    """Blocks, plus the exact diagonal ``rest_diagonal`` at the positions ``rest_index``."""

    blocks: list[KroneckerBlock]
    rest_index: Tensor
    rest_diagonal: Tensor
    uncovered: tuple[str, ...] = ()


@dataclass
class _Layer:
    """A candidate layer: its module, and the flat slices of its weight and bias (or None)."""

    name: str
    module: nn.Module
    weight: slice | None
    bias: slice | None
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (input, output)


def kfac_loss_info(loss_fn: Callable[[Tensor, Tensor], Tensor], owner: str) -> LossInfo:
    """:func:`loss_info` of a loss that K-FAC supports, else a typed error naming those."""
    info = loss_info(loss_fn)
    if info.kind == "generic":
        name = getattr(type(loss_fn), "__name__", "loss")
        if name == "function":
            name = getattr(loss_fn, "__name__", "loss")
        raise UnsupportedStructureError(
            f"{owner}: no closed-form output-Hessian square root for the loss {name}; "
            f"supported: {SUPPORTED_LOSSES}. For other losses use the exact metrics "
            "(metric='ggn', covariant.metrics.GGN)."
        )
    return info


# ---------------------------------------------------------------------- output columns
def _ce_columns(info: LossInfo, out: Tensor, y: Tensor, w: float, fisher_type: str,
                noise: Tensor | None) -> Tensor:
    if out.ndim < 2:
        raise ShapeMismatchError("K-FAC: cross-entropy outputs must be batched, (N, C, ...)")
    ce = CrossEntropyRows(out, y, info)
    R, C = ce.probs.shape
    L = R // out.shape[0]  # rows (positions) per sample
    if fisher_type == "type2":
        sp = ce.probs.sqrt()
        root = torch.diag_embed(sp) - ce.probs[:, :, None] * sp[:, None, :]  # (R, C, C)
        scale = (w * ce.c * ce.weight).sqrt()
        cols = (scale[:, None, None] * root).permute(2, 0, 1)  # (K=C, R, C)
    else:
        assert noise is not None
        g = ce.mc_grads(noise.to(dtype=out.dtype, device=out.device))  # (R, M, C)
        scale = (w * ce.c * ce.weight / g.shape[1]).sqrt()
        cols = (scale[:, None, None] * g).permute(1, 0, 2)  # (K=M, R, C)
    if L > 1:  # a sample's positions share its weights: one column per (k, position)
        pos = torch.arange(R, device=out.device) % L
        mask = (pos[None, :] == torch.arange(L, device=out.device)[:, None]).to(cols.dtype)
        cols = (cols[:, None] * mask[None, :, :, None]).reshape(-1, R, C)
    K = cols.shape[0]
    return cols.reshape(K, *ce.moved_shape).movedim(-1, 2)


def output_columns(info: LossInfo, out: Tensor, y: Tensor, w: float, fisher_type: str,
                   noise: Tensor | None = None) -> Tensor:
    """Columns S (K, *out.shape) with Σ_k S_k S_kᵀ, restricted to each sample, equal to the
    weighted output curvature of that sample (``"type2"``: w_b ∇²_f ℓ_b; ``"mc"``: the
    Monte-Carlo Fisher of ``covariant.metrics.Fisher``). Samples never mix, so one column
    serves all samples of a batch at once."""
    if info.kind == "ce":
        return _ce_columns(info, out, y, w, fisher_type, noise)
    N = out.shape[0] if out.ndim > 0 else 1
    c = reduction_factor(info, out)
    if fisher_type == "type2":
        k = out.numel() // max(N, 1)
        if info.kind == "mse":
            diag = torch.full_like(out, 2.0 * w * c).sqrt()
        else:
            s = torch.sigmoid(out)
            diag = (w * c * s * (1 - s)).sqrt()
        eye = torch.eye(k, dtype=out.dtype, device=out.device)
        basis = eye[:, None, :].expand(k, N, k).reshape(k, *out.shape)
        return basis * diag[None]
    assert noise is not None
    z = noise.to(dtype=out.dtype, device=out.device)
    M = z.shape[0]
    if info.kind == "mse":
        g = math.sqrt(2.0) * z  # ∇ℓ = 2(f − ỹ), ỹ = f + z/√2
    else:
        s = torch.sigmoid(out)
        g = s[None] - (z < s.detach()[None]).to(out.dtype)
    return (w * c / M) ** 0.5 * g.reshape(M, *out.shape)


# ---------------------------------------------------------------------- layers
def _covered_type(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return type(m) in (nn.Conv1d, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def candidate_layers(model: nn.Module, layout: ParameterLayout) -> list[_Layer]:
    """Linear / Conv1d / Conv2d modules (groups 1, zero padding) with a trainable weight or
    bias in ``layout``; whether they are covered is decided when their hooks fire."""
    slices = layout.slices
    out = []
    for name, m in model.named_modules():
        if not _covered_type(m):
            continue
        pre = f"{name}." if name else ""
        w, b = slices.get(pre + "weight"), slices.get(pre + "bias")
        if w is not None or b is not None:
            out.append(_Layer(name, m, w, b))
    return out


def _pads(m: nn.Module, nd: int) -> list[tuple[int, int]]:
    k, d = m.kernel_size, m.dilation
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [(0, 0)] * nd
        tot = [d[i] * (k[i] - 1) for i in range(nd)]
        return [(t // 2, t - t // 2) for t in tot]
    return [(int(q), int(q)) for q in m.padding]


def input_rows(m: nn.Module, x: Tensor) -> Tensor:
    """The layer input as rows (N, T, in): positions t, the unfolded patch for a conv."""
    if isinstance(m, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(m, nn.Conv1d):
        (lo, hi), = _pads(m, 1)
        x = F.pad(x, (lo, hi))[:, :, None, :]
        k, d, s = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
    else:
        (hl, hh), (wl, wh) = _pads(m, 2)
        x = F.pad(x, (wl, wh, hl, hh))
        k, d, s = m.kernel_size, m.dilation, m.stride
    return F.unfold(x, k, dilation=d, padding=0, stride=s).transpose(1, 2)


def grad_rows(m: nn.Module, g: Tensor) -> Tensor:
    """The gradient at the layer output as rows (N, T, out)."""
    if isinstance(m, nn.Linear):
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)


def _block_index(layer: _Layer, joint: bool, out_dim: int) -> list[tuple[str, Tensor]]:
    pre = f"{layer.name}." if layer.name else ""
    w, b = layer.weight, layer.bias
    if w is not None and b is not None and joint:
        W = torch.arange(w.start, w.stop).reshape(out_dim, -1)
        bias = torch.arange(b.start, b.stop).reshape(out_dim, 1)
        return [(f"{pre}weight+{pre}bias", torch.cat([W, bias], 1).reshape(-1))]
    parts = []
    if w is not None:
        parts.append((pre + "weight", torch.arange(w.start, w.stop)))
    if b is not None:
        parts.append((pre + "bias", torch.arange(b.start, b.stop)))
    return parts


# ---------------------------------------------------------------------- one batch
@dataclass
class _Signals:
    """One batch: per covered layer its input rows (N, T, in) and the output-gradient rows
    (K, N, T, out) of the K backprop columns."""

    xs: dict[str, Tensor]
    gs: dict[str, Tensor]
    out: Tensor
    cols: Tensor


def _run_hooked(layers: list[_Layer], forward: Forward, q: Tensor, X: Tensor,
                eps: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
    """forward(q, X) with hooks: record each layer's input and add ``eps[name]`` (a zero
    perturbation, the handle of the layer's output gradient) to its output."""
    for layer in layers:
        layer.calls = []

    def make_hook(layer: _Layer) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            layer.calls.append((inputs[0], output))
            if eps is None or layer.name not in eps:
                return output
            return output + eps[layer.name]
        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        out = forward(q, cast_input(X, q))
    finally:
        for h in handles:
            h.remove()
    xs = {la.name: la.calls[0][0].clone() for la in layers if len(la.calls) == 1}
    return out, xs


def layer_signals(layers: list[_Layer], forward: Forward, q: Tensor, X: Tensor,
                  columns: Callable[[Tensor], Tensor]) -> _Signals:
    """Layer inputs and output gradients of one batch, for the backprop columns
    ``columns(out)`` (K, *out.shape), by ``torch.func``: the gradients are vector-Jacobian
    products with respect to zero perturbations of the layer outputs, so this composes with
    outer autograd (reverse mode in the point) and ``vmap``. Layers not called exactly once
    are left out of the result."""
    with torch.no_grad():  # which layers run once, and their output shapes
        _run_hooked(layers, forward, q.detach(), X, None)
    live = [la for la in layers if len(la.calls) == 1]
    eps = {la.name: torch.zeros_like(la.calls[0][1]) for la in live}
    for la in layers:
        la.calls = []

    def f(e: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return _run_hooked(live, forward, q, X, e)

    out, pull, xs = vjp(f, eps, has_aux=True)
    cols = columns(out)
    try:
        grads = vmap(pull)(cols)[0]
    except (RuntimeError, NotImplementedError):  # ops without batching rules
        per = [pull(c)[0] for c in cols]
        grads = {n: torch.stack([g[n] for g in per]) for n in eps}
    gs = {la.name: torch.stack([grad_rows(la.module, g) for g in grads[la.name]])
          for la in live}
    return _Signals({la.name: input_rows(la.module, xs[la.name]) for la in live}, gs, out,
                    cols)


def _batch_signals(layers: list[_Layer], forward: Forward, q: Tensor, X: Tensor, y: Tensor,
                   w: float, info: LossInfo, opts: FactorOptions, noise: Tensor | None
                   ) -> _Signals:
    """:func:`layer_signals` with the K-FAC columns (:func:`output_columns`)."""
    yq = y.to(device=q.device)
    return layer_signals(layers, forward, q, X, lambda out: output_columns(
        info, out, yq, w, opts.fisher_type, noise))


def _is_bias(block_name: str) -> bool:
    return "+" not in block_name and block_name.rsplit(".", 1)[-1] == "bias"


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def _input_factor(x: Tensor, approx: str, n_data: int) -> Tensor:
    if approx == "expand":
        r = x.reshape(-1, x.shape[-1])
        return r.T @ r / (n_data * x.shape[1])
    xb = x.mean(1)
    return xb.T @ xb / n_data


def _grad_factor(g: Tensor, approx: str) -> Tensor:
    """Σ_k Σ_{n,t} g gᵀ (expand) or Σ_k Σ_n (Σ_t g)(Σ_t g)ᵀ (reduce), g of shape (K, N, T, out)."""
    r = g.reshape(-1, g.shape[-1]) if approx == "expand" else g.sum(2).reshape(-1, g.shape[-1])
    return r.T @ r


def _add(acc: dict[str, Tensor], key: str, val: Tensor) -> None:
    acc[key] = val if key not in acc else acc[key] + val


def _ekfac_correction(x: Tensor, gs: Tensor, QA: Tensor | None, QB: Tensor) -> Tensor:
    """Σ_n Σ_k (Q_Bᵀ Ĝ_nk Q_A)² with Ĝ_nk = Σ_t g_ntk x_ntᵀ (Q_A None: a bias, x = 1)."""
    total = None
    for g in gs:
        gt = g @ QB  # (N, T, out)
        if QA is None:
            term = gt.sum(1).square().sum(0)[:, None]
        else:
            term = torch.einsum("nto,nti->noi", gt, x @ QA).square().sum(0)
        total = term if total is None else total + term
    assert total is not None
    return total


# ---------------------------------------------------------------------- uncovered diagonal
def _uncovered_diagonal(forward: Forward, q: Tensor, idx: Tensor, X: Tensor,
                        cols: Tensor) -> Tensor:
    """Σ_n Σ_k (∂⟨f_n, cols[k, n]⟩/∂q[idx])²: per-sample vjps, vmapped in chunks."""
    Xc = cast_input(X, q)
    base = q

    def one(x: Tensor, c: Tensor) -> Tensor:
        def f(qu: Tensor) -> Tensor:
            return forward(base.index_copy(0, idx, qu), x[None])[0]

        _, pull = vjp(f, base[idx])
        G = vmap(pull)(c)[0]  # (K, len(idx))
        return G.square().sum(0)

    per = cols.movedim(1, 0)  # (N, K, ...)
    try:
        parts = [vmap(one)(Xc[i:i + DIAG_CHUNK], per[i:i + DIAG_CHUNK]).sum(0)
                 for i in range(0, Xc.shape[0], DIAG_CHUNK)]
    except (RuntimeError, NotImplementedError):  # ops without batching rules
        parts = [torch.stack([one(Xc[i], per[i][k:k + 1]) for k in range(per.shape[1])]).sum(0)
                 for i in range(Xc.shape[0])]
    return torch.stack(parts).sum(0)


# ---------------------------------------------------------------------- all batches
def compute_factors(model: nn.Module, layout: ParameterLayout, forward: Forward,
                    loss_fn: Callable[[Tensor, Tensor], Tensor],
                    batches: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                    p: Tensor, opts: FactorOptions, *, differentiable: bool = False,
                    shard: DataShard | None = None) -> FactorSet:
    """The K-FAC (``opts.ekfac``: EK-FAC) factors of all covered layers at ``p`` and the exact
    diagonal of the rest; differentiable in ``p`` (reverse mode) with ``differentiable``.
    With a ``shard`` the sums over the data are reduced over the ranks (:func:`_reduced`)."""
    info = kfac_loss_info(loss_fn, "K-FAC")
    create = bool(differentiable and p.requires_grad)
    if create and shard is not None:
        raise UnsupportedStructureError(
            "K-FAC: differentiable factors (connection terms of a K-FAC metric) are not "
            "reduced over data-parallel ranks; use riemannian=False")
    q = p if create else p.detach()
    layers = candidate_layers(model, layout)
    n_data = shard.examples if shard is not None else sum(int(X.shape[0]) for X, _ in batches)
    joint = not opts.separate_bias
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    covered: list[_Layer] | None = None
    diag = q.new_zeros(layout.dim)
    rest_mask = torch.ones(layout.dim, dtype=torch.bool)

    def noise_of(b: int) -> Tensor | None:
        return None if opts.noise is None else opts.noise[b]

    with torch.enable_grad() if create else torch.no_grad():
        for b, ((X, y), w) in enumerate(zip(batches, weights, strict=True)):
            sig = _batch_signals(layers if covered is None else covered, forward, q, X, y,
                                 float(w), info, opts, noise_of(b))
            if covered is None:
                covered = [la for la in layers if la.name in sig.xs]
                for la in covered:
                    for _, idx in _block_index(la, joint, la.module.weight.shape[0]):
                        rest_mask[idx] = False
                rest_idx = torch.nonzero(rest_mask).reshape(-1)
            elif len(sig.xs) != len(covered):
                raise ShapeMismatchError("K-FAC: the layers called differ between batches")
            _accumulate(covered, sig, A, B, opts, n_data)
            if rest_idx.numel():
                ri = rest_idx.to(q.device)
                d = _uncovered_diagonal(forward, q, ri, X, sig.cols)
                diag = diag.index_add(0, ri, d)
        assert covered is not None
        if shard is not None:
            A, B, diag = _reduced(shard, q, A, B, diag)
        blocks, owners = _blocks(covered, A, B, joint, q)
        if opts.ekfac:
            blocks = _eigenvalue_corrections(covered, blocks, owners, forward, q, batches,
                                             weights, info, opts, shard)
    rest_idx = rest_idx.to(q.device)
    uncovered = tuple(n for n, s in layout.slices.items() if bool(rest_mask[s].any()))
    return FactorSet(blocks, rest_idx, diag[rest_idx], uncovered)


def _accumulate(covered: list[_Layer], sig: _Signals, A: dict[str, Tensor],
                B: dict[str, Tensor], opts: FactorOptions, n_data: int) -> None:
    joint = not opts.separate_bias
    for la in covered:
        x, gs = sig.xs[la.name], sig.gs[la.name]
        if la.weight is not None:
            xa = _with_ones(x) if joint and la.bias is not None else x
            _add(A, la.name, _input_factor(xa, opts.kfac_approx, n_data))
        _add(B, la.name, _grad_factor(gs, opts.kfac_approx))


def _blocks(covered: list[_Layer], A: dict[str, Tensor], B: dict[str, Tensor], joint: bool,
            q: Tensor) -> tuple[list[KroneckerBlock], list[str]]:
    """The K-FAC blocks, and the layer each one belongs to."""
    out, owners = [], []
    one = q.new_ones(1, 1)
    for la in covered:
        for name, idx in _block_index(la, joint, la.module.weight.shape[0]):
            a = one if _is_bias(name) else A[la.name]
            out.append(KroneckerBlock(name, idx.to(q.device), a, B[la.name]))
            owners.append(la.name)
    return out, owners


def _eigenvalue_corrections(covered: list[_Layer], blocks: list[KroneckerBlock],
                            owners: list[str], forward: Forward, q: Tensor,
                            batches: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                            info: LossInfo, opts: FactorOptions,
                            shard: DataShard | None = None) -> list[KroneckerBlock]:
    """EK-FAC: replace each block's eigenvalues b_i a_j by Σ_n Σ_k (Q_Bᵀ Ĝ_nk Q_A)²_ij
    (George et al. 2018), a second pass over the data in the factors' eigenbasis
    (:func:`~covariant.metrics.kronecker.block_spectrum`, the one every closed form uses)."""
    bases = {}
    for blk in blocks:
        QB, QA, _ = block_spectrum(blk)
        bases[blk.name] = (None if _is_bias(blk.name) else QA, QB)
    corr: dict[str, Tensor] = {}
    for b, ((X, y), w) in enumerate(zip(batches, weights, strict=True)):
        noise = None if opts.noise is None else opts.noise[b]
        sig = _batch_signals(covered, forward, q, X, y, float(w), info, opts, noise)
        for la in covered:
            x = sig.xs[la.name]
            for blk, owner in zip(blocks, owners, strict=True):
                if owner != la.name:
                    continue
                QA, QB = bases[blk.name]
                xa = _with_ones(x) if "+" in blk.name else x
                _add(corr, blk.name, _ekfac_correction(xa, sig.gs[la.name], QA, QB))
    if shard is not None:
        corr = _reduced(shard, q, corr)[0]
    return [replace(blk, eigenvalues=corr[blk.name]) for blk in blocks]


def _reduced(shard: DataShard, q: Tensor, *parts: dict[str, Tensor] | Tensor) -> list[Any]:
    """The dicts of matrices and the tensors in ``parts``, each summed over the ranks: one
    all-reduce of all their entries, stacked (Σ (in+1)² + out² per layer, plus the uncovered
    diagonal; the EK-FAC corrections are a second one)."""
    flat = [t for part in parts for t in (part.values() if isinstance(part, dict) else [part])]
    sizes = [t.numel() for t in flat]
    stacked = torch.cat([t.reshape(-1) for t in flat]) if flat else q.new_zeros(0)
    total = shard.reduce(lambda _: stacked, q).split(sizes)
    out: list[Any] = []
    it = iter(total)
    for part in parts:
        if isinstance(part, dict):
            out.append({k: next(it).reshape(v.shape) for k, v in part.items()})
        else:
            out.append(next(it).reshape(part.shape))
    return out

