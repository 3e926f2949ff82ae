"""Taylor rules of normalization layers, GELU/SiLU and attention against dense float64 Hessians.

Each case builds a small float64 model whose loss goes through the operation, and compares
vᵀ∇²L v by Taylor mode (``QuadraticForm``) with vᵀHv of the dense Hessian (rtol 1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covariant as cv
from covariant._fast import QuadraticForm, TaylorUnsupportedError
from covariant._fast.taylor.norm_rules import rms_norm_rule
from covariant._fast.taylor.recording import Node

SEQ, WIDTH = 5, 6


class _Seq(nn.Module):
    """(N, SEQ, WIDTH) → a layer under test → mean over tokens → linear head."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.ln = nn.LayerNorm(WIDTH)
        self.ln2 = nn.LayerNorm((SEQ, WIDTH), elementwise_affine=False)
        self.gn = nn.GroupNorm(3, WIDTH)
        self.rms = nn.RMSNorm(WIDTH)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x):
        h = self.inp(x)
        c = self.case
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        if c == "layer_norm":
            h = self.ln(h).tanh() + self.ln2(h)
        elif c == "group_norm":  # channels = WIDTH, one spatial dimension
            h = self.gn(h.transpose(1, 2)).transpose(1, 2).sin()
        elif c == "rms_norm":
            h = self.rms(h).tanh()
        elif c == "gelu_tanh":
            h = F.gelu(h, approximate="tanh") + F.gelu(2 * h)
        elif c == "silu":
            h = F.silu(h)
        elif c == "sdpa":
            q, k, v = h, h.sin(), h.tanh()
            h = F.scaled_dot_product_attention(q, k, v)
        elif c == "sdpa_causal":
            h = F.scaled_dot_product_attention(h, h, h.tanh(), is_causal=True)
        elif c == "sdpa_masks":  # a boolean and a float mask, and masked scores by hand
            scores = (h @ h.transpose(1, 2)).masked_fill(causal, float("-inf"))
            h = torch.softmax(scores, -1) @ h + torch.where(causal[:, :1], h, h.sin())
            bias = torch.linspace(-1, 1, SEQ * SEQ, dtype=h.dtype).view(SEQ, SEQ)
            h = h + F.scaled_dot_product_attention(h, h, h, attn_mask=~causal.T) \
                + F.scaled_dot_product_attention(h, h, h, attn_mask=bias)
        elif c == "mha_weights":  # need_weights: explicit softmax and baddbmm with the mask
            a, w = self.mha(h, h, h, need_weights=True, attn_mask=causal)
            h = a + w.sum(-1, keepdim=True)
        elif c == "mha_padding":  # need_weights=False: SDPA with a key padding mask
            pad = torch.zeros(x.shape[0], SEQ, dtype=torch.bool)
            pad[:, -1] = True
            h = self.mha(h, h, h, need_weights=False, key_padding_mask=pad)[0]
        return self.out(h.mean(1))


CASES = ["layer_norm", "group_norm", "rms_norm", "gelu_tanh", "silu",
         "sdpa", "sdpa_causal", "sdpa_masks", "mha_weights", "mha_padding"]


def _space(case: str):
    torch.manual_seed(0)
    model = _Seq(case).double().eval()
    with torch.no_grad():  # affine parameters away from their (1, 0) initialization
        for m in (model.ln, model.gn, model.rms):
            m.weight.add_(0.3 * torch.randn_like(m.weight))
            if getattr(m, "bias", None) is not None:
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(4, SEQ, WIDTH, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    return cv.ParameterSpace.from_module(model, nn.CrossEntropyLoss(), (X, y))


@pytest.mark.parametrize("case", CASES)
def test_taylor_rule_matches_dense_hessian(case):
    space, p = _space(case)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(4, p.shape[0], generator=gen, dtype=torch.float64)
    q = QuadraticForm(space.loss_function, p)
    H = space.hessian(p, riemannian=False, max_dim=p.shape[0])
    want = torch.einsum("ki,ij,kj->k", V, H, V)
    torch.testing.assert_close(torch.stack([q(v) for v in V]), want, rtol=1e-10, atol=1e-12)
    assert float(q.value) == pytest.approx(float(space.loss(p)), rel=1e-12)


@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_layer_norm_statistics_carry_their_coefficients(elementwise_affine):
    # a loss that reads the saved mean and 1/std of native_layer_norm as well as its output;
    # truth: the same loss written out (torch's own derivative of native_layer_norm ignores
    # those two outputs)
    w = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64) if elementwise_affine \
        else None
    scale = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)

    def loss(p, written_out=False):
        x = p.view(2, 4) * scale
        if written_out:
            mean = x.mean(-1, keepdim=True)
            rstd = (((x - mean) ** 2).mean(-1, keepdim=True) + 1e-3).rsqrt()
            y = (x - mean) * rstd * (1.0 if w is None else w)
        else:
            y, mean, rstd = torch.ops.aten.native_layer_norm(x, [4], w, None, 1e-3)
        return (y.sin() * x).sum() + (mean * rstd).exp().sum()

    p = torch.tensor([0.3, -0.2, 0.9, 1.1, -0.4, 0.6, 0.05, -1.3], dtype=torch.float64)
    H = torch.func.hessian(lambda q: loss(q, True))(p)
    q = QuadraticForm(loss, p)
    assert float(q.value) == pytest.approx(float(loss(p, True)), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    for v in torch.randn(3, 8, generator=gen, dtype=torch.float64):
        assert float(q(v)) == pytest.approx(float(v @ H @ v), rel=1e-10)


def test_masks_are_constants_and_a_p_dependent_fill_value_is_refused():
    def loss(p):
        return p.masked_fill(p > 0, 0.0).sum() + torch.where(p.sin() > 2 * p, p, 0.0).sum()

    p = torch.tensor([0.3, -0.2], dtype=torch.float64)
    assert float(QuadraticForm(loss, p)(torch.ones(2, dtype=torch.float64))) == 0.0

    def bad(p):  # the fill value depends on p
        return torch.where(torch.tensor([True, False]), p, p**2).sum() + \
            p.masked_fill(torch.tensor([True, False]), 1.0).sum() * p[0]

    H = torch.func.hessian(bad)(p)
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert float(QuadraticForm(bad, p)(v)) == pytest.approx(float(v @ H @ v), rel=1e-12)

    def fill_of_p(p):  # masked_fill.Tensor with a p-dependent value
        return (p.masked_fill(torch.tensor([True, False]), p[1]) ** 2).sum()

    with pytest.raises(TaylorUnsupportedError, match="mask"):
        QuadraticForm(fill_of_p, p)


def test_fused_rms_norm_rule_gives_the_taylor_coefficients():
    # On CPU _fused_rms_norm decomposes before any dispatch mode sees it (its pieces have
    # rules); where it is a kernel (CUDA) its own rule applies. The rule, applied to a node by
    # hand, against the coefficients of t ↦ y(x₀ + x₁t + x₂t², w₀ + w₁t + w₂t²) at 0.
    gen = torch.Generator().manual_seed(4)
    x0, x1, x2 = torch.randn(3, 2, 3, 4, generator=gen, dtype=torch.float64)
    w0, w1, w2 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    eps = 0.1

    def y(t):
        x, w = x0 + x1 * t + x2 * t * t, w0 + w1 * t + w2 * t * t
        return x * ((x * x).mean(-1, keepdim=True) + eps).rsqrt() * w

    t0 = torch.zeros((), dtype=torch.float64)
    d1 = torch.func.jacfwd(y)(t0)
    d2 = torch.func.jacfwd(torch.func.jacfwd(y))(t0)
    xn, wn = Node("placeholder", (), {}), Node("placeholder", (), {})
    node = Node(torch.ops.aten._fused_rms_norm.default, (xn, [4], wn, eps), {})
    primal = {xn: x0, wn: w0, node: torch.ops.aten._fused_rms_norm(x0, [4], w0, eps)}
    c1, c2 = rms_norm_rule(node, primal)(node, primal, {xn: (x1, x2), wn: (w1, w2)})
    torch.testing.assert_close(c1[0], d1, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(c2[0], 0.5 * d2, rtol=1e-12, atol=1e-13)
