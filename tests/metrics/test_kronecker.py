"""KroneckerFactored against its dense matrix (float64 ground truth: torch.kron)."""

from __future__ import annotations

import pytest
import torch

from covariant.errors import ShapeMismatchError, SingularMetricError
from covariant.metrics.kronecker import KroneckerBlock, KroneckerFactored

D = torch.float64


def _spd(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    X = torch.randn(n, rank or n + 2, generator=gen, dtype=D)
    return X @ X.T / X.shape[1]


def _operator(ekfac: bool = False, damping: float | torch.Tensor = 0.0,
              singular: bool = False) -> KroneckerFactored:
    """Two blocks (3×4 and 2×1) and a rest of 3, interleaved in a 17-dimensional point."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(17, generator=gen)
    b1 = KroneckerBlock("l1.weight", perm[:12], _spd(4, gen), _spd(3, gen, 2 if singular else None))
    eig = torch.rand(2, 1, generator=gen, dtype=D) + 0.5 if ekfac else None
    b2 = KroneckerBlock("l2.weight", perm[12:14], _spd(1, gen), _spd(2, gen), eig)
    rest = torch.rand(3, generator=gen, dtype=D) + 0.1
    return KroneckerFactored([b1, b2], 17, perm[14:], rest, damping)


def _dense_truth(K: KroneckerFactored) -> torch.Tensor:
    """The matrix assembled independently: kron per block (EK-FAC from its eigenbasis)."""
    G = torch.zeros(K.dim, K.dim, dtype=D)
    for b in K.blocks:
        if b.eigenvalues is None:
            blk = torch.kron(b.B, b.A)
        else:
            _, QA = torch.linalg.eigh(b.A)
            _, QB = torch.linalg.eigh(b.B)
            Q = torch.kron(QB, QA)
            blk = Q @ torch.diag(b.eigenvalues.reshape(-1)) @ Q.T
        for i, gi in enumerate(b.index.tolist()):
            for j, gj in enumerate(b.index.tolist()):
                G[gi, gj] = blk[i, j]
    for i, r in zip(K.rest_index.tolist(), K.rest_diagonal.tolist(), strict=True):
        G[i, i] = r
    lam = K.damping
    eye = torch.eye(K.dim, dtype=D)
    return G + (torch.diag(lam) if isinstance(lam, torch.Tensor) else lam * eye)


@pytest.mark.parametrize("ekfac", [False, True])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_products_against_dense(ekfac: bool, damping: float) -> None:
    K = _operator(ekfac, damping)
    G = _dense_truth(K)
    assert torch.allclose(K.dense(), G, atol=1e-13)
    V = torch.randn(17, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(K.matvec(V), G @ V, atol=1e-12)
    assert torch.allclose(K.matvec(V[:, 0]), G @ V[:, 0], atol=1e-12)
    assert torch.allclose(K.solve(V), torch.linalg.solve(G, V), rtol=1e-9, atol=1e-10)
    S = K.inv_sqrt(torch.eye(17, dtype=D))
    assert torch.allclose(S @ S.T, torch.linalg.inv(G), rtol=1e-9, atol=1e-10)
    R = K.sqrt(torch.eye(17, dtype=D))
    assert torch.allclose(R @ R, G, atol=1e-11)
    assert torch.allclose(K.logdet(), torch.logdet(G), rtol=1e-12)
    assert torch.allclose(K.trace(), torch.trace(G), rtol=1e-12)
    assert torch.allclose(K.eigenvalues().sort().values, torch.linalg.eigvalsh(G), atol=1e-12)


def test_per_block_damping_tensor() -> None:
    base = _operator()
    lam = torch.zeros(17, dtype=D)
    lam[base.blocks[0].index] = 0.5
    lam[base.blocks[1].index] = 2.0
    lam[base.rest_index] = torch.tensor([0.1, 0.2, 0.3], dtype=D)  # the rest may vary freely
    K = base.with_damping(lam)
    G = _dense_truth(K)
    v = torch.randn(17, dtype=D)
    assert torch.allclose(K.solve(v), torch.linalg.solve(G, v), atol=1e-10)
    assert torch.allclose(K.logdet(), torch.logdet(G), rtol=1e-12)
    bad = lam.clone()
    bad[base.blocks[0].index[0]] = 0.7
    with pytest.raises(ValueError, match="constant on block"):
        base.with_damping(bad)


def test_singular_refuses_unless_pinv() -> None:
    K = _operator(singular=True)          # B of rank 2 in a 3×3 factor: 4 null directions
    G = _dense_truth(K)
    assert K.rank() == 17 - 4
    assert int(torch.linalg.matrix_rank(G)) == 13
    with pytest.raises(SingularMetricError, match="damping"):
        K.solve(torch.ones(17, dtype=D))
    with pytest.raises(SingularMetricError):
        K.logdet()
    w = G @ torch.randn(17, dtype=D)      # in the range: the pseudo-inverse solves it
    x = K.solve(w, pinv=True)
    assert torch.allclose(x, torch.linalg.pinv(G, hermitian=True) @ w, atol=1e-9)
    ev = torch.linalg.eigvalsh(G)
    truth = ev[ev > 1e-10 * ev.max()].log().sum()
    assert torch.allclose(K.logdet(pseudo=True), truth, rtol=1e-10)
    # damping makes it regular, exactly K + λI
    Kd = K.with_damping(1e-3)
    assert torch.allclose(Kd.logdet(), torch.logdet(G + 1e-3 * torch.eye(17, dtype=D)),
                          rtol=1e-10)


def test_scaled_and_averaged() -> None:
    K1, K2 = _operator(True, 0.2), _operator(True, 0.2)
    K2 = KroneckerFactored(
        [KroneckerBlock(b.name, b.index, 2 * b.A + torch.eye(b.A.shape[0], dtype=D), b.B,
                        None if b.eigenvalues is None else b.eigenvalues + 1) for b in K2.blocks],
        17, K2.rest_index, K2.rest_diagonal * 3, 0.4)
    assert torch.allclose(K1.scaled(2.5).dense(), 2.5 * _dense_truth(K1), atol=1e-12)
    avg = K1.averaged(K2, 0.25)
    for a, b, c in zip(K1.blocks, K2.blocks, avg.blocks, strict=True):
        assert torch.allclose(c.A, 0.25 * a.A + 0.75 * b.A)
        assert torch.allclose(c.B, 0.25 * a.B + 0.75 * b.B)
    assert torch.allclose(avg.rest_diagonal, 0.25 * K1.rest_diagonal + 0.75 * K2.rest_diagonal)
    assert avg.damping == 0.4
    with pytest.raises(ValueError, match="decay"):
        K1.averaged(K2, 1.5)


def test_bad_layouts_raise() -> None:
    gen = torch.Generator().manual_seed(0)
    A, B = _spd(2, gen), _spd(2, gen)
    with pytest.raises(ShapeMismatchError, match="index"):
        KroneckerBlock("w", torch.arange(3), A, B)
    blk = KroneckerBlock("w", torch.arange(4), A, B)
    with pytest.raises(ShapeMismatchError, match="exactly once"):   # coordinate 4 uncovered
        KroneckerFactored([blk], 5)
    with pytest.raises(ShapeMismatchError, match="exactly once"):   # coordinate 3 twice
        KroneckerFactored([blk], 5, torch.tensor([3, 4]), torch.ones(2, dtype=D))
    K = KroneckerFactored([blk], 4)
    with pytest.raises(ShapeMismatchError, match="expected a vector"):
        K.solve(torch.ones(5, dtype=D))
    with pytest.raises(ValueError, match="damping"):
        K.with_damping(-1.0)


@pytest.mark.parametrize("ekfac", [False, True])
def test_diagonal_and_one_sided_root(ekfac: bool) -> None:
    K = _operator(ekfac, 0.3)
    G = _dense_truth(K)
    Ginv = torch.linalg.inv(G)
    assert torch.allclose(K.diagonal(), torch.diagonal(G), atol=1e-13)
    assert torch.allclose(K.diagonal(torch.reciprocal), torch.diagonal(Ginv), atol=1e-12)
    S = K.apply(torch.eye(17, dtype=D), torch.rsqrt, symmetric=False, chunk=5)
    assert torch.allclose(S @ S.T, Ginv, atol=1e-12)          # S Sᵀ = K⁻¹ ...
    assert not torch.allclose(S, S.T, atol=1e-6)              # ... though S is not symmetric
    F = K.apply(torch.eye(17, dtype=D), torch.exp, chunk=3)   # any function of K
    assert torch.allclose(F, torch.linalg.matrix_exp(G), rtol=1e-10, atol=1e-10)
