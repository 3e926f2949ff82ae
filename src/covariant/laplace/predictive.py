r"""Posterior predictives of a model posterior under a Laplace approximation N(p*, Σ).

- :func:`mc_predictive`: average the likelihood over parameter draws p_s ~ N(p*, Σ),
  mapped to θ through the space's chart.
- :func:`glm_predictive`: linearize the network around p*, f(x; p) ≈ f(x; p*) + J(x)(p − p*),
  so f ~ N(f*, J Σ Jᵀ). J Σ Jᵀ is chart-independent for the invariant full approximation
  (J_Ψ = J_Θ J_h, Σ_Ψ = J_h⁻¹ Σ_Θ J_h⁻ᵀ). Classification then uses the probit approximation
  softmax(f*/√(1 + π/8 · diag Σ_f)) (``link="probit"``) or Gaussian logit draws
  (``link="mc"``); regression returns the mean and the variance diag Σ_f + σ².

Example
-------
>>> import torch
>>> from torch import nn
>>> from covariant.laplace import laplace, posterior_space
>>> X = torch.randn(12, 1, dtype=torch.float64); y = 2 * X
>>> space, theta = posterior_space(nn.Linear(1, 1, bias=False).double(), (X, y),
...                                likelihood="regression", sigma_noise=0.5)
>>> res = laplace(space, theta, riemannian=False)
>>> mean, var = glm_predictive(space, res.point, res.covariance_operator, X[:2])
>>> bool((var > 0.25).all())                         # σ² plus the parameter uncertainty
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev

from ..space import ParameterSpace
from .posterior import posterior_binding

__all__ = ["glm_predictive", "mc_predictive", "model_outputs"]

Prediction = Tensor | tuple[Tensor, Tensor]


Outputs = Callable[[Tensor, Tensor], Tensor]


def model_outputs(space: ParameterSpace, what: str = "predictive") -> Outputs:
    """(p, X) ↦ f(h(p), X): the network of a model posterior in the space's chart."""
    binding = posterior_binding(space, what)
    h = space.root_chart()
    return binding.forward_in_chart(None if h is None else h.forward)


def mc_predictive(space: ParameterSpace, draws: Tensor, X: Tensor) -> Prediction:
    """The likelihood averaged over parameter draws (S, d) in the space's chart.

    Class probabilities (n, C) for classification; the mean and the variance (including σ²)
    of the outputs for regression.
    """
    binding = posterior_binding(space, "predictive")
    out_fn = model_outputs(space)
    with torch.no_grad():
        F = torch.stack([out_fn(q, X) for q in draws])
    if binding.likelihood == "classification":
        return torch.softmax(F, -1).mean(0)
    return F.mean(0), F.var(0, unbiased=False) + binding.sigma_noise**2


def _output_covariance(out_fn: Outputs, point: Tensor,
                       covariance: Any, X: Tensor) -> tuple[Tensor, Tensor]:
    """f* = f(p*, X) (n, ...) and Σ_f = J Σ Jᵀ per input, (n, C, C)."""
    f = out_fn(point, X).detach()
    n = f.shape[0]
    C = f.reshape(n, -1).shape[1]
    J = jacrev(lambda q: out_fn(q, X).reshape(n, -1))(point).detach()  # (n, C, d)
    SJt = covariance.matmat(J.reshape(n * C, -1).T)                   # (d, nC)
    Sf = torch.einsum("ncd,dnk->nck", J, SJt.reshape(-1, n, C))
    return f, 0.5 * (Sf + Sf.transpose(1, 2))


def glm_predictive(
    space: ParameterSpace,
    point: Tensor,
    covariance: Any,
    X: Tensor,
    *,
    link: str = "probit",
    n_samples: int = 100,
    seed: int = 0,
) -> Prediction:
    """The linearized-network predictive at inputs X (module docstring).

    ``covariance`` is an operator with ``matmat`` (:mod:`covariant.laplace.covariance`).
    """
    binding = posterior_binding(space, "predictive")
    f, Sf = _output_covariance(model_outputs(space), point, covariance, X)
    var = torch.diagonal(Sf, dim1=1, dim2=2)
    if binding.likelihood == "regression":
        return f, (var + binding.sigma_noise**2).reshape(f.shape)
    f2 = f.reshape(f.shape[0], -1)
    if link == "probit":
        return torch.softmax(f2 / torch.sqrt(1 + math.pi / 8 * var), -1)
    if link != "mc":
        raise ValueError(f"predictive: link must be 'probit' or 'mc', got {link!r}")
    n, C = f2.shape
    eye = torch.eye(C, dtype=f.dtype, device=f.device)
    Lf = torch.linalg.cholesky(Sf + 1e-10 * (1 + var.max()) * eye)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    Z = torch.randn(n_samples, n, C, generator=gen, dtype=torch.float64).to(f)
    logits = f2[None] + torch.einsum("nck,snk->snc", Lf, Z)
    return torch.softmax(logits, -1).mean(0)
