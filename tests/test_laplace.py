"""Laplace: classic vs invariant evidence, covariance, GGN, predictives, prior selection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import density as cvd
from covariant import laplace as cvl
from covariant.errors import DenseTooLargeError, NotABijectionError
from covariant.metrics import Euclidean, Pullback
from covariant.reparam import Affine, Compose, Sinh, WeightNorm


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def _log_joint(theta):
    """A non-Gaussian 2-D log joint (unnormalized), so that chart effects are visible."""
    m = _t([0.8, -0.3])
    P = _t([[2.0, 0.6], [0.6, 1.5]])
    d = theta - m
    return -0.5 * d @ P @ d - 0.1 * (theta**4).sum() + 0.3 * torch.sin(theta[0]) + 1.7


CHARTS = {
    "sinh": lambda: Sinh(_t([0.9, 1.3]), _t([1.2, 0.8]), _t([0.1, -0.2])),
    "affine∘sinh": lambda: Compose(Affine(_t([[1.0, 0.4], [-0.3, 1.2]]), _t([0.2, 0.1])),
                                   Sinh(0.8, 1.1)),
}


@pytest.fixture(scope="module")
def problem():
    space = cv.ParameterSpace.from_log_prob(_log_joint)
    theta = cvd.map_estimate(space, _t([0.5, 0.0]), riemannian=False).point
    return space, theta


@pytest.fixture(scope="module")
def model_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.7 * torch.randn(30, generator=g, dtype=torch.float64)
         > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    space, theta0 = cvl.posterior_space(model, (X, y), prior_precision=1.0)
    theta = cvd.map_estimate(space, theta0, riemannian=False).point
    return space, theta, X


def _in_chart(space, theta, h, riemannian):
    new = space.reparametrize(h)
    psi = cvd.map_estimate(new, h.inverse(theta), riemannian=riemannian).point
    return new, psi


# ------------------------------------------------------------------------------ evidence


def test_classic_evidence_equals_a_dense_hand_computation(problem):
    space, theta = problem
    res = cvl.laplace(space, theta, riemannian=False)
    H = torch.autograd.functional.hessian(lambda t: -_log_joint(t), theta)
    hand = float(_log_joint(theta)) + math.log(2 * math.pi) - 0.5 * float(torch.logdet(H))
    assert abs(res.log_evidence - hand) < 1e-12
    assert torch.allclose(res.covariance, torch.linalg.inv(H), atol=1e-12)
    # G = I in θ: the invariant formula is the classic one there
    assert abs(cvl.laplace(space, theta, riemannian=True).log_evidence - hand) < 1e-12
    # and it is an approximation of the true log Z, which a 2-D quadrature gives
    a = torch.linspace(-6, 6, 801, dtype=torch.float64)
    A, B = torch.meshgrid(a, a, indexing="ij")
    vals = torch.func.vmap(_log_joint)(torch.stack([A.reshape(-1), B.reshape(-1)], 1))
    exact = float(torch.logsumexp(vals, 0)) + 2 * math.log(float(a[1] - a[0]))
    assert abs(res.log_evidence - exact) < 0.1


def test_laplace_is_exact_for_a_gaussian():
    P = _t([[3.0, 1.0], [1.0, 2.0]])
    log_z = 0.7

    def log_joint(t):
        return log_z - 0.5 * t @ P @ t + 0.5 * torch.logdet(P) - math.log(2 * math.pi)

    space = cv.ParameterSpace.from_log_prob(log_joint)
    assert abs(cvl.laplace(space, _t([0.0, 0.0]), riemannian=False).log_evidence - log_z) < 1e-12


@pytest.mark.parametrize("name", list(CHARTS))
def test_invariant_evidence_is_the_same_in_every_chart_classic_is_not(problem, name):
    space, theta = problem
    ref = cvl.laplace(space, theta, riemannian=True).log_evidence
    h = CHARTS[name]()
    new, psi = _in_chart(space, theta, h, riemannian=True)
    inv = cvl.laplace(new, psi, riemannian=True).log_evidence
    assert abs(inv - ref) < 1e-8 * max(1.0, abs(ref))
    new, psi_c = _in_chart(space, theta, h, riemannian=False)
    classic = cvl.laplace(new, psi_c, riemannian=False).log_evidence
    assert abs(classic - ref) > 1e-3


def test_invariant_evidence_at_the_wrong_point_still_transforms_as_a_scalar(problem):
    """Every term of the invariant formula is invariant at any point, not only at the mode."""
    space, theta = problem
    p = theta + _t([0.05, -0.04])
    ref = cvl.laplace(space, p, riemannian=True)
    h = CHARTS["affine∘sinh"]()
    new = space.reparametrize(h)
    res = cvl.laplace(new, h.inverse(p), riemannian=True)
    assert ref.info["grad_norm"] > 1e-2
    assert abs(res.log_evidence - ref.log_evidence) < 1e-8


def test_covariance_is_a_20_tensor(problem):
    space, theta = problem
    sig_theta = cvl.laplace(space, theta, riemannian=True).covariance
    h = CHARTS["affine∘sinh"]()
    new, psi = _in_chart(space, theta, h, riemannian=True)
    res = cvl.laplace(new, psi, riemannian=True)
    J = h.jacobian(psi)
    expected = torch.linalg.solve(J, torch.linalg.solve(J, sig_theta).T)  # J⁻¹ Σ J⁻ᵀ
    assert torch.allclose(res.covariance, expected, rtol=1e-8, atol=1e-12)
    # the classic one (at the classic MAP, with the Euclidean Hessian) is not
    new_c, psi_c = _in_chart(space, theta, h, riemannian=False)
    sig_c = cvl.laplace(new_c, psi_c, riemannian=False).covariance
    Jc = h.jacobian(psi_c)
    mapped = Jc @ sig_c @ Jc.T
    assert float((mapped - sig_theta).abs().max()) > 1e-3


def test_structures_diag_and_lowrank(problem):
    space, theta = problem
    full = cvl.laplace(space, theta, riemannian=False)
    H = full.precision
    diag = cvl.laplace(space, theta, riemannian=False, structure="diag")
    hand = float(_log_joint(theta)) + math.log(2 * math.pi) - 0.5 * float(
        torch.diagonal(H).log().sum())
    assert abs(diag.log_evidence - hand) < 1e-10
    assert torch.allclose(diag.covariance.dense(), torch.diag(1 / torch.diagonal(H)))
    # rank d: the low-rank structure is exact, also for the invariant version in a chart
    lr = cvl.laplace(space, theta, riemannian=False, structure="lowrank", rank=2)
    assert abs(lr.log_evidence - full.log_evidence) < 1e-9
    assert torch.allclose(lr.covariance.dense(), full.covariance, atol=1e-9)
    h = CHARTS["sinh"]()
    new, psi = _in_chart(space, theta, h, riemannian=True)
    lr_psi = cvl.laplace(new, psi, riemannian=True, structure="lowrank", rank=2)
    assert abs(lr_psi.log_evidence - full.log_evidence) < 1e-8
    # rank 1 with a floor: Σ log λ_1 + log λ₀
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    r1 = cvl.laplace(space, theta, riemannian=False, structure="lowrank", rank=1,
                     lowrank_floor=0.5)
    expected = float(_log_joint(theta)) + math.log(2 * math.pi) - 0.5 * (
        math.log(lam_max) + math.log(0.5))
    assert abs(r1.log_evidence - expected) < 1e-8


def test_samples_have_the_covariance(problem):
    space, theta = problem
    for structure in ("full", "diag", "lowrank"):
        res = cvl.laplace(space, theta, riemannian=False, structure=structure, rank=1,
                          lowrank_floor=1.0)
        S = res.sample(4000, seed=1)
        assert S.shape == (4000, 2)
        cov = res.covariance if isinstance(res.covariance, torch.Tensor) else \
            res.covariance.dense()
        assert torch.allclose(S.mean(0), theta, atol=0.05)
        assert float((torch.cov(S.T) - cov).abs().max() / cov.abs().max()) < 0.1


# ------------------------------------------------------------------------------ models


def test_ggn_equals_a_hand_computation(model_problem):
    space, theta, X = model_problem
    res = cvl.laplace(space, theta, riemannian=False, hessian="ggn")
    bayes = cvl._bayes_of(space)
    J = torch.func.jacrev(lambda p: bayes.forward(p, X))(theta)          # (n, C, d)
    pr = torch.softmax(bayes.forward(theta, X), -1)
    L = torch.diag_embed(pr) - pr[:, :, None] * pr[:, None, :]
    ggn = torch.einsum("ncd,nce,nek->dk", J, L, J) + torch.eye(theta.shape[0])
    assert torch.allclose(res.precision, ggn, atol=1e-10)
    log_joint = -float(space.loss(theta))
    d = theta.shape[0]
    hand = log_joint + 0.5 * d * math.log(2 * math.pi) - 0.5 * float(torch.logdet(ggn))
    assert abs(res.log_evidence - hand) < 1e-9
    diag = cvl.laplace(space, theta, riemannian=False, hessian="ggn", structure="diag")
    assert torch.allclose(diag.covariance.precision_diag, torch.diagonal(ggn), atol=1e-10)


def test_model_evidence_and_glm_predictive_are_invariant(model_problem):
    space, theta, X = model_problem
    ref = cvl.laplace(space, theta, riemannian=True)
    ref_ggn = cvl.laplace(space, theta, riemannian=True, hessian="ggn")
    d = theta.shape[0]
    h = Sinh(torch.linspace(0.5, 1.2, d, dtype=torch.float64), 1.1, 0.05)
    new, psi = _in_chart(space, theta, h, riemannian=True)
    res = cvl.laplace(new, psi, riemannian=True)
    res_ggn = cvl.laplace(new, psi, riemannian=True, hessian="ggn")
    assert abs(res.log_evidence - ref.log_evidence) < 1e-8 * abs(ref.log_evidence)
    assert abs(res_ggn.log_evidence - ref_ggn.log_evidence) < 1e-8 * abs(ref.log_evidence)
    p_ref = ref.predictive(X[:6])
    p_new = res.predictive(X[:6])
    assert torch.allclose(p_new, p_ref, atol=1e-9)
    assert torch.allclose(p_new.sum(1), torch.ones(6, dtype=torch.float64))
    # the classic version in the same chart differs
    new_c, psi_c = _in_chart(space, theta, h, riemannian=False)
    classic = cvl.laplace(new_c, psi_c, riemannian=False)
    assert abs(classic.log_evidence - ref.log_evidence) > 1e-3
    assert float((classic.predictive(X[:6]) - p_ref).abs().max()) > 1e-4
    # the MC predictive averages the likelihood over posterior draws
    mc = ref.predictive(X[:6], method="mc", n_samples=50, seed=4)
    draws = ref.sample(50, seed=4)
    bayes = cvl._bayes_of(space)
    manual = torch.stack([torch.softmax(bayes.forward(q, X[:6]), -1) for q in draws]).mean(0)
    assert torch.allclose(mc, manual, atol=1e-12)


def test_mc_and_glm_predictives_agree_for_a_linear_model():
    """For a model linear in its parameters the GLM is exact: MC over parameters = MC over
    Gaussian logits (link="mc"), up to Monte Carlo error; probit is an approximation of it."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.8 * torch.randn(40, generator=g, dtype=torch.float64) > 0).long()
    model = nn.Linear(2, 2).double()
    space, theta0 = cvl.posterior_space(model, (X, y), prior_precision=1.0)
    theta = cvd.map_estimate(space, theta0, riemannian=False).point
    res = cvl.laplace(space, theta, riemannian=False)
    mc = res.predictive(X[:8], method="mc", n_samples=4000, seed=0)
    glm_mc = res.predictive(X[:8], link="mc", n_samples=4000, seed=1)
    probit = res.predictive(X[:8])
    assert float((mc - glm_mc).abs().max()) < 0.03
    assert float((probit - glm_mc).abs().max()) < 0.06
    mean, var = cvl.laplace(*_regression_problem(), riemannian=False).predictive(X[:3, :1])
    assert mean.shape == (3, 1) and bool((var > 0.25 - 1e-12).all())


def _regression_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(25, 1, generator=g, dtype=torch.float64)
    y = 0.8 * X + 0.5 * torch.randn(25, 1, generator=g, dtype=torch.float64)
    space, theta0 = cvl.posterior_space(nn.Linear(1, 1).double(), (X, y),
                                        likelihood="regression", sigma_noise=0.5)
    return space, cvd.map_estimate(space, theta0, riemannian=False).point


def test_prior_precision_argument_and_with_prior_precision(model_problem):
    space, theta, _ = model_problem
    bayes = cvl._bayes_of(space)
    space3, _ = cvl.posterior_space(bayes.model, (bayes.X, bayes.y), prior_precision=3.0)
    a = cvl.laplace(space, theta, riemannian=False, prior_precision=3.0).log_evidence
    b = cvl.laplace(space3, theta, riemannian=False).log_evidence
    assert abs(a - b) < 1e-10


def test_prior_selection_classic_depends_on_the_chart_invariant_does_not(model_problem):
    space, theta, _ = model_problem
    d = theta.shape[0]
    h = Sinh(torch.linspace(0.5, 1.2, d, dtype=torch.float64), 1.1, 0.05)
    new = space.reparametrize(h)
    grid = [0.1, 0.3, 1.0, 3.0, 10.0]
    kw = {"method": "posthoc", "grid": grid, "refine": False, "hessian": "ggn"}
    ref = cvl.optimize_prior_precision(space, theta, riemannian=True, **kw)
    inv = cvl.optimize_prior_precision(new, h.inverse(theta), riemannian=True, **kw)
    assert max(abs(a - b) for a, b in zip(ref.log_evidences, inv.log_evidences,
                                           strict=True)) < 1e-7
    assert ref.prior_precision == inv.prior_precision
    psi_c = cvd.map_estimate(new, h.inverse(theta), riemannian=False).point
    cls = cvl.optimize_prior_precision(new, psi_c, riemannian=False, **kw)
    assert max(abs(a - b) for a, b in zip(ref.log_evidences, cls.log_evidences,
                                           strict=True)) > 1e-2


def test_prior_selection_by_refit_finds_the_evidence_maximum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(25, 1, generator=g, dtype=torch.float64)
    y = 0.8 * X + 0.5 * torch.randn(25, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False).double()
    space, theta = cvl.posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.5)
    res = cvl.optimize_prior_precision(space, theta, riemannian=False, grid=[0.1, 1.0, 10.0])
    # conjugate linear-Gaussian model: Laplace is exact; the optimum of the exact evidence
    s2 = 0.25
    xx, xy = float((X**2).sum()), float((X * y).sum())

    def exact(lam):
        a = lam + xx / s2
        return 0.5 * math.log(lam / a) + 0.5 * (xy / s2) ** 2 / a

    lams = torch.logspace(-2, 2, 4001).tolist()
    best = max(lams, key=exact)
    assert abs(math.log(res.prior_precision / best)) < 0.01
    assert res.to_dict()["method"] == "refit"


# ------------------------------------------------------------------------------ bad inputs


def test_bad_inputs(problem):
    space, theta = problem
    with pytest.raises(cvl.UnsupportedStructureError, match="full"):
        cvl.laplace(space, theta, structure="kron")
    with pytest.raises(NotImplementedError):  # also a NotImplementedError
        cvl.laplace(space, theta, structure="kron")
    with pytest.raises(ValueError, match="supported structures"):
        cvl.laplace(space, theta, structure="block")
    with pytest.raises(ValueError, match="hessian"):
        cvl.laplace(space, theta, hessian="fisher")
    with pytest.raises(ValueError, match="posterior_space"):
        cvl.laplace(space, theta, hessian="ggn")
    with pytest.raises(ValueError, match="posterior_space"):
        cvl.laplace(space, theta, prior_precision=2.0)
    with pytest.raises(ValueError, match="density space"):
        cvl.laplace(cv.ParameterSpace(lambda p: (p**2).sum()), theta)
    with pytest.raises(DenseTooLargeError, match="lowrank"):
        cvl.laplace(space, theta, max_dim=1)
    big = cv.ParameterSpace.from_log_prob(lambda p: -(p**2).sum())
    with pytest.raises(DenseTooLargeError, match=str(cvl.FULL_MAX_DIM)):
        cvl.laplace(big, torch.zeros(cvl.FULL_MAX_DIM + 1, dtype=torch.float64))
    with pytest.raises(cvl.NotAModeError, match="map_estimate"):
        cvl.laplace(cv.ParameterSpace.from_log_prob(lambda p: (p**2).sum()), theta)
    # a degenerate (submersion) metric: no Laplace in that chart
    h = WeightNorm((1, 2))
    wn = cv.ParameterSpace.from_log_prob(lambda psi: -(h(psi) ** 2).sum() - psi[0] ** 2,
                                         Pullback(Euclidean(), h))
    with pytest.raises(NotABijectionError, match="bijective chart"):
        cvl.laplace(wn, _t([1.0, 0.6, 0.8]), riemannian=True)
