r"""Charts of a parameter space: reparametrizations :math:`\theta = h(\psi)`.

A :class:`Reparametrization` maps *new* coordinates ψ to *original* ones θ, the same direction
as ``torch.nn.utils.parametrize``. Every chart provides, on flat 1-D tensors,

- ``h(psi)`` and a (right) inverse ``h.inverse(theta)``;
- ``jvp(psi, v) = J v`` and ``vjp(psi, w) = Jᵀ w`` with ``J = ∂θ/∂ψ``;
- ``inverse_jvp(psi, u) = J⁺ u`` and ``inverse_vjp(psi, z) = J⁺ᵀ z``, where ``J⁺ = J⁻¹`` for a
  bijection and a right inverse ``Jᵀ(JJᵀ)⁻¹`` for a submersion (docs/math.md §5);
- ``log_abs_det_jacobian(psi) = log|det J|`` (bijections only).

Generic defaults come from ``torch.func``; the built-in charts override them with closed forms,
and the tests check every closed form against ``torch.func.jacfwd``.

Modules: :mod:`~covariant.reparam.base` (the protocol, linearizations, ``Identity``,
``Compose``), :mod:`~covariant.reparam.functions` (``FromFunctions``),
:mod:`~covariant.reparam.elementwise` (``Exp``, ``Log``, ``Softplus``, ``Sinh``, ``Cubic``,
``Scale``, ``Affine``, ``Polar``), :mod:`~covariant.reparam.weight_norm` (``WeightNorm``),
:mod:`~covariant.reparam.blocks` (charts by parameter name) and
:mod:`~covariant.reparam.interop` (torch parametrizations and distribution transforms).

Example
-------
>>> import torch
>>> from covariant.reparam import Compose, Exp, Scale
>>> h = Compose(Scale(2.0), Exp())              # θ = 2 exp(ψ)
>>> psi = torch.tensor([0.0, 1.0], dtype=torch.float64)
>>> h(psi)
tensor([2.0000, 5.4366], dtype=torch.float64)
>>> float(h.log_abs_det_jacobian(psi))          # 2 log 2 + Σψ
2.386294361119891
"""

from .base import Compose, Identity, Linearization, Reparametrization
from .blocks import ParameterwiseReparametrization
from .elementwise import Affine, Cubic, Elementwise, Exp, Log, Polar, Scale, Sinh, Softplus
from .functions import FromFunctions
from .interop import (
    from_parametrization,
    from_transform,
    split_parametrizations,
    strip_parametrizations,
)
from .weight_norm import WeightNorm

__all__ = [
    "Affine",
    "Compose",
    "Cubic",
    "Elementwise",
    "Exp",
    "FromFunctions",
    "Identity",
    "Linearization",
    "Log",
    "ParameterwiseReparametrization",
    "Polar",
    "Reparametrization",
    "Scale",
    "Sinh",
    "Softplus",
    "WeightNorm",
    "from_parametrization",
    "from_transform",
    "split_parametrizations",
    "strip_parametrizations",
]

