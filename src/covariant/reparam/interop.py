"""Charts from PyTorch's own objects: ``torch.nn.utils.parametrize`` parametrization modules
(:func:`from_parametrization`, :func:`split_parametrizations`, :func:`strip_parametrizations`)
and ``torch.distributions`` transforms (:func:`from_transform`).

Example
-------
>>> import torch
>>> from torch.distributions.transforms import ExpTransform
>>> from covariant.reparam import Exp, from_transform
>>> psi = torch.tensor([0.5, -1.0], dtype=torch.float64)
>>> torch.equal(from_transform(ExpTransform())(psi), Exp()(psi))
True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import vjp
from torch.nn.utils import parametrize

from ..errors import DomainError, ShapeMismatchError
from .base import Reparametrization

__all__ = ["from_parametrization", "from_transform", "split_parametrizations",
           "strip_parametrizations"]

#: where ``ParameterSpace.from_module(..., metric_chart=...)`` takes the metric of a model that
#: uses ``torch.nn.utils.parametrize``: in the plain weights w (pulled back; invariant) or in
#: the model's own coordinates (naive)
METRIC_CHARTS = ("weights", "native")


class _FromParametrization(Reparametrization):
    def __init__(
        self, module: torch.nn.Module, shape: torch.Size | None, is_bijection: bool | None
    ) -> None:
        self.module = module
        self.shape = shape
        self._user_bijection = is_bijection
        self._orig_shapes: list[torch.Size] | None = None
        if shape is not None:
            self._setup()

    def _setup(self) -> None:
        assert self.shape is not None
        with torch.no_grad():
            probe = torch.randn(self.shape, dtype=torch.float64)
            try:
                orig = self.module.right_inverse(probe)
            except (AttributeError, NotImplementedError):
                orig = probe
        origs = list(orig) if isinstance(orig, tuple | list) else [orig]
        self._orig_shapes = [torch.Size(o.shape) for o in origs]
        k = sum(math.prod(s) for s in self._orig_shapes)
        n = math.prod(self.shape)
        self.is_bijection = (k == n) if self._user_bijection is None else self._user_bijection

    def bind(self, shape: torch.Size | Sequence[int]) -> _FromParametrization:
        return _FromParametrization(self.module, torch.Size(tuple(shape)), self._user_bijection)

    #: parametrization types seen to lack forward-mode AD (e.g. torch's weight-norm kernel):
    #: remembered so that every later product goes straight to the reverse-mode route
    _NO_FORWARD_AD: ClassVar[set[type]] = set()

    def jvp(self, psi: Tensor, v: Tensor) -> Tensor:
        kind = type(self.module)
        if kind not in self._NO_FORWARD_AD:
            try:
                return super().jvp(psi, v)
            except NotImplementedError:
                self._NO_FORWARD_AD.add(kind)
        # without forward-mode AD, J v is the vjp of the linear map w ↦ Jᵀ w
        w0 = torch.zeros_like(self.forward(psi))
        return vjp(lambda w: self.vjp(psi, w), w0)[1](v)[0]

    def jacobian(self, psi: Tensor) -> Tensor:
        kind = type(self.module)
        if kind not in self._NO_FORWARD_AD:
            try:
                return super().jacobian(psi)
            except NotImplementedError:
                self._NO_FORWARD_AD.add(kind)
        return torch.func.jacrev(self.forward)(psi)

    def original_shapes(self) -> list[torch.Size]:
        """Shapes of the parametrization's original tensors (ψ), once a shape is bound."""
        if self._orig_shapes is None:
            raise ShapeMismatchError(
                "from_parametrization: pass shape=... or apply the chart to a parameter by name"
            )
        return self._orig_shapes

    def psi_dim(self, theta_dim: int) -> int:
        return sum(math.prod(s) for s in self.original_shapes())

    def psi_layout(self, name: str, shape: torch.Size) -> list[tuple[str, torch.Size]]:
        shapes = self.bind(shape).original_shapes()
        if len(shapes) == 1:
            return [(name, shapes[0])]
        return [(f"{name}.original{i}", s) for i, s in enumerate(shapes)]

    def forward(self, psi: Tensor) -> Tensor:
        shapes = self.original_shapes()
        parts, start = [], 0
        for s in shapes:
            n = math.prod(s)
            parts.append(psi[start : start + n].reshape(s))
            start += n
        return self.module(*parts).reshape(-1)

    def inverse_map(self, theta: Tensor) -> Tensor:
        assert self.shape is not None
        try:
            orig = self.module.right_inverse(theta.reshape(self.shape))
        except (AttributeError, NotImplementedError):
            orig = theta.reshape(self.shape)
        origs = list(orig) if isinstance(orig, tuple | list) else [orig]
        return torch.cat([o.reshape(-1) for o in origs])


def from_parametrization(
    module: torch.nn.Module,
    shape: Sequence[int] | None = None,
    *,
    is_bijection: bool | None = None,
) -> Reparametrization:
    """Wrap a ``torch.nn.utils.parametrize`` parametrization module as a chart.

    ``module.forward(*originals)`` gives the weight (θ) and ``module.right_inverse(weight)``
    the originals (ψ, packed flat in order). Several originals (like weight norm's ``(g, v)``)
    make a submersion unless ``is_bijection=True`` says otherwise.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> class Square(nn.Module):
    ...     def forward(self, x): return x * x.abs()
    ...     def right_inverse(self, w): return w.sign() * w.abs().sqrt()
    >>> h = from_parametrization(Square(), shape=(3,))
    >>> h(torch.tensor([1.0, -2.0, 3.0]))
    tensor([ 1., -4.,  9.])
    """
    return _FromParametrization(
        module, None if shape is None else torch.Size(tuple(shape)), is_bijection
    )


class _FromTransform(Reparametrization):
    def __init__(self, transform: Any) -> None:
        self.transform = transform
        if getattr(transform, "event_dim", 0) not in (0, 1):
            raise ShapeMismatchError(
                "from_transform: only transforms with event_dim 0 (elementwise) or 1 (vectors) "
                "are supported"
            )

    def forward(self, psi: Tensor) -> Tensor:
        return self.transform(psi)

    def inverse_map(self, theta: Tensor) -> Tensor:
        return self.transform.inv(theta)

    def check_theta(self, theta: Tensor) -> None:
        support = self.transform.codomain
        if not bool(support.check(theta).all()):
            raise DomainError(
                f"from_transform: theta lies outside the transform's codomain {support}"
            )

    def log_abs_det_jacobian(self, psi: Tensor) -> Tensor:
        out = self.transform.log_abs_det_jacobian(psi, self.transform(psi))
        return out.sum()

    def __repr__(self) -> str:
        return f"from_transform({self.transform})"


def from_transform(transform: Any) -> Reparametrization:
    """Wrap a ``torch.distributions.transforms.Transform`` T as the chart θ = T(ψ).

    Example
    -------
    >>> import torch
    >>> from torch.distributions.transforms import ExpTransform
    >>> h = from_transform(ExpTransform())
    >>> float(h.log_abs_det_jacobian(torch.tensor([0.5, 1.5])))
    2.0
    """
    return _FromTransform(transform)


def split_parametrizations(
    model: torch.nn.Module,
) -> tuple[torch.nn.Module, dict[str, Reparametrization], dict[str, Tensor]]:
    """Split a model that uses ``torch.nn.utils.parametrize`` into a plain model and its charts.

    Returns a deep copy of ``model`` whose parametrized tensors are plain parameters holding
    their current values (the w chart), the charts ``{name: from_parametrization(...)}`` that
    give back the model's own coordinates, and the model's original tensors keyed by the
    names they get in the reparametrized layout. So a model with
    ``torch.nn.utils.parametrizations.weight_norm`` can be analysed in both charts:

    >>> import torch
    >>> from torch import nn
    >>> import covariant as cv
    >>> net = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)).double()
    >>> plain, charts, originals = split_parametrizations(net)
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> w_space, theta = cv.ParameterSpace.from_module(plain, nn.MSELoss(), (X, y))
    >>> gv_space = w_space.reparametrize(charts)          # the (g, v) chart, metric carried
    >>> psi = gv_space.layout.flatten(originals)
    >>> bool(torch.allclose(gv_space.chart(psi), theta))
    True
    >>> direct, psi_direct = cv.ParameterSpace.from_module(net, nn.MSELoss(), (X, y))  # the same
    >>> torch.equal(psi_direct, psi), direct.parent.dim == w_space.dim
    (True, True)
    """
    plain = copy.deepcopy(model)
    charts: dict[str, Reparametrization] = {}
    originals: dict[str, Tensor] = {}
    for mod_name, module in list(plain.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            plist = module.parametrizations[tensor_name]
            if len(plist) != 1:
                raise ShapeMismatchError(
                    f"split_parametrizations: {mod_name}.{tensor_name} has {len(plist)} chained "
                    "parametrizations; only one per tensor is supported"
                )
            full = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            shape = getattr(module, tensor_name).shape
            origs = (
                [plist.original]
                if hasattr(plist, "original")
                else [getattr(plist, f"original{i}") for i in range(len(list(plist.parameters())))]
            )
            chart = from_parametrization(copy.deepcopy(plist[0]), shape)
            layout = chart.psi_layout(full, shape)
            for (new_name, _), orig in zip(layout, origs, strict=True):
                originals[new_name] = orig.detach().clone()
            charts[full] = chart
        strip_parametrizations(module)
    for name, param in plain.named_parameters():
        if name not in charts:
            originals[name] = param.detach().clone()
    return plain, charts, originals


def strip_parametrizations(module: nn.Module) -> dict[str, Tensor]:
    """Make one parametrized module plain, in place: each parametrized tensor becomes a plain
    ``nn.Parameter`` holding its current value. Returns those values by tensor name.

    ``torch.nn.utils.parametrize.remove_parametrizations`` edits the parametrized *class*,
    which ``torch`` creates once per module and a deep copy shares with the original model.
    This function instead puts back the module's plain class (the parametrized class's base)
    on this instance only, so use it on a copy (``copy.deepcopy(model)``) and the original
    model keeps its charts. A module without parametrizations is left as it is.

    Example
    -------
    >>> import copy, torch
    >>> from torch import nn
    >>> net = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    >>> twin = copy.deepcopy(net)
    >>> values = strip_parametrizations(twin)
    >>> type(twin) is nn.Linear, sorted(values)
    (True, ['weight'])
    >>> sorted(n for n, _ in twin.named_parameters())
    ['bias', 'weight']
    >>> torch.nn.utils.parametrize.is_parametrized(net)   # the original keeps its chart
    True
    """
    if not parametrize.is_parametrized(module):
        return {}
    values = {t: getattr(module, t).detach().clone() for t in module.parametrizations.keys()}
    module.__class__ = module.__class__.__bases__[0]
    delattr(module, "parametrizations")
    for tensor_name, value in values.items():
        module.register_parameter(tensor_name, nn.Parameter(value))
    return values


def metric_in_weights(metric_chart: str) -> bool:
    """Check ``from_module``'s ``metric_chart``: True for ``"weights"`` (the metric is given in
    the plain weights w and pulled back to a parametrized model's own coordinates, so the
    answers do not depend on the parametrization), False for ``"native"`` (the metric in the
    model's own coordinates: the naive view).

    >>> metric_in_weights("weights"), metric_in_weights("native")
    (True, False)
    >>> metric_in_weights("w")
    Traceback (most recent call last):
    ...
    ValueError: from_module: metric_chart must be 'weights' (...) or 'native' (...), got 'w'
    """
    if not isinstance(metric_chart, str):
        raise TypeError(f"from_module: metric_chart must be a string, got "
                        f"{type(metric_chart).__name__}")
    if metric_chart not in METRIC_CHARTS:
        raise ValueError(
            "from_module: metric_chart must be 'weights' (the metric in the plain weights, "
            "pulled back: invariant) or 'native' (in the model's own coordinates: naive), "
            f"got {metric_chart!r}"
        )
    return metric_chart == "weights"
