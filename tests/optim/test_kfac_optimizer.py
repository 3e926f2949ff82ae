"""RiemannianGD(metric="kfac"/"ekfac"): K-FAC natural gradient against dense float64 ground
truth (the damped K-FAC matrix, the Gauss-Newton step where K-FAC is exact), its refresh and
running-average schedule, its invariance under parametrize charts, and a resumed run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import jvp
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from covariant.errors import SingularMetricError
from covariant.metrics import EKFAC, KFAC
from covariant.optim import RiemannianGD

from ._helpers import ElementScale

CE = nn.CrossEntropyLoss()


def _data(n=24, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, c, (n,), generator=g))


def _mlp(seed=0, d=6, h=5, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()


class _Conv(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _grad(model, loss_fn, X, y):
    params = list(model.parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(X), y), params)])


def _train(model, opt, batches, steps, loss_fn=CE):
    for k in range(steps):
        X, y = batches[k % len(batches)]
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()


def _w(model):
    """The plain weights w of the MLP (parametrized or not), in the plain model's order."""
    return torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach(),
                      model[2].weight.detach().reshape(-1), model[2].bias.detach()])


# ------------------------------------------------------------------ one step, dense truth
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_one_step_is_the_dense_damped_kfac_solve(kind, arch):
    X, y = _data()
    model = _mlp() if arch == "mlp" else _Conv().double()
    lam, lr = 1e-2, 0.7
    p0, g = _flat(model), _grad(model, CE, X, y)
    cls = EKFAC if kind == "ekfac" else KFAC
    K = cls(model, CE, [(X, y)]).dense(p0)
    expected = p0 - lr * torch.linalg.solve(K + lam * torch.eye(len(p0), dtype=K.dtype), g)
    opt = RiemannianGD(model.parameters(), lr, kind, model=model, loss_fn=CE, data=(X, y),
                       damping=lam, kfac_update_every=1, kfac_decay=0.0)
    _train(model, opt, [(X, y)], 1)
    assert opt.info == {"method": "kfac", "refreshed": True}
    assert (_flat(model) - expected).abs().max() < 1e-10
    assert (p0 - expected).abs().max() > 1e-2  # the step moved


@pytest.mark.parametrize("bias", [False, True])
def test_kfac_step_is_the_gauss_newton_step_on_a_linear_layer_with_mse(bias):
    """A single Linear layer with MSE: K-FAC (weight and bias as one block) is the exact GGN,
    so every K-FAC step, with the default refresh and averaging, is the Gauss-Newton step."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(10, 3, generator=g, dtype=torch.float64)
    mse = nn.MSELoss()
    torch.manual_seed(0)
    base = nn.Linear(4, 3, bias=bias).double()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(loss_fn=mse, data=(X, Y), damping=1e-3)
    kfac = RiemannianGD(a.parameters(), 0.8, "kfac", model=a, **kw,
                        metric_kwargs={"separate_bias": False})
    ggn = RiemannianGD(b.parameters(), 0.8, "ggn", model=b, **kw, cg_tol=1e-13,
                       cg_maxiter=100)
    for _ in range(4):
        _train(a, kfac, [(X, Y)], 1, mse)
        _train(b, ggn, [(X, Y)], 1, mse)
        assert (_flat(a) - _flat(b)).abs().max() < 1e-10
    assert (_flat(a) - _flat(base)).abs().max() > 0.1
    assert kfac.info["method"] == "kfac" and ggn.info["method"] == "cg"


# ------------------------------------------------------------------ refresh and averaging
def test_factors_refresh_every_T_steps_as_a_running_average():
    X, y = _data(n=32)
    batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    model = _mlp()
    lam, lr, decay = 1e-2, 0.5, 0.3
    opt = RiemannianGD(model.parameters(), lr, "kfac", model=model, loss_fn=CE, data=batches,
                       damping=lam, kfac_update_every=3, kfac_decay=decay)
    assert opt.kfac_factors is None
    seen, refreshed = [], []
    for k in range(7):
        Xb, yb = batches[k % 4]
        p0, g = _flat(model), _grad(model, CE, Xb, yb)
        new = KFAC(model, CE, [(Xb, yb)]).factors(p0)  # this step's own factors
        old = opt.kfac_factors
        _train(model, opt, [(Xb, yb)], 1)
        F = opt.kfac_factors
        refreshed.append(opt.info["refreshed"])
        if k % 3 == 0:  # j-th refresh: min(1 - 1/j, decay) old + rest new
            d = 0.0 if old is None else min(1 - 1 / (k // 3 + 1), decay)
            for fb, nb, ob in zip(F.blocks, new.blocks, (old or new).blocks, strict=True):
                assert torch.allclose(fb.A, d * ob.A + (1 - d) * nb.A, rtol=0, atol=1e-13)
                assert torch.allclose(fb.B, d * ob.B + (1 - d) * nb.B, rtol=0, atol=1e-13)
        else:
            assert F is old  # unchanged between refreshes
        K = F.dense()
        step = torch.linalg.solve(K + lam * torch.eye(len(p0), dtype=K.dtype), g)
        assert (_flat(model) - (p0 - lr * step)).abs().max() < 1e-10
        seen.append(F)
    assert refreshed == [True, False, False, True, False, False, True]
    assert len({id(F) for F in seen}) == 3
    assert (seen[3].dense() - seen[0].dense()).abs().max() > 1e-3  # refreshes do change K


# ------------------------------------------------------------------ invariance
def test_kfac_trajectory_is_invariant_under_a_linear_chart():
    """W = S ⊙ Ω per entry: the K-FAC trajectory of w is the plain model's to 1e-8 (float64),
    with refreshes and averaging; SGD's is not."""
    X, y = _data(n=32)
    batches = [(X[i : i + 16], y[i : i + 16]) for i in range(0, 32, 16)]
    base = _mlp()
    g = torch.Generator().manual_seed(3)
    charted = copy.deepcopy(base)
    for m in (charted[0], charted[2]):
        s = torch.rand(m.weight.shape, generator=g, dtype=torch.float64) * 5 + 0.1
        parametrize.register_parametrization(m, "weight", ElementScale(s))
    kw = dict(loss_fn=CE, data=batches, damping=1e-2, kfac_update_every=2, kfac_decay=0.5)
    for name, lr in (("kfac", 0.5), ("euclidean", 0.5)):
        a, b = copy.deepcopy(base), copy.deepcopy(charted)
        opt_a = RiemannianGD(a.parameters(), lr, name, model=a, **kw)
        opt_b = RiemannianGD(b.parameters(), lr, name, model=b, **kw)
        _train(a, opt_a, batches, 6)
        _train(b, opt_b, batches, 6)
        gap = float((_w(a) - _w(b)).abs().max())
        if name == "kfac":
            assert opt_b.info["method"] == "kfac"
            assert gap < 1e-8
            assert float((_w(a) - _w(base)).abs().max()) > 0.1
        else:
            assert gap > 1e-2


def _weight_normed(base):
    """weight_norm on both layers, with v scaled by 3 (w = g v/‖v‖ unchanged): at g = ‖v‖,
    where torch starts, J_E J_Eᵀ = I and plain gradient descent would match to first order."""
    m = copy.deepcopy(base)
    for layer in (m[0], m[2]):
        weight_norm(layer)
        with torch.no_grad():
            layer.parametrizations.weight.original1.mul_(3.0)
    assert torch.allclose(_w(m), _w(base), rtol=0, atol=1e-14)
    return m


def _w_velocity(model, r):
    """J_E r at the point of ``model``: weight norm's Jacobian (w = g v/‖v‖ per row) on r."""
    names = [n for n, _ in model.named_parameters()]
    start, parts = 0, {}
    for n, p in model.named_parameters():
        parts[n] = (p.detach(), r[start : start + p.numel()].view_as(p))
        start += p.numel()
    out = []
    for i in ("0", "2"):
        (g0, dg), (v0, dv) = (parts[f"{i}.parametrizations.weight.original{k}"] for k in (0, 1))
        _, dw = jvp(lambda g_, v_: g_ * v_ / v_.norm(dim=1, keepdim=True), (g0, v0), (dg, dv))
        out += [dw.reshape(-1), parts[f"{i}.bias"][1]]
    assert len(names) == 6
    return torch.cat(out)


def test_weight_norm_chart_gives_the_plain_kfac_direction_in_w():
    """weight_norm is a submersion (g, v) ↦ w: the K-FAC step in (g, v), mapped to w by J_E, is
    the plain model's (K + λI)⁻¹ g_w to 1e-8; so the w trajectories agree to second order in
    the step size. Plain gradient descent in (g, v) gives another direction."""
    X, y = _data()
    base = _mlp()
    kw = dict(loss_fn=CE, data=(X, y))
    directions = {}
    for name in ("kfac", "euclidean"):
        a, b = copy.deepcopy(base), _weight_normed(base)
        lam = 1e-2 if name == "kfac" else 0.0
        opt_a = RiemannianGD(a.parameters(), 1.0, name, model=a, **kw, damping=lam)
        opt_b = RiemannianGD(b.parameters(), 1.0, name, model=b, **kw, damping=lam)
        pa, pb, b0 = _flat(a), _flat(b), copy.deepcopy(b)
        _train(a, opt_a, [(X, y)], 1)
        _train(b, opt_b, [(X, y)], 1)
        directions[name] = (_w(base) - _w(a), _w_velocity(b0, pb - _flat(b)))
        if name == "kfac":
            assert opt_b.info["method"] == "kfac"
        assert float((pa - _flat(a)).abs().max()) > 1e-2
    plain, charted = directions["kfac"]
    assert (plain - charted).abs().max() < 1e-8 * plain.abs().max()
    plain, charted = directions["euclidean"]
    assert (plain - charted).abs().max() > 0.1 * plain.abs().max()

    gaps = []
    for lr in (0.1, 0.05):
        a, b = copy.deepcopy(base), _weight_normed(base)
        _train(a, RiemannianGD(a.parameters(), lr, "kfac", model=a, **kw, damping=1e-2),
               [(X, y)], 2)
        _train(b, RiemannianGD(b.parameters(), lr, "kfac", model=b, **kw, damping=1e-2),
               [(X, y)], 2)
        gaps.append(float((_w(a) - _w(b)).norm()))
    assert 3.0 < gaps[0] / gaps[1] < 5.0  # second order in lr: halving lr quarters the gap


# ------------------------------------------------------------------ subset, state, errors
def test_subset_of_parameters_solves_the_restricted_damped_kfac():
    X, y = _data()
    model = _mlp()
    named = dict(model.named_parameters())
    order = ["2.weight", "0.bias"]
    p0 = _flat(model)
    K = KFAC(model, CE, [(X, y)]).dense(p0)
    slices, start = {}, 0
    for n, p in model.named_parameters():
        slices[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    idx = torch.cat([slices[n] for n in order])
    loss = CE(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, [named[n] for n in order])])
    expected = p0.clone()
    expected[idx] -= 0.5 * torch.linalg.solve(
        K[idx][:, idx] + 1e-2 * torch.eye(len(idx), dtype=K.dtype), g)
    opt = RiemannianGD([named[n] for n in order], 0.5, "kfac", model=model, loss_fn=CE,
                       data=(X, y), damping=1e-2, cg_tol=1e-13, cg_maxiter=500)
    _train(model, opt, [(X, y)], 1)
    assert opt.info["method"] == "kfac+cg"
    assert (_flat(model) - expected).abs().max() < 1e-9


def test_state_dict_round_trip_resumes_identically():
    X, y = _data(n=48)
    batches = [(X[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]

    def make(model):
        return RiemannianGD(model.parameters(), 0.3, "ekfac", model=model, loss_fn=CE,
                            data=batches, damping=1e-2, momentum=0.5, kfac_update_every=2,
                            kfac_decay=0.9)

    model = _mlp()
    opt = make(model)
    _train(model, opt, batches, 3)
    saved_model = copy.deepcopy(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # through a real serialization
    assert opt.state_dict()["covariant"]["kfac"]["steps"] == 3
    _train(model, opt, batches, 4)  # steps 3..6: draws batches 0, 1, 2, 0 and refreshes at 4, 6

    def resume(drop_kfac):
        resumed = _mlp(seed=1)
        resumed.load_state_dict(saved_model)
        opt2 = make(resumed)
        buf.seek(0)
        state = torch.load(buf, weights_only=False)
        if drop_kfac:
            del state["covariant"]["kfac"]
        opt2.load_state_dict(state)
        _train(resumed, opt2, batches, 4)
        return resumed, opt2

    resumed, opt2 = resume(drop_kfac=False)
    assert torch.equal(_flat(model), _flat(resumed))
    assert torch.equal(opt.kfac_factors.dense(), opt2.kfac_factors.dense())
    fresh, _ = resume(drop_kfac=True)  # without the factors and counters it differs
    assert (_flat(model) - _flat(fresh)).abs().max() > 1e-6


def test_undamped_singular_kfac_raises_and_bad_options():
    X, y = _data(n=1)  # one data point: A = x xᵀ has rank 1
    model = _mlp()
    opt = RiemannianGD(model.parameters(), 0.1, "kfac", model=model, loss_fn=CE, data=(X, y))
    with pytest.raises(SingularMetricError, match="damping"):
        _train(model, opt, [(X, y)], 1)
    kw = dict(model=model, loss_fn=CE, data=(X, y))
    with pytest.raises(ValueError, match="kfac_update_every"):
        RiemannianGD(model.parameters(), 0.1, "kfac", kfac_update_every=0, **kw)
    with pytest.raises(ValueError, match="kfac_decay"):
        RiemannianGD(model.parameters(), 0.1, "kfac", kfac_decay=1.0, **kw)
    with pytest.raises(ValueError, match="damping=..."):
        RiemannianGD(model.parameters(), 0.1, "kfac", metric_kwargs={"damping": 1.0}, **kw)
    with pytest.raises(ValueError, match="needs model, loss_fn, data"):
        RiemannianGD(model.parameters(), 0.1, "kfac", model=model)


def test_undamped_singular_kfac_with_solve_mode_pinv_takes_the_pseudo_inverse_step():
    X, y = _data(n=1)
    model = _mlp()
    p0, g = _flat(model), _grad(model, CE, X, y)
    K = KFAC(model, CE, [(X, y)]).dense(p0)
    expected = p0 - 0.1 * torch.linalg.pinv(K, hermitian=True, rtol=1e-10) @ g
    opt = RiemannianGD(model.parameters(), 0.1, "kfac", model=model, loss_fn=CE, data=(X, y),
                       metric_kwargs={"solve_mode": "pinv"})
    _train(model, opt, [(X, y)], 1)
    assert torch.linalg.matrix_rank(K, hermitian=True, rtol=1e-10) < len(p0)
    assert (_flat(model) - expected).abs().max() < 1e-8 * expected.abs().max()
    assert (_flat(model) - p0).abs().max() > 1e-3


# ------------------------------------------------------------------ factored Tikhonov damping
def _factored_dense(F, lam):
    """(B + √λ/π I) ⊗ (A + π√λ I) per block, r + λ on the rest, built from the raw factors."""
    D = torch.zeros(F.dim, F.dim, dtype=torch.float64)
    s = lam ** 0.5
    for b in F.blocks:
        n_in, n_out = b.A.shape[0], b.B.shape[0]
        pi = ((torch.trace(b.A) / n_in) / (torch.trace(b.B) / n_out)).sqrt()
        blk = torch.kron(b.B + s / pi * torch.eye(n_out, dtype=torch.float64),
                         b.A + pi * s * torch.eye(n_in, dtype=torch.float64))
        D[b.index[:, None], b.index[None, :]] = blk
    D[F.rest_index, F.rest_index] = F.rest_diagonal + lam
    return D


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_factored_damping_step_is_the_dense_martens_grosse_solve(arch):
    X, y = _data()
    model = _mlp() if arch == "mlp" else _Conv().double()
    lam, lr = 1e-2, 0.7
    p0, g = _flat(model), _grad(model, CE, X, y)
    F = KFAC(model, CE, [(X, y)]).factors(p0)
    D = _factored_dense(F, lam)
    assert (F.with_factored_damping(lam).dense() - D).abs().max() < 1e-12
    extra = torch.linalg.eigvalsh(D - F.dense() - lam * torch.eye(F.dim, dtype=torch.float64))
    assert extra.min() > -1e-12 and extra.max() > 1e-3  # stronger than K + λI, and different
    expected = p0 - lr * torch.linalg.solve(D, g)
    opt = RiemannianGD(model.parameters(), lr, "kfac", model=model, loss_fn=CE, data=(X, y),
                       damping=lam, kfac_update_every=1, kfac_decay=0.0, kfac_damping="factored")
    _train(model, opt, [(X, y)], 1)
    assert (_flat(model) - expected).abs().max() < 1e-10
    exact = p0 - lr * torch.linalg.solve(F.dense() + lam * torch.eye(F.dim,
                                         dtype=torch.float64), g)
    assert (expected - exact).abs().max() > 1e-3  # the two dampings give different steps


def test_factored_damping_options():
    X, y = _data()
    model = _mlp()
    kw = dict(model=model, loss_fn=CE, data=(X, y), damping=0.1)
    with pytest.raises(ValueError, match="kfac_damping"):
        RiemannianGD(model.parameters(), 0.1, "kfac", kfac_damping="tikhonov", **kw)
    with pytest.raises(ValueError, match="EK-FAC"):
        RiemannianGD(model.parameters(), 0.1, "ekfac", kfac_damping="factored", **kw)
    with pytest.raises(ValueError, match="needs metric='kfac'"):
        RiemannianGD(model.parameters(), 0.1, "ggn", kfac_damping="factored", **kw)
    F = EKFAC(model, CE, [(X, y)]).factors(_flat(model))
    with pytest.raises(ValueError, match="EK-FAC"):
        F.with_factored_damping(0.1)
    with pytest.raises(ValueError, match="already has a damping"):
        KFAC(model, CE, [(X, y)]).factors(_flat(model)).with_damping(0.1) \
            .with_factored_damping(0.1)
