"""Rank statistics of the generalization study against scipy and hand-computed examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from covariant.experiments.generalization.statistics import (
    bootstrap_ci,
    granulated_tau,
    kendall_tau,
    pgdl_score,
)


@pytest.mark.parametrize("n", [2, 3, 7, 40, 150])
@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_equals_scipy(n, ties):
    rng = np.random.default_rng(n + 100 * ties)
    for _ in range(5):
        x, y = rng.normal(size=n), rng.normal(size=n)
        if ties:  # many ties in both
            x, y = np.round(2 * x), np.round(y)
        ref = stats.kendalltau(x, y).statistic
        got = kendall_tau(x, y)
        if math.isnan(ref):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(ref, abs=1e-13)


def test_kendall_tau_hand_example_with_ties():
    # x = (1, 1, 2, 3), y = (1, 2, 2, 3). Pairs (i<j), sign(dx)·sign(dy):
    # (0,1): 0·(−1)=0 (tie in x), (0,2): (−1)(−1)=1, (0,3): 1, (1,2): (−1)·0=0 (tie in y),
    # (1,3): 1, (2,3): 1  → numerator 4; pairs untied in x: 5, in y: 5 → τ_b = 4/√25 = 0.8
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8, abs=1e-15)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # constant x: undefined
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 2, 3])


def test_granulated_tau_hand_example():
    # models (lr, wd, seed): (1,1,0) (2,1,0) (3,1,0) (1,2,0); measure 1..4; gap (3,1,2,5)
    # ψ_lr: groups by (wd, seed): wd=1 → models 0,1,2: m = (1,2,3), g = (3,1,2):
    #   pairs (0,1): (−)(+) = −1, (0,2): (−)(+) = −1, (1,2): (−)(−) = +1 → τ = −1/3;
    #   wd=2 → model 3 alone (skipped). ψ_lr = −1/3.
    # ψ_wd: groups by (lr, seed): lr=1 → models 0,3: m 1<4, g 3<5 → τ = 1; others alone → 1.
    # ψ_seed: every group by (lr, wd) has one model → NaN, left out of Ψ.
    # Ψ = (−1/3 + 1) / 2 = 1/3.
    hp = [{"lr": 1, "wd": 1, "seed": 0}, {"lr": 2, "wd": 1, "seed": 0},
          {"lr": 3, "wd": 1, "seed": 0}, {"lr": 1, "wd": 2, "seed": 0}]
    out = granulated_tau([1, 2, 3, 4], [3, 1, 2, 5], hp, ["lr", "wd", "seed"])
    assert out["lr"] == pytest.approx(-1 / 3, abs=1e-15)
    assert out["wd"] == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(out["seed"])
    assert out["Psi"] == pytest.approx(1 / 3, abs=1e-15)


def test_granulated_tau_differs_from_plain_tau():
    # a measure that tracks the gap within each lr group, while lr shifts the gap: plain τ
    # over all models is diluted, ψ_seed (only the seed varies within groups) is 1
    hp = [{"lr": lr, "seed": s} for lr in (0, 1) for s in (0, 1, 2)]
    gap = np.array([10, 11, 12, 0, 1, 2], dtype=float)
    measure = np.array([0, 1, 2, 3, 4, 5], dtype=float)
    out = granulated_tau(measure, gap, hp, ["lr", "seed"])
    assert out["seed"] == 1.0
    assert out["lr"] == -1.0  # across lr, the measure goes up as the gap goes down
    assert out["Psi"] == 0.0
    assert kendall_tau(measure, gap) == pytest.approx(-0.2, abs=1e-15)


def test_pgdl_score_hand_example_one_cell():
    # one axis, all models in one cell; 6 ordered pairs, (V_g, V_μ) = ([g_i>g_j], [m_i>m_j]):
    # gap (1,2,3), measure (1,3,2): (0,1)→(0,0) (1,0)→(1,1) (0,2)→(0,0) (2,0)→(1,1)
    # (1,2)→(0,1) (2,1)→(1,0). Table [[2,1],[1,2]], marginals ½, ½:
    # I = 2·(2/6)·log2((2/6)/(1/4)) + 2·(1/6)·log2((1/6)/(1/4)) = ⅔ log2(4/3) + ⅓ log2(2/3)
    # H(V_g) = 1 bit → score = I.
    hp = [{"lr": 1}] * 3
    expected = 2 / 3 * math.log2(4 / 3) + 1 / 3 * math.log2(2 / 3)
    out = pgdl_score([1, 3, 2], [1, 2, 3], hp, ["lr"])
    assert out["score"] == pytest.approx(expected, abs=1e-14)
    assert expected == pytest.approx(0.0817042, abs=1e-7)


def test_pgdl_score_hand_example_cells():
    # axis lr = (1,1,2,2), gap (1,2,3,4), measure (1,2,4,3). Cells (lr_i, lr_j):
    # (1,1): pairs (0,1)→(0,0), (1,0)→(1,1): I = 1 bit, H = 1
    # (2,2): (2,3)→(0,1), (3,2)→(1,0): I = 1 bit (MI counts a reversed order too), H = 1
    # (1,2): every V_g = 0 → H = 0, I = 0;  (2,1): every V_g = 1 → H = 0, I = 0
    # mean I / mean H = (2/4) / (2/4) = 1
    out = pgdl_score([1, 2, 4, 3], [1, 2, 3, 4], [{"lr": v} for v in (1, 1, 2, 2)], ["lr"])
    assert out["score"] == pytest.approx(1.0, abs=1e-14)
    # the gap fully explained by lr: every cell has H = 0 → undefined
    out = pgdl_score([1, 2, 3, 4], [0, 0, 1, 1], [{"lr": v} for v in (1, 1, 2, 2)], ["lr"])
    assert math.isnan(out["score"])


def _reference_ratio(m, g, hp, subset):
    """Brute force: I = H(V_g) + H(V_μ) − H(V_g, V_μ) per cell, from explicit pair lists."""
    def h(labels):
        _, counts = np.unique(np.asarray(labels), axis=0, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum())

    cells = {}
    for i, j in itertools.permutations(range(len(m)), 2):
        key = tuple((hp[i][a], hp[j][a]) for a in subset)
        cells.setdefault(key, []).append((int(g[i] > g[j]), int(m[i] > m[j])))
    mis, hs = [], []
    for obs in cells.values():
        vg, vm = [o[0] for o in obs], [o[1] for o in obs]
        mis.append(h(vg) + h(vm) - h(obs))
        hs.append(h(vg))
    return np.mean(mis) / np.mean(hs)


def test_pgdl_score_against_brute_force_min_over_pairs():
    rng = np.random.default_rng(3)
    hp = [{"a": a, "b": b, "c": c} for a in (0, 1) for b in (0, 1, 2) for c in (0, 1)
          for _ in range(2)]
    gap = np.array([h["a"] + 0.5 * h["b"] for h in hp]) + 0.3 * rng.normal(size=len(hp))
    measure = gap + 0.5 * rng.normal(size=len(hp))
    out = pgdl_score(measure, gap, hp, ["a", "b", "c"])
    ref = {f"{x}|{y}": _reference_ratio(measure, gap, hp, (x, y))
           for x, y in [("a", "b"), ("a", "c"), ("b", "c")]}
    assert set(out["pairs"]) == set(ref)
    for key, val in ref.items():
        assert out["pairs"][key] == pytest.approx(val, abs=1e-12)
    assert out["score"] == pytest.approx(min(ref.values()), abs=1e-12)
    # a perfect measure scores 1 under every conditioning; noise lowers it
    assert pgdl_score(gap, gap, hp, ["a", "b", "c"])["score"] == pytest.approx(1.0, abs=1e-12)
    assert out["score"] < 0.9


def test_bootstrap_resamples_rows_jointly():
    x = np.arange(30.0)
    lo, hi = bootstrap_ci(kendall_tau, x, 2 * x + 1, n_boot=200, seed=1)
    assert (lo, hi) == (1.0, 1.0)  # resampled independently, τ would drop to ≈ 0
    again = bootstrap_ci(kendall_tau, x, np.sin(x), n_boot=200, seed=1)
    assert again == bootstrap_ci(kendall_tau, x, np.sin(x), n_boot=200, seed=1)


def test_bootstrap_mean_matches_the_normal_interval():
    # the bootstrap distribution of a mean has sd s/√n (s with ddof=0); its 95% percentile
    # interval is mean ± 1.96 s/√n up to Monte-Carlo error of the 4000 replicates
    x = np.random.default_rng(0).normal(size=400)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=4000, seed=0)
    half = 1.959964 * x.std() / math.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.05)
    assert (hi + lo) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def test_bootstrap_with_hyperparameter_rows():
    hp = [{"lr": lr, "seed": s} for lr in (0, 1) for s in range(5)]
    gap = np.array([h["seed"] + 0.1 * h["lr"] for h in hp])

    def psi(m, g, h):
        return granulated_tau(m, g, h, ["lr", "seed"])["Psi"]

    lo, hi = bootstrap_ci(psi, gap, gap, hp, n_boot=100, seed=0)
    assert (lo, hi) == (1.0, 1.0)
