"""Second-order Taylor mode (covariant._fast.taylor) against dense float64 Hessians and HVPs."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

import covariant as cv
from covariant import errors
from covariant._fast import QuadraticForm, TaylorUnsupportedError, is_plain, is_transformed
from covariant.errors import CovariantError
from covariant.zoo.architectures import preset


def _space(model: nn.Module, loss: nn.Module, n: int = 12, classes: int | None = 10,
           batches: int = 1, in_features: int = 40):
    gen = torch.Generator().manual_seed(1)
    model = model.double().eval()
    data = []
    for _ in range(batches):
        X = torch.randn(n, in_features, generator=gen, dtype=torch.float64)
        y = (torch.randint(0, classes, (n,), generator=gen) if classes
             else torch.randn(n, 3, generator=gen, dtype=torch.float64))
        data.append((X, y))
    return cv.ParameterSpace.from_module(model, loss, data[0] if batches == 1 else data)


def _dense_quadratic_forms(space, p, V):
    H = space.hessian(p, riemannian=False, max_dim=p.shape[0])
    return torch.einsum("ki,ij,kj->k", V, H, V)


def _hvp_quadratic_forms(space, p, V):
    """The generic path: vᵀ (∇²L v) by Hessian-vector products (reverse over reverse)."""
    return torch.stack([v @ space.hvp(p, v, riemannian=False) for v in V])


@pytest.mark.parametrize("name, overrides", [
    ("mlp-small", {}), ("cnn-small", {}),
    ("resnet1d-small", {"channels": 6, "num_blocks": 2}),  # residual adds; ~1k parameters
])
def test_quadratic_form_matches_dense_hessian_on_presets(name, overrides):
    torch.manual_seed(0)
    model = preset(name, **overrides)
    assert sum(q.numel() for q in model.parameters()) < 3000  # dense Hessian stays small
    space, p = _space(model, nn.CrossEntropyLoss())
    V = torch.randn(4, p.shape[0], dtype=torch.float64)
    q = QuadraticForm(space.loss_function, p)
    got = torch.stack([q(v) for v in V])
    want = _dense_quadratic_forms(space, p, V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the value at p is the loss itself
    assert float(q.value) == pytest.approx(float(space.loss(p)), rel=1e-12)


@pytest.mark.parametrize("act", [nn.Softplus(), nn.Sigmoid(), nn.GELU(), nn.SiLU(), nn.ELU(),
                                 nn.LeakyReLU(0.1)])
def test_quadratic_form_elementwise_rules_and_mse(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 3))
    space, p = _space(model, nn.MSELoss(), n=7, classes=None, batches=2, in_features=5)
    V = torch.randn(3, p.shape[0], dtype=torch.float64)
    q = QuadraticForm(space.loss_function, p)
    torch.testing.assert_close(torch.stack([q(v) for v in V]),
                               _dense_quadratic_forms(space, p, V), rtol=1e-10, atol=1e-12)


def test_quadratic_form_of_a_plain_function_with_inplace_and_products():
    A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)

    def loss(p):
        q = p.clone()
        q.mul_(2.0)  # in place: functionalized away
        return 0.5 * p @ A @ p + (q * p).exp().sum() / 3 + torch.cat([p, q]).sin().sum()

    p = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    H = torch.func.hessian(loss)(p)
    for v in torch.eye(3, dtype=torch.float64):
        assert float(QuadraticForm(loss, p)(v)) == pytest.approx(float(v @ H @ v), rel=1e-12)


def test_unsupported_operation_raises():
    def loss(p):
        return torch.linalg.vector_norm(p) ** 3 + torch.sort(p).values[0]

    p = torch.tensor([0.3, -0.2], dtype=torch.float64)
    with pytest.raises(TaylorUnsupportedError, match="no second-order Taylor rule"):
        QuadraticForm(loss, p)
    assert issubclass(TaylorUnsupportedError, CovariantError)


def test_flatness_taylor_and_hvp_give_the_same_estimate():
    # Same seed, same probes: the two ways of computing zᵀ∇²L z agree to rounding, and with
    # the dense Hessian.
    torch.manual_seed(0)
    space, p = _space(preset("mlp-small"), nn.CrossEntropyLoss(), n=32)
    kw = {"measures": ("trace",), "method": "stochastic", "num_probes": 300, "seed": 3}
    taylor = cv.flatness(space, p, quadratic_forms="taylor", **kw)["trace"]
    hvp = cv.flatness(space, p, quadratic_forms="hvp", **kw)["trace"]
    auto = cv.flatness(space, p, **kw)["trace"]
    assert taylor.info["products"] == "taylor" == auto.info["products"]
    assert hvp.info["products"] == "hvp"
    assert taylor.value == pytest.approx(hvp.value, rel=1e-10)
    assert auto.value == taylor.value
    # ground truth: the dense float64 Hessian with the same Rademacher probes
    H = space.hessian(p, riemannian=False, max_dim=p.shape[0])
    dense = cv.linalg.hutchinson(lambda v: H @ v, p.shape[0], 300, seed=3)
    assert taylor.value == pytest.approx(dense.value, rel=1e-10)
    assert taylor.stderr == pytest.approx(dense.stderr, rel=1e-8)


def test_flatness_falls_back_to_products_when_the_loss_has_no_rule():
    def loss(p):  # a 4-norm: no rule here
        return torch.linalg.vector_norm(p, ord=4) ** 3 + (p**2).sum()

    space = cv.ParameterSpace(loss)
    p = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    kw = {"measures": ("trace",), "method": "stochastic", "num_probes": 20, "seed": 0}
    auto = cv.flatness(space, p, **kw)["trace"]
    assert auto.info["products"].startswith("hvp (")
    exact = float(torch.trace(torch.func.hessian(loss)(p)))
    # Rademacher probes and this Hessian: a 3-dim estimate, compare with the product path
    assert auto.value == pytest.approx(cv.flatness(space, p, quadratic_forms="hvp", **kw)
                                       ["trace"].value, rel=1e-12)
    assert abs(auto.value - exact) < 4 * auto.stderr + 1e-9
    with pytest.raises(TaylorUnsupportedError):
        cv.flatness(space, p, quadratic_forms="taylor", **kw)
    with pytest.raises(ValueError, match="quadratic_forms"):
        cv.flatness(space, p, quadratic_forms="fast", **kw)


def test_inplace_relu_is_recorded_out_of_place_and_unsafe_mutation_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    space, p = _space(model, nn.CrossEntropyLoss(), n=9, classes=3, in_features=5)
    V = torch.randn(3, p.shape[0], dtype=torch.float64)
    q = QuadraticForm(space.loss_function, p)
    torch.testing.assert_close(torch.stack([q(v) for v in V]),
                               _dense_quadratic_forms(space, p, V), rtol=1e-10, atol=1e-12)

    def mutated_after_use(p):
        a = p * 2.0
        b = a.sin()  # a is used here ...
        a.mul_(3.0)  # ... and then changed in place: the record cannot express this
        return (a * b).sum()

    with pytest.raises(TaylorUnsupportedError, match="in-place"):
        QuadraticForm(mutated_after_use, torch.ones(3, dtype=torch.float64))


class _Tokens(nn.Module):
    """Embedding → mean over tokens → linear: exercises the embedding rule."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.emb(x.long()).mean(1))


@pytest.mark.parametrize("case", ["batchnorm_maxpool_conv", "conv2d_maxpool2d",
                                  "embedding", "bce_softmax_logsumexp"])
def test_more_rules_match_dense_hessian(case):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    if case == "batchnorm_maxpool_conv":
        model = nn.Sequential(nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3),
                              nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(15, 3))
        model = model.double()
        with torch.no_grad():  # non-trivial running statistics, then eval mode
            model(torch.randn(64, 12, generator=gen, dtype=torch.float64) * 2)
        X = torch.randn(10, 12, generator=gen, dtype=torch.float64)
        data, loss_fn = (X, torch.randint(0, 3, (10,), generator=gen)), nn.CrossEntropyLoss()
    elif case == "conv2d_maxpool2d":
        model = nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 2, 3), nn.Softplus(),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()
        X = torch.randn(10, 36, generator=gen, dtype=torch.float64)
        data, loss_fn = (X, torch.randint(0, 3, (10,), generator=gen)), nn.CrossEntropyLoss()
    elif case == "embedding":
        model = _Tokens().double()
        X = torch.randint(0, 7, (10, 5), generator=gen).double()
        data, loss_fn = (X, torch.randint(0, 3, (10,), generator=gen)), nn.CrossEntropyLoss()
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        X = torch.randn(10, 4, generator=gen, dtype=torch.float64)
        t = torch.rand(10, 3, generator=gen, dtype=torch.float64)

        def loss_fn(out, target):  # softmax, logsumexp and BCE with logits in one loss
            return (nn.functional.binary_cross_entropy_with_logits(out, target)
                    + torch.softmax(out, 1).pow(2).sum(1).mean()
                    + 0.1 * torch.logsumexp(out, dim=1).sum())

        data = (X, t)
    model.eval()
    space, p = cv.ParameterSpace.from_module(model, loss_fn, data)
    q = QuadraticForm(space.loss_function, p)
    V = torch.randn(4, p.shape[0], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.stack([q(v) for v in V]),
                               _dense_quadratic_forms(space, p, V), rtol=1e-10, atol=1e-12)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]

    def loss(p):  # functional_call with the module in train mode: batch statistics
        parts = torch.split(p, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(model, params, (X,)).pow(2).mean()

    p = torch.cat([q.detach().flatten() for q in model.parameters()])
    with pytest.raises(TaylorUnsupportedError, match="training mode"):
        QuadraticForm(loss, p)


def test_weight_norm_chart_loss_quotient_and_norm_rules():
    # L∘h for weight norm (w = g v / ‖v‖) needs the quotient and vector-norm rules; the naive
    # (Euclidean) trace in the (g, v) chart then uses Taylor mode as well.
    torch.manual_seed(0)
    space, theta = _space(preset("mlp-small", hidden=(6,)), nn.CrossEntropyLoss(), n=16)
    wn = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    psi = wn.chart.inverse(theta)
    q = QuadraticForm(wn.loss_function, psi)
    V = torch.randn(4, psi.shape[0], dtype=torch.float64)
    torch.testing.assert_close(torch.stack([q(v) for v in V]),
                               _dense_quadratic_forms(wn, psi, V), rtol=1e-10, atol=1e-12)
    naive = wn.with_metric(cv.metrics.Euclidean())
    r = cv.flatness(naive, psi, measures=("trace",), method="stochastic", num_probes=20)
    assert r["trace"].info["products"] == "taylor"

    def quotient(p):  # division by a p-dependent tensor, broadcast
        return (p[:3] / (1.5 + p[3:4] ** 2)).sin().sum()

    p = torch.tensor([0.3, -0.2, 0.5, 0.7], dtype=torch.float64)
    H = torch.func.hessian(quotient)(p)
    for v in torch.eye(4, dtype=torch.float64):
        assert float(QuadraticForm(quotient, p)(v)) == pytest.approx(float(v @ H @ v), rel=1e-12)


# ------------------------------------------------------------------ fast path vs generic path
@pytest.mark.parametrize("case", ["mlp-tanh-ce", "mlp-relu-mse", "cnn-small", "weight-norm"])
def test_quadratic_form_matches_the_generic_hvp_path(case):
    # Each fast path has a generic counterpart: vᵀ∇²L v by Taylor mode against vᵀ(∇²L v) by
    # Hessian-vector products (space.hvp(..., riemannian=False)), on a few models.
    torch.manual_seed(0)
    if case == "mlp-tanh-ce":
        space, p = _space(preset("mlp-small", hidden=(7,)), nn.CrossEntropyLoss(), n=10)
    elif case == "mlp-relu-mse":
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        space, p = _space(model, nn.MSELoss(), n=8, classes=None, in_features=4)
    elif case == "cnn-small":
        space, p = _space(preset("cnn-small"), nn.CrossEntropyLoss(), n=6)
    else:
        base, theta = _space(preset("mlp-small", hidden=(5,)), nn.CrossEntropyLoss(), n=8)
        space = base.reparametrize({"*.weight": cv.reparam.WeightNorm()})
        p = space.chart.inverse(theta)
    gen = torch.Generator().manual_seed(5)
    V = torch.randn(3, p.shape[0], generator=gen, dtype=torch.float64)
    q = QuadraticForm(space.loss_function, p)
    torch.testing.assert_close(torch.stack([q(v) for v in V]),
                               _hvp_quadratic_forms(space, p, V), rtol=1e-10, atol=1e-12)


def test_taylor_unsupported_error_is_a_covariant_error_with_one_home():
    assert TaylorUnsupportedError is errors.TaylorUnsupportedError
    assert issubclass(TaylorUnsupportedError, CovariantError)
    assert "TaylorUnsupportedError" in errors.__all__
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("covariant.taylor")


# ------------------------------------------------------------------ is_plain / is_transformed
def test_is_plain_and_is_transformed():
    x = torch.ones(3)
    assert is_plain(x) and not is_transformed(x)
    assert is_plain(x, torch.zeros(2))
    assert not is_plain(x.clone().requires_grad_(True))
    assert not is_plain(x, x.clone().requires_grad_(True))
    seen = []

    def probe(t):
        seen.append((is_plain(t), is_transformed(t)))
        return t.sum()

    torch.func.vmap(probe)(torch.ones(2, 3))
    torch.func.grad(probe)(torch.ones(3))
    torch.func.jvp(probe, (torch.ones(3),), (torch.ones(3),))
    assert seen == [(False, True)] * 3


def test_plain_and_transformed_paths_of_the_hvp_agree():
    # is_plain picks the autograd double-backward path (through the kept gradient graph);
    # inside vmap the same operator takes the torch.func path
    space = cv.ParameterSpace(lambda p: (p.sin() * p.roll(1)).sum() + (p**4).sum())
    p = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    V = torch.eye(3, dtype=torch.float64)
    op = space.hvp_operator(p, riemannian=False)
    plain = torch.stack([op(v) for v in V])
    mapped = torch.func.vmap(op)(V)
    torch.testing.assert_close(plain, mapped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain, torch.func.hessian(space.loss_function)(p),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", [
    "covariant._fast", "covariant._fast.taylor", "covariant._fast.taylor.quadratic_form",
    "covariant._fast.taylor.recording", "covariant._fast.taylor.coefficients",
    "covariant._fast.taylor.rules", "covariant._fast.taylor.nonlinear_rules",
    "covariant._fast.taylor.dispatch",
])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    finally:
        torch.set_default_dtype(old)
    assert result.attempted > 0 and result.failed == 0
