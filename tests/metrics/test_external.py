"""from_curvlinops: curvlinops operators as metrics, against covariant's own dense truth.

The tests that need curvlinops skip when it is absent (it is an optional peer, not in CI);
the ImportError test and the OperatorMetric tests run everywhere.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import covariant as cv
from covariant.errors import DomainError, MissingDependencyError
from covariant.layout import ParameterLayout
from covariant.metrics import GGN, OperatorMetric, from_curvlinops

F64 = torch.float64


@pytest.fixture
def cl():
    return pytest.importorskip("curvlinops")


def _problem(kind: str = "ce", n: int = 40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    if kind == "ce":
        y, loss_fn = torch.randint(0, 3, (n,), generator=g), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(n, 3, generator=g, dtype=F64), nn.MSELoss()
    batches = [(X[:25], y[:25]), (X[25:], y[25:])]
    space, theta = cv.ParameterSpace.from_module(model, loss_fn, batches)
    return model, loss_fn, batches, space, theta


def _kfac(cl, kind: str = "mse"):
    model, loss_fn, batches, space, theta = _problem(kind)
    op = cl.KFACLinearOperator(model, loss_fn, list(model.parameters()), batches,
                               fisher_type="type-2")
    return model, op, space, theta


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_wrapped_ggn_equals_covariant_ggn(cl, kind):
    model, loss_fn, batches, space, theta = _problem(kind)
    op = cl.GGNLinearOperator(model, loss_fn, list(model.parameters()), batches)
    G = from_curvlinops(op, dict(model.named_parameters()), layout=space.layout)
    ggn = space.with_metric("ggn").metric
    assert isinstance(ggn, GGN)
    truth = ggn.dense(theta)
    assert _rel(G.dense(theta), truth) < 1e-10
    v = torch.randn(theta.numel(), dtype=F64, generator=torch.Generator().manual_seed(3))
    assert _rel(G.matvec(theta, v), truth @ v) < 1e-10


def test_wrapped_hessian_equals_space_hessian(cl):
    model, loss_fn, batches, space, theta = _problem("ce")
    op = cl.HessianLinearOperator(model, loss_fn, list(model.parameters()), batches)
    G = from_curvlinops(op, list(model.parameters()))
    assert _rel(G.dense(theta), space.hessian(theta, riemannian=False)) < 1e-10


def test_wrapped_kfac_matvec_solve_logdet(cl):
    model, op, _, theta = _kfac(cl)
    d = theta.numel()
    dense_op = op @ torch.eye(d, dtype=F64)
    G = from_curvlinops(op, list(model.parameters()))
    v = torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(4))
    assert _rel(G.matvec(theta, v), dense_op @ v) < 1e-12
    assert _rel(G.dense(theta), dense_op) < 1e-12
    # undamped: curvlinops' closed-form log det equals the dense one
    sign, logabsdet = torch.linalg.slogdet(dense_op)
    assert float(sign) == 1.0
    assert G.closed_form_logdet(theta) is not None
    assert abs(float(G.logdet(theta)) - float(logabsdet)) < 1e-9 * abs(float(logabsdet))
    # damped: exact damping (K + λI), closed-form solve through KFACInverseLinearOperator
    Gl = from_curvlinops(op, list(model.parameters()), damping=0.1)
    damped = dense_op + 0.1 * torch.eye(d, dtype=F64)
    assert _rel(Gl.dense(theta), damped) < 1e-12
    assert Gl.has_closed_form_solve
    W = torch.randn(d, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert _rel(Gl.solve(theta, Gl.matmat(theta, W)), W) < 1e-8
    assert _rel(Gl.solve(theta, v), torch.linalg.solve(damped, v)) < 1e-8
    assert Gl.closed_form_logdet(theta) is None  # λ > 0: dense
    assert abs(float(Gl.logdet(theta)) - float(torch.logdet(damped))) < 1e-10 * d


def test_operator_alone_is_an_unchecked_constant_metric(cl):
    """from_curvlinops(op), the API's one-argument form: the operator's own flat order and no
    point to check, so checks that need θ₀ are refused rather than silently skipped."""
    model, op, _, theta = _kfac(cl)
    d = theta.numel()
    dense_op = op @ torch.eye(d, dtype=F64)
    G = from_curvlinops(op, damping=0.1)
    v = torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(6))
    damped = dense_op + 0.1 * torch.eye(d, dtype=F64)
    assert _rel(G.matvec(theta, v), damped @ v) < 1e-12
    assert _rel(G.matvec(theta + 1.0, v), damped @ v) < 1e-12     # any point: G(θ₀)
    assert _rel(G.solve(theta, v), torch.linalg.solve(damped, v)) < 1e-8
    with pytest.raises(ValueError, match="without params"):
        from_curvlinops(op, point_check="raise")


def test_wrapped_ekfac_solve_is_the_inverse(cl):
    model, loss_fn, batches, _, theta = _problem("mse")
    op = cl.EKFACLinearOperator(model, loss_fn, list(model.parameters()), batches,
                                fisher_type="type-2")
    d = theta.numel()
    G = from_curvlinops(op, list(model.parameters()), damping=0.05)
    damped = op @ torch.eye(d, dtype=F64) + 0.05 * torch.eye(d, dtype=F64)
    assert _rel(G.dense(theta), damped) < 1e-12
    v = torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(6))
    assert _rel(G.solve(theta, v), torch.linalg.solve(damped, v)) < 1e-8
    # undamped: EK-FAC's closed-form log det (corrected eigenvalues) equals the dense one
    G0 = from_curvlinops(op, list(model.parameters()))
    sign, logabsdet = torch.linalg.slogdet(G0.dense(theta))
    assert float(sign) == 1.0
    closed = G0.closed_form_logdet(theta)
    assert closed is not None and abs(float(closed) - float(logabsdet)) < 1e-9 * abs(
        float(logabsdet))


def test_cg_solve_of_a_wrapped_ggn(cl):
    model, loss_fn, batches, space, theta = _problem("mse")
    op = cl.GGNLinearOperator(model, loss_fn, list(model.parameters()), batches)
    G = from_curvlinops(op, list(model.parameters()), damping=0.01, solve="cg")
    assert not G.has_closed_form_solve
    v = torch.randn(theta.numel(), dtype=F64, generator=torch.Generator().manual_seed(7))
    assert _rel(G.matvec(theta, G.solve(theta, v)), v) < 1e-8


def test_layout_in_another_order_is_a_permutation(cl):
    model, op, space, theta = _kfac(cl)
    named = dict(model.named_parameters())
    rev = ParameterLayout.from_shapes({n: named[n].shape for n in reversed(list(named))})
    G = from_curvlinops(op, named, layout=rev)
    G0 = from_curvlinops(op, named)
    p_rev = rev.flatten(named).detach()
    perm = torch.cat([torch.arange(s.start, s.stop) for s in
                      (space.layout.slices[n] for n in rev.names)])
    assert torch.equal(G.dense(p_rev), G0.dense(theta)[perm][:, perm])
    assert torch.equal(G.point, p_rev)


def test_point_and_parameter_checks(cl):
    model, loss_fn, batches, space, theta = _problem("mse")
    op = cl.GGNLinearOperator(model, loss_fn, list(model.parameters()), batches)
    G = from_curvlinops(op, list(model.parameters()))
    v = torch.ones(theta.numel(), dtype=F64)
    with pytest.raises(DomainError, match="rebuild the operator"):
        G.matvec(theta + 1e-3, v)
    with torch.no_grad():
        model[0].bias.add_(0.5)  # the live operator now answers at another point
    with pytest.raises(DomainError, match="parameters have changed by 0.5"):
        G.matvec(theta, v)
    quiet = from_curvlinops(op, list(model.parameters()), point_check="warn")
    with pytest.warns(UserWarning, match="asked at a point"):
        quiet.matvec(theta, v)


def test_invariant_trace_with_a_wrapped_kfac_metric(cl):
    """tr(G⁻¹ Hess) with the wrapped K-FAC metric is the same in a chart that scales one
    block; with the Euclidean metric it is not (the check can fail)."""
    model, op, space, theta = _kfac(cl)
    G = from_curvlinops(op, dict(model.named_parameters()), layout=space.layout, damping=0.1)
    w_space = space.with_metric(G)
    chart = {"0.weight": cv.reparam.Scale(3.0)}
    psi_space = w_space.reparametrize(chart)
    psi = psi_space.chart.inverse(theta)
    tr_w = cv.flatness(w_space, theta, measures=("trace",))["trace"].value
    tr_psi = cv.flatness(psi_space, psi, measures=("trace",))["trace"].value
    assert abs(tr_psi - tr_w) < 1e-10 * abs(tr_w)
    # ground truth: tr((K + λI)⁻¹ ∇²L) in w
    eye = torch.eye(theta.numel(), dtype=F64)
    damped = op @ eye + 0.1 * eye
    truth = float(torch.linalg.solve(damped, space.hessian(theta, riemannian=False)).trace())
    assert abs(tr_w - truth) < 1e-10 * abs(truth)
    eucl = cv.metrics.Euclidean()
    naive = [cv.flatness(s, q, measures=("trace",))["trace"].value for s, q in (
        (space.with_metric(eucl), theta), (psi_space.with_metric(eucl), psi))]
    assert abs(naive[1] - naive[0]) > 1e-2 * abs(naive[0])
    # the wrapped metric used in ψ without the pullback is asked at ψ ≠ θ₀: refused
    with pytest.raises(DomainError, match="asked at a point"):
        cv.flatness(psi_space.with_metric(G), psi, measures=("trace",))


def test_not_an_operator_is_refused(cl):
    with pytest.raises(TypeError, match="curvlinops linear operator"):
        from_curvlinops(torch.eye(3), [torch.zeros(3)])


def test_missing_curvlinops_names_the_install_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "curvlinops", None)  # import curvlinops now fails
    with pytest.raises(ImportError, match="bash benchmarks/install_peers.sh") as info:
        from_curvlinops(object(), [])
    assert isinstance(info.value, MissingDependencyError)


def test_import_covariant_does_not_import_curvlinops():
    import subprocess

    code = "import sys, covariant, covariant.metrics; print('curvlinops' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_operator_metric_against_a_dense_matrix():
    """OperatorMetric with a plain matrix product (no curvlinops): vmap, jvp, vjp, solve."""
    g = torch.Generator().manual_seed(8)
    A = torch.randn(4, 4, generator=g, dtype=F64)
    M = A @ A.T + torch.eye(4, dtype=F64)
    p = torch.randn(4, generator=g, dtype=F64)
    G = OperatorMetric(lambda X: M @ X, p, damping=0.5)
    Ml = M + 0.5 * torch.eye(4, dtype=F64)
    v = torch.randn(4, generator=g, dtype=F64)
    assert _rel(G.matvec(p, v), Ml @ v) < 1e-15
    assert _rel(torch.func.vmap(lambda e: G.matvec(p, e))(torch.eye(4, dtype=F64)), Ml) < 1e-15
    _, tangent = torch.func.jvp(lambda x: G.matvec(p, x), (v,), (v,))
    assert _rel(tangent, Ml @ v) < 1e-15
    x = v.clone().requires_grad_(True)
    (G.inner(p, x, x) / 2).backward()
    assert _rel(x.grad, Ml @ v) < 1e-15
    assert _rel(G.solve(p, v), torch.linalg.solve(Ml, v)) < 1e-12
    assert G.closed_form_logdet(p) is None
    assert abs(float(G.logdet(p)) - float(torch.logdet(Ml))) < 1e-12
    # a float32 copy of θ₀ is the same point; a float32 point 1e-3 away is not
    assert _rel(G.matvec(p.float(), v.float()).double(), Ml @ v) < 1e-6
    with pytest.raises(DomainError, match="asked at a point 0.001 away"):
        G.matvec(p.float() + 1e-3, v.float())
    loose = OperatorMetric(lambda X: M @ X, p, point_check="ignore")
    assert _rel(loose.matvec(p + 1, v), M @ v) < 1e-15  # G(θ₀) on purpose
    assert repr(G) == "OperatorMetric(operator, d=4, damping=0.5)"
