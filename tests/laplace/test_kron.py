"""laplace(..., structure="kron"): K-FAC Laplace against dense float64 truth, and its invariance.

Ground truth: the dense precision P = K + δI from the same factors (torch.kron), the dense
formula log Z = log p(D, w*) + d/2 log 2π − ½ log det P, Σ = P⁻¹, the GLM variance J Σ Jᵀ; and
the exact GGN (covariant.metrics.GGN) where K-FAC is exact (one linear layer, bias folded in).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from covariant import density as cvd
from covariant import laplace as cvl
from covariant.errors import NotAModeError, UnsupportedStructureError
from covariant.metrics import EKFAC, GGN
from covariant.metrics.kronecker import KroneckerFactored
from covariant.reparam import Scale, Sinh

from ._kron_factors import hand_kfac


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


@pytest.fixture(scope="module")
def mlp():
    """A small classifier posterior at its MAP, with hand-built K-FAC factors."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] - X[:, 1] ** 2 + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)
         > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    space, theta0 = cvl.posterior_space(model, (X, y), prior_precision=0.7)
    theta = cvd.map_estimate(space, theta0, riemannian=False).point
    for p, v in zip(model.parameters(), space.layout.unflatten(theta).values(), strict=True):
        p.data.copy_(v)
    return space, theta, X, hand_kfac(model, X, "classification")


def _dense_truth(space, theta, K, delta):
    d = theta.shape[0]
    P = K.dense() + torch.diag(torch.as_tensor(delta, dtype=torch.float64).expand(d))
    log_joint = -float(space.loss(theta))
    return log_joint + 0.5 * d * math.log(2 * math.pi) - 0.5 * float(torch.logdet(P)), P


# ------------------------------------------------------------------------------ ground truth


def test_kron_is_the_exact_ggn_laplace_for_one_linear_layer():
    """Regression with one Linear layer (bias folded in): K-FAC is exact, so the kron Laplace
    equals the full GGN Laplace; the factors equal covariant's exact GGN."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(25, 3, generator=g, dtype=torch.float64)
    y = torch.randn(25, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    space, th0 = cvl.posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.7,
                                     prior_precision=2.0)
    th = cvd.map_estimate(space, th0, riemannian=False).point
    K = hand_kfac(model, X, "regression", 0.7, joint_bias=True)
    G = GGN.from_space(space).dense(th)
    assert float((K.dense() - G).abs().max()) < 1e-12 * float(G.abs().max())
    kron = cvl.laplace(space, th, structure="kron", kfac=K)
    full = cvl.laplace(space, th, riemannian=False, hessian="ggn", structure="full")
    assert abs(kron.log_evidence - full.log_evidence) < 1e-10
    assert float((kron.covariance_operator.dense() - full.covariance).abs().max()) < 1e-14


def test_default_factors_are_covariants_kfac_of_the_likelihood():
    """laplace(..., structure="kron") builds covariant.metrics.KFAC on the posterior's
    binding: for one Linear layer with the bias folded in it is the exact GGN of
    −log p(D | w) (Gaussian likelihood: MSE(sum)/(2σ²)), so kron = full GGN Laplace."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    space, th0 = cvl.posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.4,
                                     prior_precision=1.5)
    th = cvd.map_estimate(space, th0, riemannian=False).point
    kron = cvl.laplace(space, th, structure="kron", kfac={"separate_bias": False})
    full = cvl.laplace(space, th, riemannian=False, hessian="ggn", structure="full")
    assert abs(kron.log_evidence - full.log_evidence) < 1e-10
    assert float((kron.covariance_operator.dense() - full.covariance).abs().max()) < 1e-13
    with pytest.raises(ValueError, match="must not damp"):
        cvl.laplace(space, th, structure="kron", kfac={"damping": 1.0})


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_default_factors_match_the_hand_built_ones_on_an_mlp(likelihood):
    """Type-2 K-FAC (expand, separate biases) of the summed NLL: KFAC = the hand-built
    factors (A = Σ a aᵀ/N, B = Σ Jᵀ H J), so the two evidences agree to round-off."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() if likelihood == "classification" else X[:, :2] ** 2
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    space, theta = cvl.posterior_space(model, (X, y), likelihood=likelihood, sigma_noise=0.6)
    K = hand_kfac(model, X, likelihood, 0.6)
    ours = cvl.laplace(space, theta, structure="kron")
    hand = cvl.laplace(space, theta, structure="kron", kfac=K)
    assert abs(ours.log_evidence - hand.log_evidence) < 1e-10
    P = ours.covariance_operator.precision
    assert float((P.dense() - K.with_damping(1.0).dense()).abs().max()) < 1e-12


def test_evidence_covariance_and_samples_match_dense_truth(mlp):
    space, theta, _, K = mlp
    res = cvl.laplace(space, theta, structure="kron", kfac=K)
    truth, P = _dense_truth(space, theta, K, 0.7)
    assert res.structure == "kron" and res.hessian == "ggn"
    assert abs(res.log_evidence - truth) < 1e-10
    assert abs(res.logdet_precision - float(torch.logdet(P))) < 1e-10
    Sigma = torch.linalg.inv(P)
    cov = res.covariance_operator
    # its own eigendecomposition is the one KroneckerFactored takes (same order, same values)
    assert float((cov.eigenvalues() - cov.precision.eigenvalues()).abs().max()) < 1e-12
    assert float((cov.dense() - Sigma).abs().max()) < 1e-12
    assert float((cov.diagonal() - torch.diagonal(Sigma)).abs().max()) < 1e-13  # closed form
    d = theta.shape[0]
    S = cov.sqrt_matmat(torch.eye(d, dtype=torch.float64))
    assert float((S @ S.T - Sigma).abs().max()) < 1e-12                          # S Sᵀ = Σ
    draws = res.sample(5, seed=3)
    gen = torch.Generator().manual_seed(3)     # z_i drawn one after the other (sample's rule)
    Z = torch.stack([torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(5)], 1)
    assert torch.allclose(draws, theta[None] + (S @ Z).T, rtol=0, atol=1e-12)
    assert torch.allclose(res.sample(2, seed=3), draws[:2], rtol=0, atol=1e-13)  # i: any n
    summ = res.to_dict()["covariance"]
    assert summ["kind"] == "kron" and abs(summ["trace"] - float(Sigma.trace())) < 1e-12


def test_ekfac_factors_match_dense_truth(mlp):
    """EK-FAC factors (corrected eigenvalues in the K-FAC eigenbasis) passed as ``kfac``."""
    space, theta, _, _ = mlp
    b = space.binding
    E = EKFAC(b.model, b.loss_fn, list(b.batches), list(b.weights), forward=b.forward)
    K = E.factors(theta)
    assert any(blk.eigenvalues is not None for blk in K.blocks)
    res = cvl.laplace(space, theta, structure="kron", kfac=K)
    truth, P = _dense_truth(space, theta, K, 0.7)
    assert abs(res.log_evidence - truth) < 1e-10
    assert float((res.covariance_operator.dense() - torch.linalg.inv(P)).abs().max()) < 1e-12
    assert float((res.covariance_operator.diagonal() - torch.linalg.inv(P).diagonal())
                 .abs().max()) < 1e-13


def test_invariant_equals_classic_in_the_weights_chart(mlp):
    space, theta, _, K = mlp
    a = cvl.laplace(space, theta, riemannian=True, structure="kron", kfac=K)
    b = cvl.laplace(space, theta, riemannian=False, structure="kron", kfac=K)
    assert abs(a.log_evidence - b.log_evidence) < 1e-12


def test_per_parameter_prior_constant_on_blocks(mlp):
    space, theta, _, K = mlp
    lam = torch.empty(theta.shape[0], dtype=torch.float64)
    for i, sl in enumerate(space.layout.slices.values()):
        lam[sl] = 0.5 + i                                # one value per parameter tensor
    res = cvl.laplace(space, theta, structure="kron", kfac=K, prior_precision=lam)
    s = cvl.with_prior_precision(space, lam)
    truth, _ = _dense_truth(s, theta, K, lam)
    assert abs(res.log_evidence - truth) < 1e-10
    lam[0] = 9.0                                         # not constant on the first block
    with pytest.raises(ValueError, match="constant on every Kronecker block"):
        cvl.laplace(space, theta, structure="kron", kfac=K, prior_precision=lam)


def test_glm_predictive_is_j_sigma_jt(mlp):
    space, theta, X, K = mlp
    res = cvl.laplace(space, theta, structure="kron", kfac=K)
    _, P = _dense_truth(space, theta, K, 0.7)
    fwd = space.binding.forward
    Xq = X[:4]
    J = jacrev(lambda q: fwd(q, Xq))(theta)                         # (n, C, d)
    Sf = torch.einsum("ncd,de,nke->nck", J, torch.linalg.inv(P), J)
    var = torch.diagonal(Sf, dim1=1, dim2=2)
    f = fwd(theta, Xq)
    probs = res.predictive(Xq, method="glm", link="probit")
    assert torch.allclose(probs, torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1),
                          rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ invariance

CHARTS = {
    "scale-per-layer": lambda: {"0.*": Scale(2.5), "2.weight": Scale(0.3)},
    "sinh-on-a-block": lambda: {"0.weight": Sinh(1.3, 0.8, 0.1), "2.bias": Scale(4.0)},
}


@pytest.mark.parametrize("chart", list(CHARTS))
def test_invariant_kron_is_the_same_in_a_bijective_chart(mlp, chart):
    """The invariant evidence in ψ equals the weights' chart's to 1e-10; the covariance is
    transported as a (2,0) tensor, samples map to samples, the GLM predictive is unchanged."""
    space, theta, X, K = mlp
    new = space.reparametrize(CHARTS[chart]())
    h = new.root_chart()
    psi = h.inverse(theta)
    w = cvl.laplace(space, theta, structure="kron", kfac=K)
    r = cvl.laplace(new, psi, riemannian=True, structure="kron", kfac=K)
    assert abs(r.log_evidence - w.log_evidence) < 1e-10
    Jinv = torch.linalg.inv(h.jacobian(psi))
    Sigma_psi = Jinv @ w.covariance_operator.dense() @ Jinv.T
    assert float((r.covariance_operator.dense() - Sigma_psi).abs().max()) < 1e-12
    assert float((r.covariance_operator.diagonal() - torch.diagonal(Sigma_psi)).abs().max()) \
        < 1e-12
    # the same normal draws: tangent vectors map by J⁻¹
    dv = r.sample(4, seed=7) - psi[None]
    dw = w.sample(4, seed=7) - theta[None]
    assert float((dv - dw @ Jinv.T).abs().max()) < 1e-12
    assert torch.allclose(r.predictive(X[:5]), w.predictive(X[:5]), rtol=0, atol=1e-12)
    psi_c = cvd.map_estimate(new, psi, riemannian=False).point        # the classic MAP in ψ
    naive = cvl.laplace(new, psi_c, riemannian=False, structure="full")  # exact Hessians
    classic_w = cvl.laplace(space, theta, riemannian=False, structure="full")
    if h.is_affine:  # a linear chart: the classic evidence is the same, and so is kron's
        naive = cvl.laplace(new, psi, riemannian=False, hessian="ggn", structure="full")
        classic_w = cvl.laplace(space, theta, riemannian=False, hessian="ggn", structure="full")
        assert abs(naive.log_evidence - classic_w.log_evidence) < 1e-10
        c = cvl.laplace(new, psi, riemannian=False, structure="kron", kfac=K)
        assert abs(c.log_evidence - w.log_evidence) < 1e-10
        return
    # the naive alternative: the classic evidence in ψ is another number (full GGN Laplace) …
    assert abs(naive.log_evidence - classic_w.log_evidence) > 0.1
    # … and it has no Kronecker structure: kron refuses it with a typed error
    with pytest.raises(UnsupportedStructureError, match="riemannian=True"):
        cvl.laplace(new, psi, riemannian=False, structure="kron", kfac=K)


# ------------------------------------------------------------------------------ prior selection


def test_posthoc_prior_selection_is_closed_form(mlp):
    space, theta, _, K = mlp
    grid = [0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]
    res = cvl.optimize_prior_precision(space, theta, riemannian=False, method="posthoc",
                                       grid=grid, structure="kron", kfac=K, xatol=1e-6)
    for lam, ev in zip(res.grid, res.log_evidences, strict=True):
        s = cvl.with_prior_precision(space, lam)
        assert abs(ev - _dense_truth(s, theta, K, lam)[0]) < 1e-10
        assert abs(ev - cvl.laplace(s, theta, structure="kron", kfac=K).log_evidence) < 1e-10
    # the optimum is the root of d/dδ log Z = −½‖w‖² + d/(2δ) − ½ Σ 1/(λ_i + δ)
    ev = torch.linalg.eigvalsh(K.dense())
    d, sq = theta.shape[0], float(theta @ theta)

    def deriv(lam):
        return -0.5 * sq + 0.5 * d / lam - 0.5 * float((1.0 / (ev + lam)).sum())

    from scipy.optimize import brentq

    best = brentq(deriv, grid[0], grid[-1], xtol=1e-14)
    assert res.interior and abs(math.log(res.prior_precision) - math.log(best)) < 1e-5
    assert res.info["num_evaluations"] < 60


def test_posthoc_prior_selection_is_the_same_in_a_chart(mlp):
    """The invariant kron evidence curve is chart-independent, hence so is the chosen λ."""
    space, theta, _, K = mlp
    new = space.reparametrize(CHARTS["sinh-on-a-block"]())
    psi = new.root_chart().inverse(theta)
    kw = {"method": "posthoc", "grid": [0.03, 0.3, 3.0, 30.0], "structure": "kron", "kfac": K,
          "xatol": 1e-6}
    w = cvl.optimize_prior_precision(space, theta, riemannian=True, **kw)
    r = cvl.optimize_prior_precision(new, psi, riemannian=True, **kw)
    assert max(abs(a - b) for a, b in zip(w.log_evidences, r.log_evidences, strict=True)) < 1e-10
    assert abs(w.prior_precision - r.prior_precision) < 1e-9 * w.prior_precision


def test_refit_refuses_factors_of_one_point(mlp):
    space, theta, _, K = mlp
    with pytest.raises(ValueError, match="posthoc"):
        cvl.optimize_prior_precision(space, theta, method="refit", grid=[0.1, 1.0],
                                     structure="kron", kfac=K)


# ------------------------------------------------------------------------------ errors


def test_kron_errors(mlp, problem):
    space, theta, _, K = mlp
    with pytest.raises(UnsupportedStructureError, match="model posterior"):
        cvl.laplace(problem[0], problem[1], structure="kron")
    with pytest.raises(ValueError, match="hessian must be 'ggn'"):
        cvl.laplace(space, theta, structure="kron", hessian="exact", kfac=K)
    with pytest.raises(ValueError, match="undamped"):
        cvl.laplace(space, theta, structure="kron", kfac=K.with_damping(1.0))
    small = KroneckerFactored([], 5, rest_index=torch.arange(5), rest_diagonal=torch.ones(5))
    with pytest.raises(ValueError, match="undamped"):                # another dimension
        cvl.laplace(space, theta, structure="kron", kfac=small)
    with pytest.raises(NotAModeError, match="positive prior precision"):
        lam = torch.zeros(theta.shape[0], dtype=torch.float64)
        lam[-3:] = 1.0   # only the last bias gets a prior; the rest of K is singular
        cvl.laplace(space, theta, structure="kron", kfac=K, prior_precision=lam)
    other = space.with_metric(GGN.from_space(space))
    with pytest.raises(UnsupportedStructureError, match="Euclidean"):
        cvl.laplace(other, theta, riemannian=True, structure="kron", kfac=K)
    # the classic version does not need the metric
    assert abs(cvl.laplace(other, theta, riemannian=False, structure="kron", kfac=K)
               .log_evidence - cvl.laplace(space, theta, structure="kron", kfac=K)
               .log_evidence) < 1e-12


# ------------------------------------------------------------------------------ peers


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("backend", ["BackPackGGN", "CurvlinopsGGN"])
def test_log_evidence_agrees_with_laplace_torch_kron(backend):
    """laplace-torch's ``Laplace(..., hessian_structure="kron")`` (exact type-2 K-FAC from its
    backend, prior δ added to the eigenvalues exactly) on the same classifier at the same MAP,
    with one batch of all the data: the same formula on the same factors, so the log evidence
    agrees to round-off (1e-10 absolute in float64; observed ~1e-14)."""
    pytest.importorskip("laplace")
    import laplace.curvature as lc
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import Laplace

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] - X[:, 1] ** 2 > -0.5).long() + (X[:, 2] > 0.8).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    space, th0 = cvl.posterior_space(model, (X, y), prior_precision=1.3)
    theta = cvd.map_estimate(space, th0, riemannian=False).point
    nn.utils.vector_to_parameters(theta, model.parameters())
    ours = cvl.laplace(space, theta, structure="kron").log_evidence
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                 prior_precision=1.3, backend=getattr(lc, backend))
    la.fit(DataLoader(TensorDataset(X, y), batch_size=60))
    assert abs(float(la.log_marginal_likelihood()) - ours) < 1e-10
