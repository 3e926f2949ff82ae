"""K-FAC factors built by hand for small nn.Sequential nets of Linear layers (tests only).

Type-2 GGN, K-FAC-expand, the conventions of /docs (KFAC spec): for a Linear layer l with
inputs a_n and outputs z_n, A = Σ_n a_n a_nᵀ / N and B = Σ_n J_nᵀ H_n J_n, with J_n = ∂f_n/∂z_n
and H_n the Hessian of sample n's negative log-likelihood in the outputs (CE: diag p − p pᵀ;
Gaussian: I/σ²). Biases get their own block (A = [[1]]) or are folded in (``joint_bias``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jacrev

from covariant.layout import ParameterLayout
from covariant.metrics.kronecker import KroneckerBlock, KroneckerFactored


def _output_hessian(f: torch.Tensor, likelihood: str, sigma: float) -> torch.Tensor:
    if likelihood == "classification":
        p = torch.softmax(f, -1)
        return torch.diag(p) - torch.outer(p, p)
    return torch.eye(f.shape[-1], dtype=f.dtype) / sigma**2


def hand_kfac(model: nn.Sequential, X: torch.Tensor, likelihood: str, sigma: float = 1.0,
              joint_bias: bool = False) -> KroneckerFactored:
    layout = ParameterLayout.from_module(model)
    sl = layout.slices
    layers = list(model)
    N = X.shape[0]
    blocks = []
    for li, layer in enumerate(layers):
        if not isinstance(layer, nn.Linear):
            continue
        rest = nn.Sequential(*layers[li + 1:])
        with torch.no_grad():
            a = nn.Sequential(*layers[:li])(X)
            z = layer(a)
        Bf = torch.zeros(layer.out_features, layer.out_features, dtype=X.dtype)
        for n in range(N):
            J = jacrev(rest)(z[n])                                   # (C, out)
            H = _output_hessian(rest(z[n]).detach(), likelihood, sigma)
            Bf += (J.T @ H @ J).detach()
        w = torch.arange(sl[f"{li}.weight"].start, sl[f"{li}.weight"].stop).reshape(
            layer.out_features, layer.in_features)
        b = torch.arange(sl[f"{li}.bias"].start, sl[f"{li}.bias"].stop)
        if joint_bias:
            a1 = torch.cat([a, torch.ones(N, 1, dtype=X.dtype)], 1)
            idx = torch.cat([w, b[:, None]], 1).reshape(-1)
            blocks.append(KroneckerBlock(f"{li}.weight+{li}.bias", idx, a1.T @ a1 / N, Bf))
        else:
            blocks.append(KroneckerBlock(f"{li}.weight", w.reshape(-1), a.T @ a / N, Bf))
            blocks.append(KroneckerBlock(f"{li}.bias", b, torch.ones(1, 1, dtype=X.dtype), Bf))
    return KroneckerFactored(blocks, layout.dim)
