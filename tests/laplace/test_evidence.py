"""laplace(): classic vs invariant evidence, structures, the GGN precision, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import covariant as cv
from covariant import laplace as cvl
from covariant.errors import DenseTooLargeError, NotABijectionError
from covariant.metrics import Euclidean, Pullback
from covariant.reparam import Compose, Scale, Sinh, WeightNorm

from ._problems import CHARTS, _in_chart, _log_joint, _t


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


# ------------------------------------------------------------------------------ GGN


def test_ggn_equals_a_hand_computation(model_problem):
    space, theta, X = model_problem
    res = cvl.laplace(space, theta, riemannian=False, hessian="ggn")
    forward = space.binding.forward
    J = torch.func.jacrev(lambda p: forward(p, X))(theta)          # (n, C, d)
    pr = torch.softmax(forward(theta, X), -1)
    L = torch.diag_embed(pr) - pr[:, :, None] * pr[:, None, :]
    ggn = torch.einsum("ncd,nce,nek->dk", J, L, J) + torch.eye(theta.shape[0])
    assert torch.allclose(res.precision, ggn, atol=1e-10)
    log_joint = -float(space.loss(theta))
    d = theta.shape[0]
    hand = log_joint + 0.5 * d * math.log(2 * math.pi) - 0.5 * float(torch.logdet(ggn))
    assert abs(res.log_evidence - hand) < 1e-9
    diag = cvl.laplace(space, theta, riemannian=False, hessian="ggn", structure="diag")
    assert torch.allclose(diag.covariance.precision_diag, torch.diagonal(ggn), atol=1e-10)


def test_ggn_laplace_in_a_scale_chart_transforms_by_its_rule(model_problem):
    """θ = α ψ: P_ψ = Jᵀ P_θ J, Σ_ψ = J⁻¹ Σ_θ J⁻ᵀ and the invariant evidence is the same; a
    linear chart moves no evidence (the log |det J| of the density cancels the one of det P)."""
    space, theta, _ = model_problem
    d = theta.shape[0]
    alpha = torch.linspace(0.3, 3.0, d, dtype=torch.float64)
    h = Scale(alpha)
    new, psi = space.reparametrize(h), h.inverse(theta)  # a linear chart keeps the R-MAP
    for riemannian in (True, False):
        ref = cvl.laplace(space, theta, riemannian=riemannian, hessian="ggn")
        res = cvl.laplace(new, psi, riemannian=riemannian, hessian="ggn")
        J = torch.diag(alpha)
        assert torch.allclose(res.precision, J @ ref.precision @ J, rtol=1e-10, atol=1e-10)
        expected = ref.covariance / alpha[:, None] / alpha[None, :]
        assert torch.allclose(res.covariance, expected, rtol=1e-8, atol=1e-12)
        assert abs(res.log_evidence - ref.log_evidence) < 1e-8 * abs(ref.log_evidence)


def test_ggn_laplace_in_a_nonlinear_chart_invariant_equal_classic_differs(model_problem):
    space, theta, _ = model_problem
    d = theta.shape[0]
    h = Compose(Scale(torch.linspace(0.5, 2.0, d, dtype=torch.float64)), Sinh(1.2, 1.0, 0.1))
    ref = cvl.laplace(space, theta, riemannian=True, hessian="ggn")
    new, psi = _in_chart(space, theta, h, riemannian=True)
    res = cvl.laplace(new, psi, riemannian=True, hessian="ggn")
    assert abs(res.log_evidence - ref.log_evidence) < 1e-8 * abs(ref.log_evidence)
    J = h.jacobian(psi)
    assert torch.allclose(res.precision, J.T @ ref.precision @ J, rtol=1e-7, atol=1e-8)
    new_c, psi_c = _in_chart(space, theta, h, riemannian=False)
    classic = cvl.laplace(new_c, psi_c, riemannian=False, hessian="ggn")
    assert abs(classic.log_evidence - ref.log_evidence) > 1e-3


def test_ggn_of_a_gaussian_likelihood_is_the_jacobian_gram_over_sigma2():
    from ._problems import _regression_problem

    space, theta = _regression_problem()
    res = cvl.laplace(space, theta, riemannian=False, hessian="ggn")
    (X, _), = space.binding.batches
    J = torch.func.jacrev(lambda p: space.binding.forward(p, X))(theta).reshape(-1, 2)
    assert torch.allclose(res.precision, J.T @ J / 0.25 + torch.eye(2, dtype=torch.float64),
                          atol=1e-10)
    # a linear-Gaussian model: the GGN is the exact Hessian
    exact = cvl.laplace(space, theta, riemannian=False)
    assert abs(exact.log_evidence - res.log_evidence) < 1e-10


# ------------------------------------------------------------------------------ result


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank"])
def test_to_dict_is_json_and_summarizes_the_covariance(model_problem, structure):
    space, theta, _ = model_problem
    res = cvl.laplace(space, theta, riemannian=True, hessian="ggn", structure=structure,
                      rank=3)
    back = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert back["log_evidence"] == res.log_evidence and back["structure"] == structure
    assert back["point"] == theta.tolist() and back["dim"] == theta.shape[0]
    assert back["info"]["grad_norm"] == res.info["grad_norm"]
    cov = back["covariance"]
    assert cov["kind"] == structure and cov["dim"] == theta.shape[0]
    if structure == "lowrank":
        assert cov["rank"] == 3 and len(cov["eigenvalues"]) == 3
        assert back["info"]["lanczos_converged"] in (True, False)
    else:
        dense = res.covariance if structure == "full" else res.covariance.dense()
        assert abs(cov["trace"] - float(dense.trace())) < 1e-12 * abs(cov["trace"])
        assert cov["max_variance"] == float(torch.diagonal(dense).max())


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
    with pytest.raises(ValueError, match="twice"):
        cvl.laplace(space, theta, riemannian=True, logdet_method="slq")
