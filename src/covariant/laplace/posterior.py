r"""Model posteriors as density spaces: log p(D, θ) = log p(D | θ) + log N(θ; 0, λ⁻¹ I).

:func:`posterior_space` turns a network, one (X, y) batch and a Gaussian prior into a density
space (loss = −log p(D, θ)) whose frozen :class:`~covariant.layout.ModelBinding` carries the
model, the data, the likelihood and the prior. For such a space ``space.binding.loss`` *is*
the negative log-likelihood −log p(D | θ) on the root coordinates θ (a categorical likelihood:
``nn.CrossEntropyLoss(reduction="sum")``; a Gaussian one: :class:`GaussianNLL`), and
``space.binding.forward_in_chart(space.root_chart())`` the network in the space's own chart.

:func:`with_prior_precision` swaps the prior λ of such a space (in any chart).

Example
-------
>>> import math, torch
>>> from torch import nn
>>> X = torch.randn(20, 2, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
>>> space, theta = posterior_space(nn.Linear(2, 1).double(), (X, y), likelihood="regression",
...                                sigma_noise=0.5, prior_precision=2.0)
>>> nll = space.binding.loss(theta)                  # −log p(D | θ)
>>> prior = gaussian_prior_nll(theta, 2.0)           # −log N(θ; 0, ½ I)
>>> bool(torch.isclose(space.loss(theta), nll + prior))
True
>>> s3 = with_prior_precision(space, 3.0)
>>> bool(torch.isclose(s3.loss(theta), nll + gaussian_prior_nll(theta, 3.0)))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ShapeMismatchError
from ..layout import ModelBinding, ParameterLayout
from ..metrics import Metric
from ..space import ParameterSpace

__all__ = [
    "GaussianNLL",
    "gaussian_prior_nll",
    "posterior_binding",
    "posterior_space",
    "prior_precision_of",
    "root_map",
    "with_prior_precision",
]

LOG_2PI = math.log(2 * math.pi)
LIKELIHOODS = ("classification", "regression")


def gaussian_prior_nll(theta: Tensor, prior_precision: float | Tensor) -> Tensor:
    r"""−log N(θ; 0, λ⁻¹ I) for a scalar or per-coordinate precision λ.

    .. math:: ½ Σ_i λ_i θ_i^2 − ½ Σ_i (\log λ_i − \log 2π)

    Example
    -------
    >>> import math, torch
    >>> v = gaussian_prior_nll(torch.zeros(2, dtype=torch.float64), 1.0)
    >>> abs(float(v) - math.log(2 * math.pi)) < 1e-12     # ½ · 2 · log 2π
    True
    """
    lam_t = torch.as_tensor(prior_precision, dtype=theta.dtype, device=theta.device)
    quad = 0.5 * (lam_t * theta**2).sum()
    if lam_t.ndim == 0:
        return quad - 0.5 * theta.shape[0] * (torch.log(lam_t) - LOG_2PI)
    return quad - 0.5 * (torch.log(lam_t) - LOG_2PI).sum()


#: The former private name of :func:`gaussian_prior_nll` (kept for compatibility).
_prior_nll = gaussian_prior_nll


class GaussianNLL(nn.Module):
    """−log N(y; f, σ² I) summed over all entries: ½‖f − y‖²/σ² + ½·numel·log(2πσ²).

    Its Hessian in the outputs is I/σ², which :class:`covariant.metrics.GGN` finds by
    autodiff (a loss it has no closed form for).

    Example
    -------
    >>> import math, torch
    >>> f = torch.zeros(3, 1, dtype=torch.float64); y = torch.ones(3, 1, dtype=torch.float64)
    >>> nll = GaussianNLL(0.5)(f, y)          # 3 · (½ · 1/0.25 + ½ log(2π · 0.25))
    >>> abs(float(nll) - (6.0 + 1.5 * math.log(0.5 * math.pi))) < 1e-12
    True
    """

    def __init__(self, sigma_noise: float) -> None:
        super().__init__()
        self.sigma2 = float(sigma_noise) ** 2
        self.reduction = "sum"

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        t = y.reshape(f.shape).to(f)
        return 0.5 * ((f - t) ** 2).sum() / self.sigma2 + 0.5 * f.numel() * math.log(
            2 * math.pi * self.sigma2)


def posterior_binding(space: ParameterSpace, what: str) -> ModelBinding:
    """The binding of a model posterior (:func:`posterior_space`), or a ValueError naming
    ``what`` needs it."""
    binding = space.binding
    if binding is None or not binding.is_bayesian:
        raise ValueError(
            f"{what} needs a model posterior: build the space with "
            "covariant.laplace.posterior_space(model, (X, y), ...) (then reparametrize it as "
            "you like); a plain from_log_prob space knows no model, likelihood or prior."
        )
    return binding


def prior_precision_of(space: ParameterSpace) -> float | Tensor | None:
    """λ of the prior N(0, λ⁻¹ I) of a model posterior, None for any other space."""
    binding = space.binding
    return None if binding is None else binding.prior_precision


def root_map(space: ParameterSpace) -> Callable[[Tensor], Tensor]:
    """ψ ↦ θ = h(ψ), the chart to the root coordinates (unchecked, for ``torch.func``)."""
    h = space.root_chart()
    return (lambda q: q) if h is None else h.forward


def posterior_space(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    likelihood: str = "classification",
    prior_precision: float | Tensor = 1.0,
    sigma_noise: float = 1.0,
    metric: Metric | None = None,
    max_dense_dim: int | None = None,
) -> tuple[ParameterSpace, Tensor]:
    r"""The log joint of a network with a Gaussian prior, as a density space.

    .. math::

        \log p(D, θ) = \sum_n \log p(y_n | f(x_n; θ)) + \log N(θ; 0, λ^{-1} I),

    with a categorical likelihood (softmax of the logits, ``"classification"``) or a Gaussian
    one N(y; f, σ²) (``"regression"``). The space remembers the model, the data and the
    likelihood (its ``binding``), which the GGN Hessian, the predictives and prior selection
    need; it can be reparametrized like any density space (the prior stays the one placed on
    θ).

    Parameters
    ----------
    model : nn.Module
    data : (X, y)
        The training set, one batch.
    likelihood : {"classification", "regression"}
    prior_precision : float or Tensor
        λ, a scalar or one value per coordinate.
    sigma_noise : float
        σ of the Gaussian likelihood (regression only).
    metric : Metric, optional
        The metric of the θ chart (Euclidean by default).
    max_dense_dim : int, optional
        The space's limit for dense matrices.

    Returns
    -------
    space, theta : ParameterSpace, Tensor
        The density space and the model's current flat parameters.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> X = torch.randn(20, 2, dtype=torch.float64); y = (X[:, 0] > 0).long()
    >>> model = nn.Linear(2, 2).double()
    >>> space, theta = posterior_space(model, (X, y), prior_precision=1.0)
    >>> theta.shape
    torch.Size([6])
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"posterior_space: likelihood must be 'classification' or 'regression', got "
            f"{likelihood!r}"
        )
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError("posterior_space: data must be one (X, y) batch")
    X, y = data
    if likelihood == "classification":
        if y.dtype not in (torch.int64, torch.int32):
            raise ShapeMismatchError("posterior_space: classification targets must be integers")
        nll_fn: nn.Module = nn.CrossEntropyLoss(reduction="sum")
    else:
        nll_fn = GaussianNLL(sigma_noise)
    binding, theta = ModelBinding.from_module(
        model, nll_fn, (X, y), likelihood=likelihood, sigma_noise=float(sigma_noise),
        prior_precision=prior_precision,
    )
    nll, lam0 = binding.loss, prior_precision

    def loss(p: Tensor) -> Tensor:
        return nll(p) + gaussian_prior_nll(p, lam0)

    space = ParameterSpace(
        loss, metric, layout=ParameterLayout.from_module(model), is_density=True,
        max_dense_dim=max_dense_dim, binding=binding,
    )
    return space, theta


def with_prior_precision(space: ParameterSpace, prior_precision: float | Tensor) -> ParameterSpace:
    """The same model posterior (same chart and metric) with the prior N(0, λ⁻¹ I) on θ.

    The prior lives in the coordinates θ of the space made by :func:`posterior_space`; in a
    reparametrized chart it is evaluated at θ = h(ψ) (the Jacobian factor of the density is
    already part of the space).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> X = torch.randn(10, 1, dtype=torch.float64); y = torch.randn(10, 1, dtype=torch.float64)
    >>> space, theta = posterior_space(nn.Linear(1, 1).double(), (X, y), likelihood="regression")
    >>> with_prior_precision(space, 4.0).binding.prior_precision
    4.0
    """
    binding = posterior_binding(space, "with_prior_precision")
    lam_old = binding.prior_precision
    assert lam_old is not None
    base = space.loss_function
    to_root = root_map(space)

    def loss(p: Tensor) -> Tensor:
        t = to_root(p)
        return base(p) + gaussian_prior_nll(t, prior_precision) - gaussian_prior_nll(t, lam_old)

    return space.with_loss(loss).with_binding(binding.replace(prior_precision=prior_precision))
