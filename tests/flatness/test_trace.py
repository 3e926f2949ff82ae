"""The factored invariant trace (flatness/trace.py) against dense float64 ground truth."""

import pytest
import torch
from torch import nn

import covariant as cv
from covariant._progress import progress_enabled, progress_scope
from covariant.connection import christoffel_lowered_dense, connection_quadratic
from covariant.flatness.trace import factored_trace
from covariant.linalg.probes import probe_block


def _mlp_space():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = (torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 3, (30,)))
    return cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), data, "ggn")


def _cnn_space():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).double()
    data = (torch.randn(12, 1, 6, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64))
    return cv.ParameterSpace.from_module(model, nn.MSELoss(), data, "ggn")


def _damped(space, lam=1e-2):
    return space.with_metric(cv.metrics.Damped(cv.metrics.GGN.from_space(space), lam))


def _charted(space, theta):
    new = space.reparametrize(cv.reparam.Sinh())  # θ = sinh ψ: a nonlinear chart
    return _damped(new), new.chart.inverse(theta)


def _cases():
    out = []
    for build in (_mlp_space, _cnn_space):
        space, theta = build()
        out.append((_damped(space), theta))
        out.append(_charted(space, theta))
    return out


def _truth(space, p, num_probes, seed):
    """mean zᵀ L⁻¹ Hess L⁻ᵀ z with the dense Riemannian Hessian (jacfwd Christoffels)."""
    L = torch.linalg.cholesky(space.metric.dense(p))
    H = space.hessian(p, method="general")
    U = torch.linalg.solve_triangular(L.T, probe_block(seed, p.shape[0], num_probes), upper=True)
    return ((H @ U) * U).sum(0), torch.linalg.solve(L @ L.T, H).trace()


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("mode", ["auto", "hvp"])
def test_factored_trace_matches_dense_samples(case, mode):
    space, p = _cases()[case]
    est = factored_trace(space, p, num_probes=5, seed=3, quadratic_forms=mode)
    samples, _ = _truth(space, p, 5, 3)
    assert torch.allclose(est.samples, samples, rtol=1e-10, atol=1e-10 * samples.abs().max())


def test_factored_trace_is_unbiased_at_full_budget():
    """Gaussian probes, many of them: the mean approaches tr(G⁻¹Hess) within 4 stderr."""
    space, p = _cases()[0]
    est = factored_trace(space, p, num_probes=400, seed=0)
    _, tr = _truth(space, p, 1, 0)
    assert abs(est.value - float(tr)) < 4 * est.stderr


@pytest.mark.parametrize("case", range(4))
def test_connection_form_matches_dense_christoffels(case):
    space, p = _cases()[case]
    gen = torch.Generator().manual_seed(case)
    u, r = (torch.randn(p.shape[0], generator=gen, dtype=torch.float64) for _ in range(2))
    lowered = christoffel_lowered_dense(space.metric, p)  # Γ_lij
    truth = torch.einsum("l,lij,i,j->", r, lowered, u, u)
    for metric in (space.metric, space.metric.metric):  # Damped and the bare GGN
        got = connection_quadratic(metric, p, u, r)
        assert abs(float(got - truth)) <= 1e-10 * max(1.0, abs(float(truth)))


def test_generic_connection_form_matches():
    """The base Metric's jvp form (a Dense metric, no potential) against jacfwd."""
    G = cv.metrics.Dense(lambda q: torch.diag(1 + q**2) + 0.1 * torch.outer(q, q))
    p = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    u = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    r = torch.tensor([0.5, -0.2, 0.7], dtype=torch.float64)
    truth = torch.einsum("l,lij,i,j->", r, christoffel_lowered_dense(G, p), u, u)
    assert abs(float(connection_quadratic(G, p, u, r) - truth)) < 1e-12


def test_flatness_uses_factored_trace_and_agrees():
    space, p = _cases()[1]
    r = cv.flatness(space, p, measures=("trace",), method="stochastic", num_probes=6, seed=2)
    samples, _ = _truth(space, p, 6, 2)
    assert r["trace"].info["products"] == "cholesky + quadratic forms"
    assert abs(r["trace"].value - float(samples.mean())) < 1e-10 * float(samples.abs().max())


def test_dense_metric_progress_counts_updates(monkeypatch):
    """The dense build advances a bar chunk by chunk inside progress_scope(True)."""
    import covariant.metrics.curvature_base as cb

    updates, enabled = [], []

    class Bar:
        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    def bar(*args, **kwargs):
        enabled.append(kwargs["enabled"])
        return Bar()

    monkeypatch.setattr(cb, "progress_bar", bar)
    monkeypatch.setattr(cb, "DENSE_CHUNK", 4)
    space, p = _mlp_space()
    space.metric.module = None  # the d products (an all-Linear MLP would take dense_linear)
    assert not progress_enabled()
    with progress_scope(True):
        assert progress_enabled()
        G = space.metric.dense(p)
    assert updates == [4] * (p.shape[0] // 4) + ([p.shape[0] % 4] if p.shape[0] % 4 else [])
    assert sum(updates) == p.shape[0] and G.shape == (p.shape[0], p.shape[0])
    assert enabled == [True]
    space.metric.dense(p)  # outside the scope: the bar is asked for disabled
    assert enabled == [True, False]


def test_fused_loss_minus_potential_is_the_same_function():
    """A model space's own loss: the Taylor pass takes L − ψ fused (one model pass per batch);
    the estimate equals the unfused difference to round-off. A loss with an extra term (not
    the metric's data loss) keeps the plain difference, which is what it must be."""
    from covariant.flatness import trace as tr

    space, theta = _mlp_space()
    damped = _damped(space)
    form = damped.metric.connection_form(theta, torch.linspace(-1, 1, theta.shape[0],
                                                               dtype=torch.float64))
    fused = tr._folded(damped, form)
    assert fused is form.loss_minus_potential
    q = theta + 0.1
    plain = space.loss_function(q) - form.potential(q)
    assert abs(float(fused(q) - plain)) < 1e-13 * abs(float(plain))
    other = damped.with_loss(lambda p: damped.loss_function(p) + (p ** 4).sum())
    form2 = other.metric.connection_form(theta, theta)
    assert form2.loss_minus_potential is not None
    kept = tr._folded(other, form2)
    assert kept is not form2.loss_minus_potential
    assert abs(float(kept(q) - other.loss_function(q) + form2.potential(q))) < 1e-12
    est = factored_trace(damped, theta, num_probes=6, seed=1).value
    real = tr._same_data
    try:
        tr._same_data = lambda data, binding: False
        unfused = factored_trace(damped, theta, num_probes=6, seed=1).value
    finally:
        tr._same_data = real
    assert abs(est - unfused) < 1e-12 * abs(unfused)
