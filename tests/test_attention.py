"""Attention models: every second-order product goes through the math attention kernel.

Regression for issue 11: a transformer with ``nn.MultiheadAttention`` failed in its first
Hessian-vector product (the fused CPU kernel has no double backward). Truth here is a plain
re-implementation of the encoder layer (matrix products and a softmax) differentiated by
``torch.func`` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import covariant as cv

WIDTH, HEADS, SEQ, N = 4, 2, 5, 6


class Encoder(nn.Module):
    """One post-norm encoder layer (attention, LayerNorm, GELU MLP), mean over tokens, head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(WIDTH, HEADS, 8, dropout=0.0, batch_first=True,
                                              activation="gelu")
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def plain_forward(P: dict, x: torch.Tensor) -> torch.Tensor:
    """The same function written out: no fused kernel anywhere."""
    e = "enc."
    q, k, v = F.linear(x, P[e + "self_attn.in_proj_weight"],
                       P[e + "self_attn.in_proj_bias"]).chunk(3, -1)

    def heads(t):
        return t.reshape(x.shape[0], SEQ, HEADS, WIDTH // HEADS).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS), -1) @ v
    a = F.linear(a.transpose(1, 2).reshape(x.shape), P[e + "self_attn.out_proj.weight"],
                 P[e + "self_attn.out_proj.bias"])
    h = F.layer_norm(x + a, (WIDTH,), P[e + "norm1.weight"], P[e + "norm1.bias"])
    m = F.linear(F.gelu(F.linear(h, P[e + "linear1.weight"], P[e + "linear1.bias"])),
                 P[e + "linear2.weight"], P[e + "linear2.bias"])
    h = F.layer_norm(h + m, (WIDTH,), P[e + "norm2.weight"], P[e + "norm2.bias"])
    return F.linear(h.mean(1), P["head.weight"], P["head.bias"])


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = Encoder().double().eval()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0)
        for n, q in model.named_parameters():
            if "norm" in n:
                q.add_(0.3 * torch.randn_like(q))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, SEQ, WIDTH, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    space, theta = cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))

    def truth(p):
        return F.cross_entropy(plain_forward(space.unflatten(p), X), y)

    # autograd's double backward, column by column (torch.func.hessian is wrong on LayerNorm
    # weights: test_dense_hessian_of_a_small_layer_norm_model_is_right)
    H = torch.autograd.functional.hessian(truth, theta)
    return space, theta, truth, H, X, y


def test_loss_gradient_hvp_and_hessian_match_the_plain_model(encoder):
    space, theta, truth, H, _, _ = encoder
    assert float(space.loss(theta)) == pytest.approx(float(truth(theta)), rel=1e-12)
    torch.testing.assert_close(space.grad(theta), torch.func.grad(truth)(theta),
                               rtol=1e-10, atol=1e-13)
    V = torch.randn(3, theta.shape[0], generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    op = space.hvp_operator(theta, riemannian=False)
    for v in V:  # failed before: no double backward through the fused CPU kernel
        torch.testing.assert_close(space.hvp(theta, v, riemannian=False), H @ v,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(space.hessian(theta, riemannian=False, max_dim=500), H,
                               rtol=1e-10, atol=1e-12)


def test_ggn_product_and_riemannian_hvp_match_dense_truth(encoder):
    space, theta, _, H, X, y = encoder
    ggn = cv.metrics.GGN.from_space(space)
    J = torch.func.jacrev(lambda p: plain_forward(space.unflatten(p), X))(theta)  # (N, 3, d)
    pi = torch.softmax(plain_forward(space.unflatten(theta), X), -1)
    lam = (torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]) / N  # CE, mean reduction
    G = torch.einsum("nai,nab,nbj->ij", J, lam, J)
    v = torch.randn(theta.shape[0], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    torch.testing.assert_close(ggn.matvec(theta, v), G @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ggn.inner(theta, v, v), v @ G @ v, rtol=1e-10, atol=1e-13)
    # Fisher (= GGN for cross-entropy) and the empirical Fisher (per-example gradients)
    torch.testing.assert_close(cv.metrics.Fisher.from_space(space).matvec(theta, v), G @ v,
                               rtol=1e-10, atol=1e-13)
    per_example = torch.stack([torch.func.grad(lambda p, i=i: F.cross_entropy(
        plain_forward(space.unflatten(p), X[i:i + 1]), y[i:i + 1]))(theta) for i in range(N)])
    emp = cv.metrics.EmpiricalFisher.from_space(space).inner(theta, v, v)
    assert float(emp) == pytest.approx(float(((per_example @ v) ** 2).mean()), rel=1e-10)
    # the connection term of a Riemannian HVP differentiates G(θ):
    # Hess·v = ∇²L v − ½ [DG[v] r + ∇_θ(vᵀ G r) − DG[r] v], r = G⁻¹∇L (docs/math.md §3),
    # checked along directions z, with the derivatives of G by central differences of the
    # (checked) products above
    damped = cv.metrics.Damped(ggn, 1e-2)
    riem = space.with_metric(damped)
    r = torch.linalg.solve(G + 1e-2 * torch.eye(theta.shape[0], dtype=torch.float64),
                           space.grad(theta))
    got = riem.hvp(theta, v)
    h = 1e-5

    def d_along(z, f):
        return (f(theta + h * z) - f(theta - h * z)) / (2 * h)

    Z = torch.randn(4, theta.shape[0], generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    for z in Z:
        zGvr = d_along(v, lambda q, z=z: damped.inner(q, z, r))  # zᵀ DG[v] r
        zGrv = d_along(r, lambda q, z=z: damped.inner(q, z, v))  # zᵀ DG[r] v
        dvGr = d_along(z, lambda q: damped.inner(q, v, r))  # zᵀ ∇_θ(vᵀ G r)
        want = z @ H @ v - 0.5 * (zGvr + dvGr - zGrv)
        assert float(z @ got) == pytest.approx(float(want), rel=1e-6, abs=1e-8)


def test_stochastic_trace_runs_in_taylor_mode_and_matches_dense(encoder):
    space, theta, _, H, _, _ = encoder
    kw = {"measures": ("trace",), "method": "stochastic", "num_probes": 60, "seed": 5}
    auto = cv.flatness(space, theta, **kw)["trace"]
    hvp = cv.flatness(space, theta, quadratic_forms="hvp", **kw)["trace"]
    assert auto.info["products"] == "taylor" and hvp.info["products"] == "hvp"
    assert auto.value == pytest.approx(hvp.value, rel=1e-10)
    exact = float(torch.trace(H))
    assert abs(auto.value - exact) <= 3 * auto.stderr


@pytest.mark.parametrize("case", ["causal", "need_weights_mask", "key_padding"])
def test_attention_options_have_exact_hvps(case):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True).double().eval()
    head = nn.Linear(WIDTH, 3).double()
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    pad = torch.zeros(N, SEQ, dtype=torch.bool)
    pad[:, -2:] = True

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.head = mha, head

        def forward(self, x):
            if case == "causal":
                h = F.scaled_dot_product_attention(x, x.sin(), x, is_causal=True)
                h = self.mha(h, h, h, need_weights=False)[0]
            elif case == "need_weights_mask":
                h, w = self.mha(x, x, x, need_weights=True, attn_mask=mask)
                h = h * w.sum(-1, keepdim=True)
            else:
                h = self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
            return self.head(h.mean(1))

    net = Net()
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(N, SEQ, WIDTH, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    space, theta = cv.ParameterSpace.from_module(net, nn.CrossEntropyLoss(), (X, y))

    def loss(p):  # the math kernel selected by hand, outside the library
        return F.cross_entropy(torch.func.functional_call(net, space.unflatten(p), (X,)), y)

    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            H = torch.autograd.functional.hessian(loss, theta)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    v = torch.randn(theta.shape[0], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(space.hvp(theta, v, riemannian=False), H @ v,
                               rtol=1e-10, atol=1e-12)
    q = cv.flatness(space, theta, measures=("trace",), method="stochastic", num_probes=4,
                    seed=0)["trace"]
    assert q.info["products"] == "taylor"
    Z = cv.linalg.hutchinson(lambda z: H @ z, theta.shape[0], 4, seed=0)
    assert q.value == pytest.approx(Z.value, rel=1e-10)


def test_first_order_paths_keep_the_fused_kernels(encoder):
    space, theta, _, _, _, _ = encoder
    model = space.binding.model
    seen = []
    handle = model.enc.self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(torch.backends.cuda.flash_sdp_enabled()))
    try:
        space.grad(theta)
        space.loss(theta)
        first = list(seen)
        space.hvp(theta, torch.ones_like(theta), riemannian=False)
        cv.metrics.GGN.from_space(space).matvec(theta, torch.ones_like(theta))
    finally:
        handle.remove()
    # the loss and gradient: fused; the HVP and the GGN product (one jvp, one vjp): math
    assert first == [True, True] and seen[2:] == [False, False, False]
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.mha.get_fastpath_enabled()


def test_weight_norm_chart_trace_is_invariant_naive_is_not(encoder):
    space, theta, _, _, _, _ = encoder
    wn = space.reparametrize({"*.weight": cv.reparam.WeightNorm()})
    base = wn.chart.inverse(theta)
    ref = cv.flatness(space, theta, measures=("trace",))["trace"].value
    naive = []
    for s in (0.1, 1.0, 10.0):
        psi = base.clone()
        for name, block in wn.chart.blocks.items():
            sl = wn.chart.psi_slices[name]
            psi[sl.start + block.num_slices:sl.stop] *= s  # v ↦ s v: the same weights w
        torch.testing.assert_close(wn.chart(psi), theta, rtol=1e-12, atol=1e-14)
        inv = cv.flatness(wn, psi, measures=("trace",))["trace"].value
        assert inv == pytest.approx(ref, rel=1e-8)
        naive.append(cv.flatness(wn.with_metric(cv.metrics.Euclidean()), psi,
                                 measures=("trace",))["trace"].value)
    assert max(naive) / min(naive) > 10


def test_dense_hessian_of_a_small_layer_norm_model_is_right():
    # torch.func.hessian (jacfwd over jacrev) gets ∂²L/∂w∂A wrong here on torch 2.13 (w the
    # LayerNorm weight, A upstream of its input); the dense Hessian (d ≤ 64 path) must not
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)

    def loss(p):
        A, w, b = p[:16].view(4, 4), p[16:20], p[20:24]
        return (F.layer_norm(x + torch.tanh(x @ A), (4,), w, b).sin() * c).sum()

    p = torch.randn(24, generator=gen, dtype=torch.float64)
    g = torch.func.grad(loss)
    fd = torch.stack([(g(p + 1e-6 * e) - g(p - 1e-6 * e)) / 2e-6
                      for e in torch.eye(24, dtype=torch.float64)])
    H = cv.ParameterSpace(loss).hessian(p, riemannian=False)
    torch.testing.assert_close(H, fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(H, H.T, rtol=1e-12, atol=1e-13)
