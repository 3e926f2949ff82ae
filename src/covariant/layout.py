r"""A functional view of ``nn.Module``: the parameter layout and the model binding.

A point of a model's parameter space is one flat 1-D tensor. :class:`ParameterLayout` records
which slice of it belongs to which named parameter, so that charts can be applied by name and
``space.unflatten(p)`` gives back the parameter dict.

:class:`ModelBinding` is everything a model-aware computation (GGN, Fisher, natural gradient,
Laplace) needs to know about the model behind a space, as one frozen value: the functional
forward f(θ, X), the loss function ℓ, the batches with their weights w_b, and, for a Bayesian
posterior, the likelihood and the prior. The loss it defines is

.. math::

    L(θ) = \sum_b w_b\, ℓ(f(θ, X_b), y_b).

``ParameterSpace.from_module`` creates one; every space reparametrized from it carries the
same binding, reached through ``space.binding``.

Example
-------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
>>> layout = ParameterLayout.from_module(model)
>>> layout.names
('0.weight', '0.bias', '2.weight', '2.bias')
>>> p = layout.flatten(dict(model.named_parameters()))
>>> p.shape
torch.Size([11])
>>> layout.unflatten(p)["2.weight"].shape
torch.Size([1, 2])
>>> X, y = torch.randn(8, 3), torch.randn(8, 1)
>>> binding, theta = ModelBinding.from_module(model, nn.MSELoss(), [(X[:5], y[:5]), (X[5:], y[5:])])
>>> binding.weights                       # batch size / total size, for a 'mean' loss
(0.625, 0.375)
>>> bool(torch.allclose(binding.loss(theta), nn.MSELoss()(model(X), y)))
True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._fast import composite_layer_norm, is_transformed, second_order
from .errors import ShapeMismatchError, UnsupportedStructureError

__all__ = ["ModelBinding", "ParameterLayout", "as_batches", "match_names"]

Forward = Callable[[Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and slices of the parameters packed into one flat vector.

    Parameters
    ----------
    names : tuple of str
        Parameter names, in packing order.
    shapes : tuple of torch.Size
        Shape of each parameter.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ShapeMismatchError("layout: names and shapes must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ShapeMismatchError(f"layout: duplicate parameter names in {self.names}")

    @classmethod
    def from_module(cls, module: nn.Module, *, trainable_only: bool = True) -> ParameterLayout:
        """Layout of ``module.named_parameters()`` (only those that require grad by default)."""
        items = [
            (n, p.shape)
            for n, p in module.named_parameters()
            if p.requires_grad or not trainable_only
        ]
        return cls(tuple(n for n, _ in items), tuple(torch.Size(s) for _, s in items))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Iterable[int]]) -> ParameterLayout:
        """Layout from an ordered mapping ``name -> shape``."""
        return cls(tuple(shapes), tuple(torch.Size(tuple(s)) for s in shapes.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        """Total number of coordinates."""
        return sum(self.numels)

    @property
    def slices(self) -> dict[str, slice]:
        """``name -> slice`` of the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels, strict=True):
            out[name] = slice(start, start + n)
            start += n
        return out

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Pack a parameter dict into one flat vector, in layout order."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ShapeMismatchError(f"flatten: parameters {missing} are missing")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = params[name]
            if t.shape != shape:
                raise ShapeMismatchError(
                    f"flatten: parameter {name!r} has shape {tuple(t.shape)}, "
                    f"the layout expects {tuple(shape)}"
                )
            parts.append(t.reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, p: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into the parameter dict (views, differentiable)."""
        if p.ndim != 1 or p.shape[0] != self.dim:
            raise ShapeMismatchError(
                f"unflatten: expected a flat point of length {self.dim}, got shape {tuple(p.shape)}"
            )
        # torch.split: one backward node for all pieces (slicing builds a full-length zero
        # vector per parameter in the backward pass; measured in benchmarks/)
        pieces = torch.split(p, list(self.numels))
        return {
            name: piece.view(shape)
            for name, shape, piece in zip(self.names, self.shapes, pieces, strict=True)
        }


def match_names(names: Iterable[str], patterns: Iterable[str]) -> dict[str, str]:
    """Map each parameter name to the first glob pattern that matches it.

    A pattern that matches nothing raises :class:`~covariant.errors.ShapeMismatchError`, since a
    silently ignored chart would change the analysis without telling anyone.

    >>> match_names(["0.weight", "0.bias", "2.weight"], ["*.weight"])
    {'0.weight': '*.weight', '2.weight': '*.weight'}
    """
    names = list(names)
    out: dict[str, str] = {}
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ShapeMismatchError(
                f"reparametrize: pattern {pattern!r} matches no parameter; "
                f"the parameters are {names}"
            )
        for n in hits:
            out.setdefault(n, pattern)
    return {n: out[n] for n in names if n in out}


def as_batches(data: Any, owner: str = "from_module") -> tuple[Batch, ...]:
    """``(X, y)`` or an iterable of ``(X, y)`` batches, as a tuple of batches."""
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        return ((data[0], data[1]),)
    batches = tuple((X, y) for X, y in data)
    if not batches:
        raise ValueError(f"{owner}: data is empty")
    return batches


def batch_weights(loss_fn: LossFn, batches: Iterable[Batch]) -> tuple[float, ...]:
    """w_b = (batch size) / (total size) for a ``'mean'`` loss, 1 for ``'sum'``.

    With these weights Σ_b w_b ℓ(f(θ, X_b), y_b) equals the loss of the whole data set as one
    batch.
    """
    batches = tuple(batches)
    total = sum(X.shape[0] for X, _ in batches)
    mean = getattr(loss_fn, "reduction", "mean") == "mean"
    return tuple((X.shape[0] / total if mean else 1.0) for X, _ in batches)


def model_dtype(model: nn.Module, layout: ParameterLayout) -> torch.dtype | None:
    """The one floating dtype of the parameters in ``layout``, or None if they mix dtypes."""
    params = dict(model.named_parameters())
    dtypes = {params[n].dtype for n in layout.names if n in params}
    return dtypes.pop() if len(dtypes) == 1 else None


#: Modules whose forward in training mode is random (dropout, RReLU), and batch norms, which
#: in training mode update their running statistics in place (not possible under torch.func).
TRAIN_MODE_RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout, nn.RReLU)
TRAIN_MODE_BATCH_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def train_mode_modules(model: nn.Module) -> list[str]:
    """Names (and kinds) of the submodules in training mode whose forward is random or
    mutates the model: dropout with p > 0, RReLU, multi-head attention with dropout, and batch
    norm that tracks running statistics. (Batch norm with ``track_running_stats=False`` uses
    batch statistics functionally and is accepted.)
    """
    out = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        random = (isinstance(m, TRAIN_MODE_RANDOM) and getattr(m, "p", 1.0) > 0) or (
            isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
        if random or (isinstance(m, TRAIN_MODE_BATCH_STATS) and m.track_running_stats):
            out.append(f"{name or '<model>'} ({type(m).__name__})")
    return out


def check_model_data(model: nn.Module, layout: ParameterLayout, batches: tuple[Batch, ...],
                     theta: Tensor, forward: Forward, owner: str = "from_module") -> None:
    """Typed errors, before any analysis, for a model and data that cannot define one loss.

    - a module in training mode whose forward is random or updates running statistics
      (:func:`train_mode_modules`; :class:`~covariant.errors.UnsupportedStructureError`:
      call ``model.eval()``);
    - floating inputs X of another dtype than the model's parameters, and a target batch
      whose length differs from its input batch (:class:`ShapeMismatchError`);
    - a model that fails on the first input batch, e.g. X of the wrong width
      (:class:`ShapeMismatchError`, with the model's own message).
    """
    stochastic = train_mode_modules(model)
    if stochastic:
        raise UnsupportedStructureError(
            f"{owner}: the model is in training mode, where {', '.join(stochastic)} make(s) "
            "its loss random (dropout) or update(s) running statistics in place (batch norm), "
            "so it has no single loss function to differentiate; call model.eval() before "
            "from_module"
        )
    dtype = model_dtype(model, layout)
    for i, (X, y) in enumerate(batches):
        if not (isinstance(X, Tensor) and isinstance(y, Tensor)):
            continue
        if dtype is not None and X.is_floating_point() and X.dtype != dtype:
            raise ShapeMismatchError(
                f"{owner}: the inputs X have dtype {X.dtype} but the model's parameters are "
                f"{dtype}; convert one of them: X.to({dtype}), or model.to({X.dtype}) "
                "(and the targets with it)"
            )
        if X.ndim > 0 and y.ndim > 0 and X.shape[0] != y.shape[0]:
            raise ShapeMismatchError(
                f"{owner}: batch {i} has {X.shape[0]} inputs (X {tuple(X.shape)}) but "
                f"{y.shape[0]} targets (y {tuple(y.shape)})"
            )
    X0 = batches[0][0]
    try:
        with torch.no_grad():
            forward(theta, X0)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ShapeMismatchError(
            f"{owner}: the model fails on the first batch of inputs, X of shape "
            f"{tuple(getattr(X0, 'shape', ()))} (is its width the model's input size?): {err}"
        ) from err


def functional_forward(model: nn.Module, layout: ParameterLayout) -> Forward:
    """(θ, X) ↦ model(X) with the parameters of ``layout`` taken from the flat θ.

    Frozen parameters and buffers keep the values they have now. The forward runs in the
    dtype of θ: floating inputs, frozen parameters and buffers of another dtype are cast to
    it (as the curvature metrics cast their data), so a float64 point of a float32 model is
    evaluated in float64. Inside ``torch.func`` transforms (the GGN/Fisher products, the
    connection terms, Hessians) it runs under :func:`covariant.autodiff.second_order`:
    attention takes the math kernel, which has forward-mode AD and a double backward, and layer
    norm runs as its composite (torch's forward-mode derivative of the layer-norm kernel cannot
    be differentiated again correctly); on plain tensors it keeps the fused kernels.
    """
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in layout.names}
    fixed = {**frozen, **dict(model.named_buffers())}
    cast: dict[torch.dtype, dict[str, Tensor]] = {}

    def fixed_as(dtype: torch.dtype) -> dict[str, Tensor]:
        if dtype not in cast:
            cast[dtype] = {n: t.to(dtype) if t.is_floating_point() else t
                           for n, t in fixed.items()}
        return cast[dtype]

    def forward(p: Tensor, X: Tensor) -> Tensor:
        if isinstance(X, Tensor) and X.is_floating_point() and X.dtype != p.dtype:
            X = X.to(p.dtype)
        state = {**fixed_as(p.dtype), **layout.unflatten(p)}
        if is_transformed(p):
            with second_order(), composite_layer_norm():
                return functional_call(model, state, (X,))
        return functional_call(model, state, (X,))

    return forward


@dataclass(frozen=True)
class ModelBinding:
    """The model behind a parameter space, as one frozen value.

    Parameters
    ----------
    forward : callable
        (θ, X) ↦ f(θ, X), with θ the flat point of the space that ``from_module`` built (the
        root space of every chart derived from it).
    loss_fn : callable
        ℓ(output, target), e.g. ``nn.CrossEntropyLoss()``.
    batches : tuple of (X, y)
    weights : tuple of float
        w_b of each batch in L(θ) = Σ_b w_b ℓ(f(θ, X_b), y_b).
    model : nn.Module, optional
        The module itself (for predictions and checkpoints).
    likelihood : {"classification", "regression"}, optional
        Set for a Bayesian posterior (``covariant.laplace.posterior_space``).
    sigma_noise : float
        σ of a Gaussian likelihood.
    prior_precision : float or Tensor, optional
        λ of the prior N(0, λ⁻¹ I) on θ, for a Bayesian posterior.
    """

    forward: Forward
    loss_fn: LossFn
    batches: tuple[Batch, ...]
    weights: tuple[float, ...]
    model: nn.Module | None = None
    likelihood: str | None = None
    sigma_noise: float = 1.0
    prior_precision: float | Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.batches) != len(self.weights):
            raise ShapeMismatchError(
                f"ModelBinding: {len(self.batches)} batches but {len(self.weights)} weights"
            )

    @classmethod
    def from_module(
        cls, model: nn.Module, loss_fn: LossFn, data: Any, **fields: Any
    ) -> tuple[ModelBinding, Tensor]:
        """The binding of ``model``'s trainable parameters, and its current flat point.

        ``data`` is an ``(X, y)`` pair or an iterable of batches; ``fields`` set the optional
        fields (likelihood, prior, ...). The model and data are checked first
        (:func:`check_model_data`): a module in training mode with dropout or batch norm,
        inputs of another dtype than the model, targets of another batch size, or inputs the
        model cannot take raise a typed error. The binding's forward runs in the dtype of
        the point it is given (see :func:`functional_forward`).
        """
        layout = ParameterLayout.from_module(model)
        params = dict(model.named_parameters())
        theta = layout.flatten({n: params[n].detach() for n in layout.names})
        batches = as_batches(data)
        forward = functional_forward(model, layout)
        check_model_data(model, layout, batches, theta, forward)
        binding = cls(
            forward, loss_fn, batches, batch_weights(loss_fn, batches), model=model, **fields,
        )
        return binding, theta

    @property
    def is_bayesian(self) -> bool:
        """True when the binding carries a likelihood and a prior (a model posterior)."""
        return self.likelihood is not None

    def loss(self, p: Tensor) -> Tensor:
        """L(θ) = Σ_b w_b ℓ(f(θ, X_b), y_b)."""
        out = p.new_zeros(())
        for w, (X, y) in zip(self.weights, self.batches, strict=True):
            out = out + w * self.loss_fn(self.forward(p, X), y)
        return out

    def forward_in_chart(self, chart: Callable[[Tensor], Tensor] | None) -> Forward:
        """(ψ, X) ↦ f(h(ψ), X) for a chart θ = h(ψ) of the root coordinates."""
        if chart is None:
            return self.forward
        root_forward = self.forward

        def forward(psi: Tensor, X: Tensor) -> Tensor:
            return root_forward(chart(psi), X)

        return forward

    def replace(self, **changes: Any) -> ModelBinding:
        """A copy with some fields changed (the binding itself is immutable)."""
        return dataclasses.replace(self, **changes)
