r"""Block-diagonal Kronecker-factored operators: the linear algebra of K-FAC and EK-FAC.

An operator on ℝ^d made of blocks, one per layer, plus a diagonal for the rest, plus damping:

.. math::

    K_λ = \Big(\bigoplus_l B_l ⊗ A_l\Big) ⊕ \operatorname{diag}(r) + λ I.

A block acts on the entries of one parameter matrix W (out × in, read row-major from the flat
vector at ``index``): (B ⊗ A) vec(W) = vec(B W A) for symmetric A, B. With the eigenbasis
A = Q_A diag(a) Q_Aᵀ, B = Q_B diag(b) Q_Bᵀ, the block is Q (diag vec Λ) Qᵀ with Q = Q_B ⊗ Q_A
and Λ = b aᵀ (K-FAC) or a corrected matrix of eigenvalues (EK-FAC). Every function of the
operator is therefore closed-form, one layer at a time:

.. math::

    f(K_λ)\,\mathrm{vec}(W) = \mathrm{vec}\big(Q_B\,[f(Λ + λ) ∘ (Q_Bᵀ W Q_A)]\,Q_Aᵀ\big),

which gives ``solve`` (f = 1/x), ``inv_sqrt`` (f = x^{-1/2}), ``sqrt`` and ``logdet`` (Σ log)
at the cost of the factors' eigendecompositions, computed once per operator. The damping is
exact: λ is added to the eigenvalues, not to the factors. An eigenvalue is numerically null
when it is at most ``null_rtol`` times the largest one (docs/math.md §4.1); ``solve`` and
``logdet`` refuse a singular operator unless asked for the pseudo-inverse / pseudo-log-det.

Example
-------
>>> import torch
>>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
>>> B = torch.tensor([[3.0]], dtype=torch.float64)
>>> blk = KroneckerBlock("w", torch.tensor([1, 0]), A, B)      # W = [[p1, p0]]
>>> K = KroneckerFactored([blk], dim=3, rest_index=torch.tensor([2]),
...                       rest_diagonal=torch.tensor([5.0], dtype=torch.float64), damping=1.0)
>>> K.dense()
tensor([[7., 3., 0.],
        [3., 7., 0.],
        [0., 0., 6.]], dtype=torch.float64)
>>> v = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
>>> bool(torch.allclose(K.matvec(K.solve(v)), v))
True
>>> round(float(K.logdet()), 6) == round(float(torch.logdet(K.dense())), 6)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .._checks import default_tol
from ..errors import ShapeMismatchError, SingularMetricError
from .base import Metric, check_dense_size

__all__ = ["KroneckerBlock", "KroneckerFactored", "KroneckerMetric", "block_spectrum"]

#: Relative threshold below which an eigenvalue counts as numerically null (floored at
#: 100·eps of the dtype), the same default as the curvature metrics' numerical rank.
NULL_RTOL = 1e-10

_DAMPING_HINT = (
    "Damp it (KFAC(..., damping=lam) adds lam·I exactly in the chart of the weights, and a "
    "reparametrized space pulls the damped metric back as a whole, docs/math.md §5), or ask "
    "for the pseudo-inverse (solve_mode='pinv')."
)


@dataclass(frozen=True)
class KroneckerBlock:
    """One layer's block B ⊗ A, acting on the matrix W = p[index].reshape(out, in).

    Parameters
    ----------
    name : str
        What the block covers, e.g. ``"0.weight"`` or ``"0.weight+0.bias"``.
    index : LongTensor, shape (out·in,)
        Flat positions of W's entries in the point, row-major.
    A : Tensor, shape (in, in)
        Input factor (symmetric positive semi-definite).
    B : Tensor, shape (out, out)
        Output-gradient factor (symmetric positive semi-definite).
    eigenvalues : Tensor, shape (out, in), optional
        EK-FAC's eigenvalues in the basis Q_B ⊗ Q_A of ``eigh(B)``, ``eigh(A)``; None for K-FAC
        (Λ = b aᵀ).
    """

    name: str
    index: Tensor
    A: Tensor
    B: Tensor
    eigenvalues: Tensor | None = None

    def __post_init__(self) -> None:
        n_in, n_out = self.A.shape[-1], self.B.shape[-1]
        if self.A.shape != (n_in, n_in) or self.B.shape != (n_out, n_out):
            raise ShapeMismatchError(
                f"KroneckerBlock {self.name!r}: A and B must be square, got "
                f"{tuple(self.A.shape)} and {tuple(self.B.shape)}")
        if self.index.shape != (n_out * n_in,):
            raise ShapeMismatchError(
                f"KroneckerBlock {self.name!r}: index must have out·in = {n_out * n_in} "
                f"entries, got shape {tuple(self.index.shape)}")
        if self.eigenvalues is not None and self.eigenvalues.shape != (n_out, n_in):
            raise ShapeMismatchError(
                f"KroneckerBlock {self.name!r}: eigenvalues must have shape ({n_out}, {n_in}), "
                f"got {tuple(self.eigenvalues.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the shape of the block's parameter matrix."""
        return self.B.shape[0], self.A.shape[0]

    def positions(self) -> slice | Tensor:
        """``index`` as a slice when it is a contiguous ascending run (a view instead of a
        gather), else the index itself."""
        idx = self.index
        first, n = int(idx[0]), idx.numel()
        run = torch.arange(first, first + n, device=idx.device, dtype=idx.dtype)
        return slice(first, first + n) if torch.equal(idx, run) else idx


def block_spectrum(block: KroneckerBlock) -> tuple[Tensor, Tensor, Tensor]:
    """(Q_B, Q_A, Λ) of one block: the eigenvectors of B and A (``eigh`` of the symmetrized
    factors) and the (out, in) eigenvalues, b aᵀ (with round-off below zero set to zero: the
    factors are PSD) or the block's EK-FAC eigenvalues. The one definition of the eigenbasis
    that every closed form and EK-FAC's refit use."""
    a, QA = torch.linalg.eigh(0.5 * (block.A + block.A.T))
    b, QB = torch.linalg.eigh(0.5 * (block.B + block.B.T))
    if block.eigenvalues is not None:
        return QB, QA, block.eigenvalues
    return QB, QA, torch.outer(b.clamp_min(0.0), a.clamp_min(0.0))


def _sandwich(L: Tensor, M: Tensor, R: Tensor) -> Tensor:
    """L M_j R for every M_j of the batch M (shape (k, out, in)): batched matrix products."""
    return torch.matmul(torch.matmul(L.to(M.dtype), M), R.to(M.dtype))


@dataclass
class _Eigen:
    """Eigenbasis of one block: Q_B, Q_A and the matrix of eigenvalues Λ (without damping)."""

    QB: Tensor
    QA: Tensor
    lam: Tensor


@dataclass
class KroneckerFactored:
    """K_λ = (⊕_l B_l ⊗ A_l) ⊕ diag(r) + λ I on ℝ^d (see the module docstring).

    Parameters
    ----------
    blocks : sequence of KroneckerBlock
    dim : int
        d; the blocks' indices and ``rest_index`` must partition range(d).
    rest_index : LongTensor, optional
        Positions that no block covers.
    rest_diagonal : Tensor, optional
        Their diagonal r (same length as ``rest_index``).
    damping : float or Tensor
        λ ≥ 0: a number, or a (d,) tensor that is constant on each block (e.g. a per-layer
        prior precision); it is added to the eigenvalues exactly.
    """

    blocks: Sequence[KroneckerBlock]
    dim: int
    rest_index: Tensor | None = None
    rest_diagonal: Tensor | None = None
    damping: float | Tensor = 0.0
    _eigen: list[_Eigen] | None = field(default=None, repr=False, compare=False)
    _where: list[slice | Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.blocks = tuple(self.blocks)
        ref = self.blocks[0].A if self.blocks else self.rest_diagonal
        if ref is None:
            raise ShapeMismatchError("KroneckerFactored: needs at least one block or a rest")
        if (self.rest_index is None) != (self.rest_diagonal is None):
            raise ShapeMismatchError(
                "KroneckerFactored: rest_index and rest_diagonal go together")
        if self.rest_index is None:
            self.rest_index = torch.zeros(0, dtype=torch.long, device=ref.device)
            self.rest_diagonal = ref.new_zeros(0)
        assert self.rest_diagonal is not None
        if self.rest_diagonal.shape != self.rest_index.shape:
            raise ShapeMismatchError(
                f"KroneckerFactored: rest_diagonal has shape {tuple(self.rest_diagonal.shape)}, "
                f"rest_index {tuple(self.rest_index.shape)}")
        counts = torch.bincount(
            torch.cat([b.index.reshape(-1).cpu() for b in self.blocks]
                      + [self.rest_index.cpu()]), minlength=self.dim)
        if counts.numel() != self.dim or not bool((counts == 1).all()):
            raise ShapeMismatchError(
                f"KroneckerFactored: the blocks and the rest must cover each of the {self.dim} "
                "coordinates exactly once")
        self._check_damping()

    # ------------------------------------------------------------------ damping
    def _check_damping(self) -> None:
        lam = self.damping
        if isinstance(lam, Tensor):
            if lam.shape != (self.dim,):
                raise ShapeMismatchError(
                    f"KroneckerFactored: a damping tensor must have shape ({self.dim},), got "
                    f"{tuple(lam.shape)}")
            if bool((lam < 0).any()):
                raise ValueError("KroneckerFactored: damping must be >= 0")
            for b in self.blocks:
                vals = lam[b.index]
                if not bool((vals == vals[0]).all()):
                    raise ValueError(
                        f"KroneckerFactored: the damping must be constant on block {b.name!r}; "
                        "a Kronecker block has a closed form only for λ·I on it")
        elif not float(lam) >= 0.0:
            raise ValueError(f"KroneckerFactored: damping must be >= 0, got {lam!r}")

    def _block_damping(self, b: KroneckerBlock) -> Tensor | float:
        lam = self.damping
        return lam[b.index[0]] if isinstance(lam, Tensor) else float(lam)

    def _rest_damping(self) -> Tensor | float:
        lam = self.damping
        assert self.rest_index is not None
        return lam[self.rest_index] if isinstance(lam, Tensor) else float(lam)

    # ------------------------------------------------------------------ new operators
    def with_damping(self, damping: float | Tensor) -> KroneckerFactored:
        """The same factors with another damping λ (eigendecompositions are shared)."""
        self.spectra()  # once, shared with the copy
        return replace(self, damping=damping, _eigen=self._eigen, _where=self._positions())

    def with_factored_damping(self, damping: float) -> KroneckerFactored:
        """Factored Tikhonov damping (Martens & Grosse 2015, §6.3): each block B ⊗ A becomes
        (B + (√λ/π) I) ⊗ (A + π√λ I) with π = √((tr A / n_in) / (tr B / n_out)), the rest
        r + λ, and no exact damping on top.

        The block is then B ⊗ A + λI + π√λ B ⊗ I + (√λ/π) I ⊗ A ⪰ K + λI: stronger than exact
        damping along directions where a factor is large, which is what keeps K-FAC's
        mini-batch steps stable at a small λ. π balances the two cross terms (it minimizes
        their summed trace). Needs K-FAC blocks (EK-FAC's eigenvalues are not a Kronecker
        product: ``ValueError``) and ``damping == 0`` on ``self``.
        """
        lam = float(damping)
        if not lam >= 0.0:
            raise ValueError(f"with_factored_damping: damping must be >= 0, got {damping!r}")
        if isinstance(self.damping, Tensor) or float(self.damping) != 0.0:
            raise ValueError("with_factored_damping: the operator already has a damping")
        blocks = []
        for b in self.blocks:
            if b.eigenvalues is not None:
                raise ValueError(f"with_factored_damping: block {b.name!r} has EK-FAC "
                                 "eigenvalues; factored damping needs K-FAC factors")
            mean_a = float(torch.diagonal(b.A).mean())
            mean_b = float(torch.diagonal(b.B).mean())
            pi = math.sqrt(mean_a / mean_b) if mean_a > 0.0 and mean_b > 0.0 else 1.0
            root = math.sqrt(lam)
            eye_a = torch.eye(b.A.shape[0], dtype=b.A.dtype, device=b.A.device)
            eye_b = torch.eye(b.B.shape[0], dtype=b.B.dtype, device=b.B.device)
            blocks.append(replace(b, A=b.A + pi * root * eye_a, B=b.B + (root / pi) * eye_b))
        assert self.rest_diagonal is not None
        return KroneckerFactored(blocks, self.dim, self.rest_index, self.rest_diagonal + lam)

    def scaled(self, c: float) -> KroneckerFactored:
        """c·K_λ (the B factors, EK-FAC eigenvalues, rest and damping scaled by c > 0)."""
        if not float(c) > 0.0:
            raise ValueError(f"KroneckerFactored.scaled: c must be > 0, got {c!r}")
        blocks = [replace(b, B=c * b.B,
                          eigenvalues=None if b.eigenvalues is None else c * b.eigenvalues)
                  for b in self.blocks]
        assert self.rest_diagonal is not None
        return KroneckerFactored(blocks, self.dim, self.rest_index, c * self.rest_diagonal,
                                 c * self.damping)

    def averaged(self, other: KroneckerFactored, decay: float) -> KroneckerFactored:
        """The running average decay·self + (1 − decay)·other, factor by factor (A, B, the
        EK-FAC eigenvalues and the rest); the damping is ``other``'s. Both must have the same
        blocks (names and indices)."""
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"KroneckerFactored.averaged: decay must be in [0, 1], got {decay}")
        if [b.name for b in self.blocks] != [b.name for b in other.blocks] \
                or self.dim != other.dim:
            raise ShapeMismatchError("KroneckerFactored.averaged: the operators have "
                                     "different blocks")

        def mix(x: Tensor | None, y: Tensor | None) -> Tensor | None:
            if x is None or y is None:
                return None
            return decay * x + (1.0 - decay) * y

        blocks = []
        for a, b in zip(self.blocks, other.blocks, strict=True):
            eig = mix(a.eigenvalues, b.eigenvalues)
            blocks.append(replace(b, A=mix(a.A, b.A), B=mix(a.B, b.B), eigenvalues=eig))
        return KroneckerFactored(blocks, self.dim, other.rest_index,
                                 mix(self.rest_diagonal, other.rest_diagonal), other.damping)

    # ------------------------------------------------------------------ eigenbasis
    def spectra(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per block (Q_B, Q_A, Λ): the factors' eigenvectors and the (out, in) matrix of the
        block's eigenvalues without damping (b aᵀ, or EK-FAC's), computed once."""
        if self._eigen is None:
            self._eigen = [_Eigen(*block_spectrum(b)) for b in self.blocks]
        return [(e.QB, e.QA, e.lam) for e in self._eigen]

    def eigenvalues(self) -> Tensor:
        """All d eigenvalues of K_λ (unsorted: block by block, then the rest)."""
        parts = [(lam + self._block_damping(b)).reshape(-1)
                 for b, (_, _, lam) in zip(self.blocks, self.spectra(), strict=True)]
        assert self.rest_diagonal is not None
        parts.append(self.rest_diagonal + self._rest_damping())
        return torch.cat(parts)

    def null_threshold(self, null_rtol: float | None = None) -> float:
        """τ = null_rtol · max |eigenvalue|: eigenvalues at or below τ are numerically null."""
        ev = self.eigenvalues()
        rtol = default_tol(null_rtol, ev.dtype, NULL_RTOL)
        return rtol * float(ev.abs().max()) if ev.numel() else 0.0

    def rank(self, null_rtol: float | None = None) -> int:
        """The number of eigenvalues above the null threshold."""
        return int((self.eigenvalues() > self.null_threshold(null_rtol)).sum())

    # ------------------------------------------------------------------ functions of K
    def _positions(self) -> list[slice | Tensor]:
        if self._where is None:
            self._where = [b.positions() for b in self.blocks]
        return self._where

    def _rows(self, v: Tensor) -> Tensor:
        """v (d,) or (d, k) as rows (k, d) (a view of the transpose)."""
        if v.shape[0] != self.dim or v.ndim not in (1, 2):
            raise ShapeMismatchError(
                f"KroneckerFactored: expected a vector ({self.dim},) or a matrix ({self.dim}, k), "
                f"got {tuple(v.shape)}")
        return v.reshape(self.dim, -1).T

    def apply(self, v: Tensor, fn: Callable[[Tensor], Tensor], *, symmetric: bool = True,
              chunk: int = 64) -> Tensor:
        """f(K_λ) v = Q f(Λ + λ) Qᵀ v, or with ``symmetric=False`` the one-sided Q f(Λ + λ) v
        (e.g. f = x^{-1/2}: a square root S of K_λ⁻¹ with S Sᵀ = K_λ⁻¹ at half the cost), for
        v of shape (d,) or (d, k); ``chunk`` columns at a time per block (batched products
        Q_B M Q_Aᵀ on the (out, in) matrices of the columns)."""
        R = self._rows(v)
        out = torch.empty_like(R, memory_format=torch.contiguous_format)  # batched in vmap
        for b, where, (QB, QA, lam) in zip(self.blocks, self._positions(), self.spectra(),
                                           strict=True):
            F = fn(lam + self._block_damping(b)).to(R.dtype)
            for c in range(0, R.shape[0], chunk):
                M = R[c:c + chunk, where].reshape(-1, *b.shape)
                if symmetric:
                    M = _sandwich(QB.T, M, QA)                # Q_Bᵀ M Q_A
                out[c:c + chunk, where] = _sandwich(QB, F * M, QA.T).reshape(M.shape[0], -1)
        assert self.rest_index is not None and self.rest_diagonal is not None
        rest = fn(self.rest_diagonal + self._rest_damping())
        out[:, self.rest_index] = R[:, self.rest_index] * rest.to(R.dtype)
        return out.T.reshape(v.shape)

    def diagonal(self, fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """diag f(K_λ) without a d×d matrix: per block (Q_B ∘ Q_B) f(Λ + λ) (Q_A ∘ Q_A)ᵀ
        (f = identity by default)."""
        f = (lambda x: x) if fn is None else fn
        ev = self.eigenvalues()
        out = torch.empty_like(ev)
        for b, (QB, QA, lam) in zip(self.blocks, self.spectra(), strict=True):
            out[b.index] = ((QB * QB) @ f(lam + self._block_damping(b)) @ (QA * QA).T
                            ).reshape(-1)
        assert self.rest_index is not None and self.rest_diagonal is not None
        out[self.rest_index] = f(self.rest_diagonal + self._rest_damping())
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """K_λ v: B W A per K-FAC block (two matrix products), the eigenbasis for EK-FAC."""
        R = self._rows(v)
        out = torch.empty_like(R, memory_format=torch.contiguous_format)  # batched in vmap
        for b, where, (QB, QA, lam) in zip(self.blocks, self._positions(), self.spectra(),
                                           strict=True):
            M = R[:, where].reshape(-1, *b.shape)
            if b.eigenvalues is not None:
                M = _sandwich(QB, lam.to(R.dtype) * _sandwich(QB.T, M, QA), QA.T)
            else:
                M = _sandwich(b.B, M, b.A)
            out[:, where] = M.reshape(R.shape[0], -1)
        assert self.rest_index is not None and self.rest_diagonal is not None
        out[:, self.rest_index] = R[:, self.rest_index] * self.rest_diagonal.to(R.dtype)
        lam_all = self.damping
        out = out + (lam_all.to(R.dtype) if isinstance(lam_all, Tensor) else float(lam_all)) * R
        return out.T.reshape(v.shape)

    def matmat(self, V: Tensor) -> Tensor:
        """K_λ V for the columns of V (d, k)."""
        return self.matvec(V)

    def _check_invertible(self, what: str, null_rtol: float | None) -> float:
        tau = self.null_threshold(null_rtol)
        ev = self.eigenvalues()
        if bool((ev <= tau).any()):
            num = int((ev <= tau).sum())
            raise SingularMetricError(
                f"{what}: the Kronecker-factored metric is singular ({num} of {self.dim} "
                f"eigenvalues at or below {tau:.3g}). " + _DAMPING_HINT)
        return tau

    def solve(self, w: Tensor, *, pinv: bool = False, null_rtol: float | None = None) -> Tensor:
        """K_λ⁻¹ w (w of shape (d,) or (d, k)), or the pseudo-inverse K_λ⁺ w with ``pinv``."""
        if pinv:
            tau = self.null_threshold(null_rtol)
            return self.apply(w, lambda x: torch.where(x > tau, 1.0 / x, x.new_zeros(())))
        self._check_invertible("KroneckerFactored.solve", null_rtol)
        return self.apply(w, torch.reciprocal)

    def inv_sqrt(self, Z: Tensor, *, null_rtol: float | None = None) -> Tensor:
        """S Z with the symmetric S = K_λ^{-1/2} (S Sᵀ = K_λ⁻¹): N(0, I) draws to N(0, K_λ⁻¹)."""
        self._check_invertible("KroneckerFactored.inv_sqrt", null_rtol)
        return self.apply(Z, torch.rsqrt)

    def sqrt(self, Z: Tensor) -> Tensor:
        """K_λ^{1/2} Z (symmetric square root)."""
        return self.apply(Z, lambda x: x.clamp_min(0.0).sqrt())

    def logdet(self, *, pseudo: bool = False, null_rtol: float | None = None) -> Tensor:
        """log det K_λ = Σ log(eigenvalues); with ``pseudo`` the sum over the eigenvalues
        above the null threshold (the pseudo-log-determinant)."""
        ev = self.eigenvalues()
        if pseudo:
            return ev[ev > self.null_threshold(null_rtol)].log().sum()
        self._check_invertible("KroneckerFactored.logdet", null_rtol)
        return ev.log().sum()

    def trace(self) -> Tensor:
        """tr K_λ = Σ_l tr Λ_l + Σ r + Σ λ."""
        return self.eigenvalues().sum()

    def dense(self, max_dim: int | None = None) -> Tensor:
        """K_λ as a dense (d, d) matrix (small d only: ground truth for tests)."""
        check_dense_size(self.dim, "KroneckerFactored.dense", max_dim)
        ref = self.blocks[0].A if self.blocks else self.rest_diagonal
        assert ref is not None and self.rest_index is not None
        K = ref.new_zeros(self.dim, self.dim)
        for b, (QB, QA, lam) in zip(self.blocks, self.spectra(), strict=True):
            if b.eigenvalues is None:
                blk = torch.kron(b.B, b.A)
            else:
                Q = torch.kron(QB, QA)
                blk = (Q * lam.reshape(-1)) @ Q.T
            K[b.index.unsqueeze(1), b.index.unsqueeze(0)] = blk
        assert self.rest_diagonal is not None
        K[self.rest_index, self.rest_index] = self.rest_diagonal
        lam = self.damping
        return K + (torch.diag(lam) if isinstance(lam, Tensor) else float(lam) * torch.eye(
            self.dim, dtype=K.dtype, device=K.device))


class KroneckerMetric(Metric):
    """A fixed ``KroneckerFactored`` operator K as a constant metric, G(p) = K for every p.

    Products, the solve, ``inv_sqrt``, ``logdet`` and ``dense`` are the operator's closed
    forms; the point is ignored (the factors were taken at a point of their own, e.g. the
    running-average factors of ``RiemannianGD(metric="kfac")``, refreshed by the optimizer
    and not by moving p). With ``pinv=True`` the solve is the pseudo-inverse (a singular K is
    otherwise a :class:`~covariant.errors.SingularMetricError`). For K-FAC as a field that
    follows the point use :class:`~covariant.metrics.KFAC`.

    >>> import torch
    >>> K = KroneckerFactored([KroneckerBlock("w", torch.arange(2),
    ...                                        torch.eye(2, dtype=torch.float64),
    ...                                        2 * torch.eye(1, dtype=torch.float64))], 2)
    >>> KroneckerMetric(K).solve(torch.zeros(2), torch.ones(2, dtype=torch.float64))
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    is_constant = True

    def __init__(self, factors: KroneckerFactored, pinv: bool = False) -> None:
        self.factors = factors
        self.pinv = pinv

    def matvec(self, p: Tensor, v: Tensor) -> Tensor:
        return self.factors.matvec(v)

    def solve(self, p: Tensor, w: Tensor) -> Tensor:
        return self.factors.solve(w, pinv=self.pinv)

    def inv_sqrt(self, p: Tensor, Z: Tensor) -> Tensor:
        return self.factors.inv_sqrt(Z)

    def dense(self, p: Tensor, *, max_dim: int | None = None) -> Tensor:
        return self.factors.dense(max_dim=max_dim)

    def logdet(self, p: Tensor) -> Tensor:
        return self.factors.logdet()

    def closed_form_logdet(self, p: Tensor, pseudo: bool = False) -> Tensor | None:
        return self.factors.logdet(pseudo=pseudo)

    def rank(self, p: Tensor) -> int:
        return int(self.factors.rank())

    def __repr__(self) -> str:
        return f"KroneckerMetric(dim={self.factors.dim})"
