"""Metric methods with generic defaults, against dense float64 truth."""

import pytest
import torch

from covariant import metrics, reparam
from covariant.metrics import Constant, Damped, Dense, Diagonal, Euclidean, Pullback

F64 = torch.float64
gen = torch.Generator().manual_seed(3)
A = torch.randn(3, 3, generator=gen, dtype=F64)
SPD = A @ A.T + 3 * torch.eye(3, dtype=F64)
P = torch.tensor([0.4, -0.7, 1.1], dtype=F64)


def _metrics():
    return {
        "euclidean": Euclidean(),
        "constant": Constant(SPD),
        "diagonal": Diagonal(lambda p: 1 + p**2),
        "dense": Dense(lambda p: SPD + torch.diag(p**2)),
        "pullback-exp": Pullback(Diagonal(lambda t: 2 + t), reparam.Exp()),
        "pullback-affine-constant": Pullback(Constant(SPD), reparam.Affine(A + 3 * torch.eye(3,
                                                                                           dtype=F64))),
        "damped": Damped(Dense(lambda p: SPD), 0.1),
    }


@pytest.mark.parametrize("name", list(_metrics()))
def test_closed_form_logdet_is_dense_truth_or_none(name):
    G = _metrics()[name]
    truth = torch.linalg.slogdet(G.dense(P))[1]
    closed = G.closed_form_logdet(P)
    if name in ("dense", "damped"):
        assert closed is None  # no closed form known: callers fall back to dense / SLQ
    else:
        torch.testing.assert_close(closed, truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_metrics()))
def test_inv_sqrt_squares_to_the_inverse(name):
    G = _metrics()[name]
    S = G.inv_sqrt(P, torch.eye(3, dtype=F64))
    torch.testing.assert_close(S @ S.T, torch.linalg.inv(G.dense(P)), rtol=1e-10, atol=1e-12)


def test_weight_norm_pullback_knows_its_kernel_and_pseudo_logdet():
    h = reparam.WeightNorm((2, 3))
    psi = torch.linspace(0.3, 1.7, 8, dtype=F64)
    G = Pullback(Diagonal(lambda w: 1 + w**2), h)
    D = G.dense(psi)
    assert G.is_degenerate(psi)
    U = G.kernel_basis(psi)
    assert U.shape == (8, 2)
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(D @ U, torch.zeros(8, 2, dtype=F64), rtol=0, atol=1e-12)
    ev = torch.linalg.eigvalsh(D)[2:]  # the 6 nonzero eigenvalues
    assert G.closed_form_logdet(psi) is None  # log det of a singular matrix: no number
    torch.testing.assert_close(G.closed_form_logdet(psi, pseudo=True), ev.log().sum(),
                               rtol=1e-10, atol=1e-10)


def test_jjt_logdet_default_is_dense_and_closed_forms_agree():
    psi = torch.linspace(0.3, 1.7, 8, dtype=F64)
    h = reparam.WeightNorm((2, 3))
    J = h.jacobian(psi)
    assert h.has_closed_form_jjt_logdet
    torch.testing.assert_close(h.jjt_logdet(psi), torch.linalg.slogdet(J @ J.T)[1],
                               rtol=1e-12, atol=1e-12)
    e = reparam.Exp()
    assert not e.has_closed_form_jjt_logdet
    torch.testing.assert_close(e.jjt_logdet(P), 2 * P.sum(), rtol=1e-12, atol=1e-12)


def test_metric_names_are_one_list():
    assert metrics.METRIC_NAMES == (
        "euclidean", "ggn", "fisher", "empirical_fisher", "kfac", "ekfac")
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.metric_from_name("hessian", None)


def test_constant_of_the_wrong_size_names_both_sizes():
    """A 4 × 4 Constant on a 3-dimensional space: a typed error, not a torch shape error."""
    import covariant as cv
    from covariant.errors import ShapeMismatchError

    G = Constant(torch.eye(4, dtype=F64))
    for call in (lambda: G.matvec(P, P), lambda: G.solve(P, P), lambda: G.dense(P),
                 lambda: G.logdet(P)):
        with pytest.raises(ShapeMismatchError, match=r"4 × 4.*shape \(3,\)"):
            call()
    space = cv.ParameterSpace(lambda p: (p**2).sum(), G)
    for method in ("dense", "stochastic"):
        with pytest.raises(ShapeMismatchError, match="Constant"):
            cv.flatness(space, P, measures=("trace",), method=method, num_probes=4)
