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
same binding, reached through ``space.binding``. The forward follows the module's train/eval
mode; batch norm in training mode uses the statistics of each batch and never updates its
running statistics (:func:`batch_stats_buffers`; docs/api.md, "Batch norm and dropout").

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
>>> bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()   # batch statistics
>>> binding, theta = ModelBinding.from_module(bn, nn.MSELoss(), (X, torch.zeros(8, 4)))
>>> float(binding.forward(theta, X).mean(0).abs().max()) < 1e-6, int(bn[1].num_batches_tracked)
(True, 0)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

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


#: Modules whose forward in training mode is random (dropout, RReLU).
TRAIN_MODE_RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout, nn.RReLU)
#: Normalization layers that keep running statistics in buffers: in training mode they
#: normalize by the statistics of the batch and update the running ones in place.
TRAIN_MODE_BATCH_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: The buffers of a :data:`TRAIN_MODE_BATCH_STATS` layer that training mode updates.
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def train_mode_modules(model: nn.Module) -> list[str]:
    """Names (and kinds) of the submodules in training mode whose forward is random: dropout
    with p > 0, RReLU, and multi-head attention with dropout.

    Batch norm in training mode is not among them: the functional forward
    (:func:`functional_forward`) normalizes by the batch statistics without updating the
    running ones (:func:`batch_stats_buffers`), so its loss is a function of the parameters.
    """
    out = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if (isinstance(m, TRAIN_MODE_RANDOM) and getattr(m, "p", 1.0) > 0) or (
                isinstance(m, nn.MultiheadAttention) and m.dropout > 0):
            out.append(f"{name or '<model>'} ({type(m).__name__})")
    return out


def batch_stats_buffers(model: nn.Module) -> dict[str, None]:
    """``{buffer name: None}`` for the running statistics of the batch-norm layers that are in
    training mode now and track running statistics.

    Passed to ``torch.func.functional_call`` with the other tensors, the None values make
    each such layer normalize by the statistics of its input batch (momentum-free, what
    ``track_running_stats=False`` does) and leave the module's running statistics and
    ``num_batches_tracked`` untouched: an analysis never mutates them.
    """
    out: dict[str, None] = {}
    for name, m in model.named_modules():
        if m.training and isinstance(m, TRAIN_MODE_BATCH_STATS) and m.track_running_stats:
            for buf in RUNNING_STATS:
                if getattr(m, buf, None) is not None:
                    out[f"{name}.{buf}" if name else buf] = None
    return out


def batch_stats_active(model: nn.Module) -> bool:
    """True when some batch-norm (or instance-norm) layer of ``model`` normalizes by the
    statistics of its input now: training mode, or no running statistics."""
    return any(isinstance(m, TRAIN_MODE_BATCH_STATS)
               and (m.training or getattr(m, "running_mean", None) is None)
               for m in model.modules())


#: Positional parameters of ``F.batch_norm`` and ``F.instance_norm`` (the 6th is ``training``,
#: resp. ``use_input_stats``).
_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "batch_stats",
              "momentum", "eps")


def normalize_by_batch_statistics(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                                  eps: float, dims: list[int]) -> Tensor:
    """(x − mean) / √(var + eps) · weight + bias, mean and biased variance over ``dims``
    (channel axis 1), written with plain tensor operations."""
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    y = xc * torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class BatchStatisticsMode(TorchFunctionMode):
    """Inside it, ``F.batch_norm`` and ``F.instance_norm`` that normalize by the statistics
    of their input without running statistics run as plain tensor operations
    (:func:`normalize_by_batch_statistics`); every other call is unchanged.

    Why: the fused kernels give wrong second derivatives under some ``torch.func``
    compositions (``torch.func.hessian``, i.e. jacfwd over jacrev, and jacrev over jacrev
    are off by O(1) in the weight-input block for batch norm in training mode with torch
    2.13; ``jacfwd(grad)``, batched ``grad``-of-``grad`` HVPs and plain autograd are
    right), while the plain operations are exact under every transform. Momentum and
    running statistics play no part: nothing is updated.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm or func is F.instance_norm:
            a = dict(zip(_NORM_ARGS, args, strict=False))
            a.update({("batch_stats" if k in ("training", "use_input_stats") else k): v
                      for k, v in kwargs.items()})
            if (a.get("batch_stats", func is F.instance_norm)
                    and a.get("running_mean") is None and a.get("running_var") is None):
                x = a["input"]  # batch norm: over the batch and space; instance norm: space
                dims = [*([0] if func is F.batch_norm else []), *range(2, x.dim())]
                return normalize_by_batch_statistics(x, a.get("weight"), a.get("bias"),
                                                     a.get("eps", 1e-5), dims)
        return func(*args, **kwargs)


def check_model_data(model: nn.Module, layout: ParameterLayout, batches: tuple[Batch, ...],
                     theta: Tensor, forward: Forward, owner: str = "from_module") -> None:
    """Typed errors, before any analysis, for a model and data that cannot define one loss.

    - a module in training mode whose forward is random (:func:`train_mode_modules`;
      :class:`~covariant.errors.UnsupportedStructureError`: call ``model.eval()``);
    - a batch of one example for a model with batch norm in training mode, whose batch
      statistics need two (:class:`ShapeMismatchError`);
    - floating inputs X of another dtype than the model's parameters, and a target batch
      whose length differs from its input batch (:class:`ShapeMismatchError`);
    - a model that fails on the first input batch, e.g. X of the wrong width
      (:class:`ShapeMismatchError`, with the model's own message);
    - a random forward that no module's mode shows (:func:`check_deterministic`).
    """
    stochastic = train_mode_modules(model)
    if stochastic:
        raise UnsupportedStructureError(
            f"{owner}: the model is in training mode, where {', '.join(stochastic)} make(s) "
            "its loss random (dropout), so it has no single loss function to differentiate; "
            "call model.eval() before from_module (batch norm may stay in training mode: "
            "docs/api.md, 'Batch norm and dropout')"
        )
    if batch_stats_buffers(model):
        for i, (X, _) in enumerate(batches):
            if isinstance(X, Tensor) and X.ndim > 0 and X.shape[0] == 1:
                raise ShapeMismatchError(
                    f"{owner}: batch {i} has one example, but the model has batch norm in "
                    "training mode, which normalizes each batch by its own statistics (each "
                    "batch given is one batch-norm batch); pass batches of two or more "
                    "examples, or call model.eval() to use the running statistics"
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
    cuda = [theta.device.index or 0] if theta.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # the user's RNG untouched
            outputs = [forward(theta, X0), forward(theta, X0)]
    except (RuntimeError, ValueError, IndexError) as err:
        raise ShapeMismatchError(
            f"{owner}: the model fails on the first batch of inputs, X of shape "
            f"{tuple(getattr(X0, 'shape', ()))} (is its width the model's input size?): {err}"
        ) from err
    check_deterministic(*outputs, owner)


def check_deterministic(first: Any, second: Any, owner: str) -> None:
    """:class:`~covariant.errors.UnsupportedStructureError` if two forward passes at the same
    point and inputs disagree: the forward is random (``F.dropout(x, training=True)`` called
    directly in a custom ``forward``, where no module in training mode shows it), so the loss
    is not one function of θ. Outputs that are not tensors are not compared.
    """
    if not (isinstance(first, Tensor) and isinstance(second, Tensor)) \
            or first.shape != second.shape or not first.is_floating_point():
        return
    scale = float(first.abs().max()) if first.numel() else 0.0
    gap = float((first - second).abs().max()) if first.numel() else 0.0
    if gap > 1e-6 * scale + 1e-30:  # GPU reductions may differ in the last bits, not more
        raise UnsupportedStructureError(
            f"{owner}: two forward passes at the same parameters and inputs differ (by up to "
            f"{gap:.3g}): the model's forward is random, e.g. it calls F.dropout with "
            "training=True. Flatness and curvature need one loss function: call model.eval() "
            "(and pass training=self.training to functional dropout) before from_module"
        )


def functional_forward(model: nn.Module, layout: ParameterLayout) -> Forward:
    """(θ, X) ↦ model(X) with the parameters of ``layout`` taken from the flat θ.

    Frozen parameters and buffers keep the values they have now. The forward runs in the
    dtype of θ: floating inputs, frozen parameters and buffers of another dtype are cast to
    it (as the curvature metrics cast their data), so a float64 point of a float32 model is
    evaluated in float64.

    Train/eval differences follow the module's mode at each call. Batch norm in training
    mode normalizes by the statistics of the batch X, functionally: its running statistics
    are passed as None (:func:`batch_stats_buffers`), never read nor updated.

    Inside ``torch.func`` transforms of θ (the GGN/Fisher products, the connection terms,
    Hessians) torch 2.13's fused kernels are replaced by forms whose second derivatives are
    exact under every composition: attention takes the math kernel
    (:func:`covariant.autodiff.second_order`), layer norm runs as its composite, and batch
    norm in training mode as plain tensor operations (:class:`BatchStatisticsMode`). On plain
    tensors the fused kernels stay (exact there, and faster).
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
        state = {**fixed_as(p.dtype), **batch_stats_buffers(model), **layout.unflatten(p)}
        if not is_transformed(p):
            return functional_call(model, state, (X,))
        with second_order(), composite_layer_norm():
            if not batch_stats_active(model):
                return functional_call(model, state, (X,))
            with BatchStatisticsMode():
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
        (:func:`check_model_data`): a module in training mode with dropout, a batch of one
        example for batch norm in training mode, inputs of another dtype than the model,
        targets of another batch size, or inputs the model cannot take raise a typed error.
        The binding's forward runs in the dtype of the point it is given, and follows the
        module's train/eval mode (see :func:`functional_forward`).
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
