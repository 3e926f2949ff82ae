"""Chart linearizations: in-place fast paths, fused metric products and shared linearizations.

Correctness only: every fast path is checked against the dense Jacobian, against its own
out-of-place path (autograd, ``torch.func``, odd inputs) and against the composed products.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.func import jacfwd, vmap

import covariant as cv
from covariant.flatness import shape_operator_matvecs
from covariant.layout import ParameterLayout
from covariant.metrics import Constant, Euclidean, Pullback
from covariant.reparam import Exp, ParameterwiseReparametrization, WeightNorm

gen = torch.Generator().manual_seed(7)


def _wn_psi(shape, dim, gains):
    h = WeightNorm(shape, dim=dim)
    v = torch.randn(torch.Size(shape).numel(), generator=gen, dtype=torch.float64)
    return h, torch.cat([torch.tensor(gains, dtype=torch.float64), v])


def _blocks():
    """Weight norm with dim 0 and 1, an elementwise chart and uncharted neighbours."""
    layout = ParameterLayout.from_shapes(
        {"a": (3, 4), "a_bias": (3,), "b_bias": (2,), "b": (2, 3, 2), "c": (4, 2), "d": (2,)})
    h = ParameterwiseReparametrization(
        layout, {"a": WeightNorm(), "b": WeightNorm(), "c": WeightNorm(dim=1), "d": Exp()})
    parts = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name in h.blocks and isinstance(h.blocks[name], WeightNorm):
            m = h.blocks[name].num_slices
            parts.append(torch.linspace(0.6, 1.9, m, dtype=torch.float64) * (-1) ** m)
        parts.append(torch.randn(shape.numel(), generator=gen, dtype=torch.float64))
    return h, torch.cat(parts)


CASES = {
    "wn_dim0": lambda: _wn_psi((3, 4), 0, [1.3, -0.7, 2.1]),
    "wn_dim0_conv": lambda: _wn_psi((3, 2, 2), 0, [0.9, 1.4, -1.1]),
    "wn_dim1": lambda: _wn_psi((3, 4), 1, [1.3, -0.7, 2.1, 0.5]),
    "wn_none": lambda: _wn_psi((2, 3), None, [0.8]),
    "blocks": _blocks,
}


def _dense(h, psi):
    J = jacfwd(h.forward)(psi)
    Jp = torch.linalg.pinv(J)
    return J, Jp


def _products(lin, v, w):
    return {"jvp": lin.jvp(v), "vjp": lin.vjp(w), "inverse_jvp": lin.inverse_jvp(w),
            "inverse_vjp": lin.inverse_vjp(v), "gram": lin.gram(v),
            "pinv_gram": lin.pinv_gram(v)}


@pytest.mark.parametrize("name", list(CASES))
def test_products_and_fused_match_dense(name):
    h, psi = CASES[name]()
    J, Jp = _dense(h, psi)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(psi.shape[0], generator=g, dtype=torch.float64)
    w = torch.randn(J.shape[0], generator=g, dtype=torch.float64)
    lin = h.linearize(psi)
    assert lin.gram is not None and lin.pinv_gram is not None
    got = _products(lin, v, w)
    want = {"jvp": J @ v, "vjp": J.T @ w, "inverse_jvp": Jp @ w, "inverse_vjp": Jp.T @ v,
            "gram": J.T @ (J @ v), "pinv_gram": Jp @ (Jp.T @ v)}
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=1e-12), key
    assert torch.allclose(lin.theta, h.forward(psi), atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_in_place_path_matches_out_of_place_path(name):
    h, psi = CASES[name]()
    lin = h.linearize(psi)
    k, d = psi.shape[0], lin.theta.shape[0]
    g = torch.Generator().manual_seed(2)
    v = torch.randn(k, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    fast = _products(lin, v, w)
    # inputs tracked by autograd take the out-of-place path
    slow = _products(lin, v.clone().requires_grad_(), w.clone().requires_grad_())
    # non-contiguous inputs (every other entry of a longer vector)
    v2, w2 = torch.stack([v, -v], 1).reshape(-1)[::2], torch.stack([w, -w], 1).reshape(-1)[::2]
    assert not v2.is_contiguous()
    strided = _products(lin, v2, w2)
    # vmap (a batched input inside torch.func)
    batched = {key: vmap(getattr(lin, key))(x[None].expand(2, -1))[1]
               for key, x in (("jvp", v), ("vjp", w), ("inverse_jvp", w), ("inverse_vjp", v),
                              ("gram", v), ("pinv_gram", v))}
    for key in fast:
        assert torch.allclose(slow[key].detach(), fast[key], atol=1e-13), key
        assert torch.allclose(strided[key], fast[key], atol=1e-13), key
        assert torch.allclose(batched[key], fast[key], atol=1e-13), key
    # another dtype than the point's falls back to the out-of-place path and promotes
    assert torch.allclose(lin.jvp(v.float()), fast["jvp"], atol=1e-5)


@pytest.mark.parametrize("name", ["wn_dim0", "wn_dim1", "blocks"])
def test_into_writes_only_its_slice(name):
    h, psi = CASES[name]()
    lin = h.linearize(psi)
    v = torch.randn(psi.shape[0], generator=gen, dtype=torch.float64)
    d = lin.theta.shape[0]
    buf = torch.full((d + 5,), 7.0, dtype=torch.float64)
    lin.into("jvp", v, buf[2 : 2 + d])
    assert torch.allclose(buf[2 : 2 + d], lin.jvp(v), atol=1e-14)
    assert bool((buf[:2] == 7.0).all()) and bool((buf[2 + d :] == 7.0).all())


@pytest.mark.parametrize("name", ["wn_dim0", "blocks"])
def test_linearization_is_differentiable_in_psi(name):
    h, psi = CASES[name]()
    v = torch.randn(psi.shape[0], generator=gen, dtype=torch.float64)

    def via_lin(p):
        lin = h.linearize(p)
        return torch.cat([lin.theta, lin.jvp(v), lin.pinv_gram(v)])

    def via_chart(p):
        J = jacfwd(h.forward)(p)
        Jp = torch.linalg.pinv(J)
        return torch.cat([h.forward(p), J @ v, Jp @ (Jp.T @ v)])

    assert torch.allclose(jacfwd(via_lin)(psi), jacfwd(via_chart)(psi), atol=1e-9)
    p = psi.clone().requires_grad_()
    (grad,) = torch.autograd.grad(via_lin(p).sum(), p)
    assert torch.allclose(grad, jacfwd(via_chart)(psi).sum(0), atol=1e-9)


def test_pullback_of_euclidean_uses_fused_products():
    h, psi = _blocks()
    lin = h.linearize(psi)
    gmv, solve = Pullback(Euclidean(), h).products(psi, lin)
    assert gmv == lin.gram and solve == lin.pinv_gram
    # the composed products (a base metric that is the identity but not Euclidean)
    eye = torch.eye(lin.theta.shape[0], dtype=torch.float64)
    gmv_c, solve_c = Pullback(Constant(eye), h).products(psi, lin)
    v = torch.randn(psi.shape[0], generator=gen, dtype=torch.float64)
    assert torch.allclose(gmv(v), gmv_c(v), atol=1e-12)
    assert torch.allclose(solve(v), solve_c(v), atol=1e-12)
    # a block chart without fused products: composed products, same results
    twice = cv.reparam.FromFunctions(lambda p: 2 * p, lambda t: t / 2)
    h2 = ParameterwiseReparametrization(h.layout, {**h.blocks, "a_bias": twice})
    lin2 = h2.linearize(psi)
    assert lin2.gram is None and lin2.pinv_gram is None
    J, Jp = _dense(h2, psi)
    gmv2, solve2 = Pullback(Euclidean(), h2).products(psi, lin2)
    assert torch.allclose(gmv2(v), J.T @ (J @ v), atol=1e-12)
    assert torch.allclose(solve2(v), Jp @ (Jp.T @ v), atol=1e-12)


def test_linearization_shared_while_alive_and_freed_without_gc():
    for h, psi in (_blocks(), _wn_psi((3, 4), 0, [1.0, 2.0, 3.0]), (Exp(), torch.rand(4) + 0.5)):
        lin = h.linearize(psi)
        assert h.linearize(psi) is lin
        assert h.linearize(psi.clone()) is not lin  # another tensor
        gc.disable()
        try:
            ref = weakref.ref(lin)
            del lin
            assert ref() is None  # no reference cycle: freed by reference counting
        finally:
            gc.enable()
        lin = h.linearize(psi)
        psi.add_(0.0)  # an in-place change (even a no-op) invalidates it
        assert h.linearize(psi) is not lin
        # tracked points are not shared, nor a point that became tracked since
        p = psi.clone().requires_grad_()
        assert h.linearize(p) is not h.linearize(p)
        q = psi.clone()
        lin = h.linearize(q)
        q.requires_grad_()
        tracked = h.linearize(q)
        assert tracked is not lin and tracked.theta.requires_grad


def test_chart_with_live_linearization_pickles_and_copies():
    h, psi = _blocks()
    lin = h.linearize(psi)
    for clone in (pickle.loads(pickle.dumps(h)), copy.deepcopy(h)):
        assert torch.allclose(clone.linearize(psi).jvp(psi), lin.jvp(psi), atol=1e-14)


def test_horizontal_operator_shares_the_chart_linearization():
    """The flatness operators at a point build the chart's linearization once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))
    wn = space.reparametrize({"*.weight": WeightNorm()})
    psi = wn.chart.inverse(theta)
    calls = []
    original = type(wn.chart)._linearize

    def counting(self, p):
        calls.append(p)
        return original(self, p)

    type(wn.chart)._linearize = counting
    try:
        matvec, _, d, _, _ = shape_operator_matvecs(wn, psi)
    finally:
        type(wn.chart)._linearize = original
    assert len(calls) == 1
    # with the pulled-back Euclidean metric the horizontal operator is ∇²L(θ) (docs/math.md §5)
    u = torch.randn(d, dtype=torch.float64)
    assert torch.allclose(matvec(u), space.hvp(theta, u, riemannian=False), atol=1e-10)
