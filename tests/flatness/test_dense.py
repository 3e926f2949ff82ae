"""covariant.flatness.dense against a hand-built dense float64 truth in two charts.

The truth is written from the definitions, independently of the library: the Riemannian
Hessian Hess_ij = ∂_i∂_j L − Γ^k_ij ∂_k L with the Christoffel symbols of G from ``jacfwd``,
the pulled-back metric G_Ψ = Jᵀ G(h(ψ)) J of the chart, and the eigenvalues of G⁻¹Hess by a
general (non-symmetric) eigen-decomposition.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import hessian, jacfwd

import covariant as cv
from covariant.flatness import DENSE_MEASURES, StochasticOptions, generalized_eigh

MEASURES = ("trace", "logdet", "max_eig", "top_eigs")


def loss(t: torch.Tensor) -> torch.Tensor:
    """A non-quadratic loss on ℝ³ (the reference problem of docs/math.md §8, extended)."""
    x, y, z = t[0], t[1], t[2]
    return ((x**2 + 2 * y**2 - 1) ** 2 + 0.3 * torch.sin(2 * x) + 0.1 * x * y
            + 0.25 * z**4 + 0.5 * y * z**2 + 0.8 * z**2)


def metric_matrix(t: torch.Tensor) -> torch.Tensor:
    """A point-dependent SPD metric on ℝ³: G(θ) = A(θ)A(θ)ᵀ + I."""
    A = torch.stack([torch.stack([1 + t[0] ** 2, 0.3 * t[1], 0.1 * t[2]]),
                     torch.stack([torch.sin(t[0]), 1 + 0.5 * t[1] ** 2, 0.2 * t[0]]),
                     torch.stack([0.2 * t[2], 0.1 * t[0] * t[1], 1 + 0.3 * t[2] ** 2])])
    return A @ A.T + torch.eye(3, dtype=t.dtype)


THETA = torch.tensor([0.7, -0.4, 0.3], dtype=torch.float64)  # not a critical point
MIX = torch.tensor([[1.0, 0.4, 0.0], [0.0, 0.8, -0.3], [0.2, 0.0, 1.5]], dtype=torch.float64)
SHIFT = torch.tensor([-1.0, -1.5, -0.5], dtype=torch.float64)


def chart() -> cv.reparam.Reparametrization:
    """θ = MIX · exp(ψ) + SHIFT: non-linear, and mixing the coordinates."""
    return cv.reparam.Compose(cv.reparam.Affine(MIX, SHIFT), cv.reparam.Exp())


def riemannian_hessian(f, metric_fn, x: torch.Tensor) -> torch.Tensor:
    """Hess_ij = ∂_i∂_j f − Γ^k_ij ∂_k f, Γ^k_ij = ½ G^{kl}(∂_i G_lj + ∂_j G_li − ∂_l G_ij)."""
    g = jacfwd(f)(x)
    G = metric_fn(x)
    D = jacfwd(metric_fn)(x).permute(2, 0, 1)  # D[i, l, j] = ∂_i G_lj
    lowered = 0.5 * (D.permute(1, 0, 2) + D.permute(1, 2, 0) - D)  # [l, i, j]
    gamma = torch.einsum("kl,lij->kij", torch.linalg.inv(G), lowered)
    return hessian(f)(x) - torch.einsum("kij,k->ij", gamma, g)


def truth(f, metric_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues of G⁻¹Hess (descending, real), and the dense Hess and G at x."""
    H, G = riemannian_hessian(f, metric_fn, x), metric_fn(x)
    evals = torch.linalg.eigvals(torch.linalg.solve(G, H))
    assert float(evals.imag.abs().max()) < 1e-10  # similar to a symmetric matrix
    return evals.real.sort(descending=True).values, H, G


def chart_truth(naive: bool = False):
    """The truth in ψ: loss L∘h, metric Jᵀ G(h(ψ)) J, or the identity (naive)."""
    h = chart()
    psi = h.inverse(THETA)

    def pulled_back(q: torch.Tensor) -> torch.Tensor:
        J = jacfwd(h.forward)(q)
        return J.T @ metric_matrix(h.forward(q)) @ J

    def identity(q: torch.Tensor) -> torch.Tensor:
        return torch.eye(3, dtype=q.dtype) + 0.0 * q.sum()

    return psi, truth(lambda q: loss(h.forward(q)), identity if naive else pulled_back, psi)


def _check_against(report, evals, H, G, k):
    assert report["trace"].value == pytest.approx(float(evals.sum()), rel=1e-10)
    assert report["logdet"].value == pytest.approx(float(evals.abs().log().sum()), rel=1e-10)
    assert report["logdet"].info["sign"] == float(torch.prod(torch.sign(evals)))
    assert report["max_eig"].value == pytest.approx(float(evals[0]), rel=1e-10)
    assert report["top_eigs"].value == pytest.approx(evals[:k].tolist(), rel=1e-10)
    for lam, x in zip(report["top_eigs"].value, report["top_eigs"].vectors.T, strict=True):
        assert float((H @ x - lam * (G @ x)).norm()) <= 1e-10 * float((H @ x).norm())


def test_dense_flatness_equals_the_hand_built_truth_in_both_charts():
    space = cv.ParameterSpace(loss, cv.metrics.Dense(metric_matrix))
    evals, H, G = truth(loss, metric_matrix, THETA)
    assert evals[-1] < 0 < evals[0]  # an indefinite E: the sign of det matters
    report = cv.flatness(space, THETA, measures=MEASURES, k=2)
    _check_against(report, evals, H, G, 2)

    new = space.reparametrize(chart())
    psi, (evals_psi, H_psi, G_psi) = chart_truth()
    assert torch.allclose(new.chart(psi), THETA, rtol=1e-12, atol=1e-12)
    # the truth itself is invariant (a check of the hand-built formulas)
    assert torch.allclose(evals_psi, evals, rtol=1e-10, atol=0)
    inv = cv.flatness(new, psi, measures=MEASURES, k=2)
    _check_against(inv, evals_psi, H_psi, G_psi, 2)
    for m in ("trace", "logdet", "max_eig"):
        assert inv[m].value == pytest.approx(report[m].value, rel=1e-10), m


def test_naive_euclidean_in_the_second_chart_differs_visibly():
    space = cv.ParameterSpace(loss, cv.metrics.Dense(metric_matrix))
    invariant = cv.flatness(space, THETA, measures=MEASURES, k=2)
    naive_space = space.reparametrize(chart()).with_metric(cv.metrics.Euclidean())
    psi, (evals, H, G) = chart_truth(naive=True)
    naive = cv.flatness(naive_space, psi, measures=MEASURES, k=2)
    # the naive numbers are right for ∇²(L∘h) in ψ (the hand-built truth with G = I) ...
    assert torch.allclose(G, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(H, hessian(lambda q: loss(chart().forward(q)))(psi), atol=1e-12)
    _check_against(naive, evals, H, G, 2)
    # ... and far from the invariant ones
    for m in ("trace", "max_eig"):
        assert abs(naive[m].value - invariant[m].value) > 0.1 * abs(invariant[m].value), m
    assert abs(naive["logdet"].value - invariant["logdet"].value) > 0.1


def test_every_dense_measure_and_its_fields():
    space = cv.ParameterSpace(loss, cv.metrics.Dense(metric_matrix))
    evals, _, _ = truth(loss, metric_matrix, THETA)
    r = cv.flatness(space, THETA, measures=DENSE_MEASURES, k=5)
    assert list(r) == list(DENSE_MEASURES)
    sign = float(torch.prod(torch.sign(evals)))
    assert r["det"].value == pytest.approx(sign * math.exp(float(evals.abs().log().sum())),
                                           rel=1e-10)
    assert r["min_eig"].value == pytest.approx(float(evals[-1]), rel=1e-10)
    assert r["spectrum"].value == pytest.approx(evals.tolist(), rel=1e-10)
    assert r["top_eigs"].value == r["spectrum"].value  # k larger than d: every eigenvalue
    for m in r.values():  # exact values: no error fields, no products counted
        assert (m.stderr, m.residual, m.num_matvecs, m.converged, m.method) == \
            (None, None, None, True, "dense")
        assert m.info["dim"] == 3 and m.info["rank"] == 3
    assert r["logdet"].info["pseudo"] is False
    assert r.info == {"method": "dense", "metric": repr(space.metric), "dim": 3}


def test_weight_norm_chart_gives_the_pseudo_determinant_on_the_horizontal_space():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def quartic(w: torch.Tensor) -> torch.Tensor:
        M = w.reshape(2, 3)
        return ((M - W) ** 2).sum() + 0.3 * (M**2).sum() ** 2

    space = cv.ParameterSpace(quartic)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    wn = space.reparametrize(cv.reparam.WeightNorm((2, 3)))
    psi = wn.chart.inverse(w)
    ref = cv.flatness(space, w, measures=("trace", "logdet", "spectrum"))
    r = cv.flatness(wn, psi, measures=("trace", "logdet", "spectrum"))
    assert r["trace"].info["dim"] == 8 and r["trace"].info["rank"] == 6  # two gauge directions
    assert r["logdet"].info["pseudo"] is True
    assert r["spectrum"].value == pytest.approx(ref["spectrum"].value, rel=1e-10)
    assert r["logdet"].value == pytest.approx(ref["logdet"].value, rel=1e-10)


def test_generalized_eigh_solves_the_pencil():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 4, generator=g, dtype=torch.float64)
    H, G = X + X.T, X @ X.T + torch.eye(4, dtype=torch.float64)
    evals, V = generalized_eigh(H, G)
    assert torch.allclose(H @ V, G @ V * evals, atol=1e-10)
    assert torch.allclose(V.T @ G @ V, torch.eye(4, dtype=torch.float64), atol=1e-10)
    want = torch.linalg.eigvals(torch.linalg.solve(G, H)).real.sort().values
    assert torch.allclose(evals, want, rtol=1e-10, atol=1e-12)


def test_unknown_dense_measure_and_stochastic_only_keywords():
    space = cv.ParameterSpace(loss)
    with pytest.raises(ValueError, match="dense measures"):
        cv.flatness(space, THETA, measures=("spectral_density",))
    with pytest.raises(TypeError, match="method='dense'"):
        cv.flatness(space, THETA, measures=("trace",), slq_steps=3)
    with pytest.raises(TypeError, match="method='dense'"):
        cv.flatness(space, THETA, measures=("trace",), options=StochasticOptions())
    # the settings shared with the stochastic method are accepted and ignored
    r = cv.flatness(space, THETA, measures=("trace",), num_probes=3, seed=4, progress=False)
    assert r["trace"].value == cv.flatness(space, THETA, measures=("trace",))["trace"].value


# ---------------------------------------------------------------- hardened inputs (issue 10)
@pytest.mark.parametrize("method", ["dense", "stochastic"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_value_is_refused(method, bad):
    """log(p) at p < 0 is NaN while its derivatives are finite: the value itself is checked."""
    space = cv.ParameterSpace(lambda p: torch.log(p).sum() + (p**2).sum())
    p = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    if bad == float("inf"):
        space = cv.ParameterSpace(lambda p: (p**2).sum() / (p[0] - 1.0) ** 2)
        p = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(cv.errors.NonFiniteError, match="the loss at p is"):
        cv.flatness(space, p, measures=("trace",), method=method, num_probes=4)


@pytest.mark.parametrize("method", ["dense", "stochastic"])
@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_k_below_one_is_refused(method, k):
    space = cv.ParameterSpace(loss)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        cv.flatness(space, THETA, measures=("top_eigs",), k=k, method=method)


def test_top_eigs_cap_at_the_dimension_is_recorded():
    space = cv.ParameterSpace(lambda p: (torch.arange(1.0, 4.0, dtype=p.dtype) * p**2).sum())
    p = torch.ones(3, dtype=torch.float64)
    m = cv.flatness(space, p, measures=("top_eigs",), k=5)["top_eigs"]
    assert m.value == pytest.approx([6.0, 4.0, 2.0], abs=1e-12)
    assert (m.info["k_requested"], m.info["k"]) == (5, 3)
    assert "k_requested" not in cv.flatness(space, p, measures=("top_eigs",), k=2)[
        "top_eigs"].info


def test_det_beyond_the_float_range_is_inf_or_zero_with_a_flag():
    p = torch.ones(200, dtype=torch.float64)
    big = cv.flatness(cv.ParameterSpace(lambda q: 500 * (q**2).sum()), p, measures=("det",))
    assert big["det"].value == math.inf and big["det"].info["overflow"]
    assert big["det"].info["log_abs_det"] == pytest.approx(200 * math.log(1000.0), rel=1e-12)
    small = cv.flatness(cv.ParameterSpace(lambda q: 1e-3 * (q**2).sum()), p, measures=("det",))
    assert small["det"].value == 0.0 and small["det"].info["underflow"]
    neg = cv.flatness(cv.ParameterSpace(lambda q: -500 * (q**2).sum()), p[:151],
                      measures=("det",))
    assert neg["det"].value == -math.inf and neg["det"].info["sign"] == -1.0
    ok = cv.flatness(cv.ParameterSpace(loss), THETA, measures=("det", "logdet"))
    assert not ok["det"].info["overflow"] and not ok["det"].info["underflow"]
    assert ok["det"].value == pytest.approx(math.exp(ok["logdet"].value) * ok["det"].info["sign"])


def test_integer_point_is_refused():
    space = cv.ParameterSpace(lambda p: (p**2).sum())
    with pytest.raises(cv.errors.ShapeMismatchError, match=r"use p.double\(\) or p.float\(\)"):
        cv.flatness(space, torch.ones(3, dtype=torch.long), measures=("trace",))
