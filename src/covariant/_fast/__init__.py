"""Optional fast paths, and the one home of every use of private torch API.

Everything here has a generic counterpart elsewhere in the package; each fast path is tested
against it (``tests/_fast/``):

- :mod:`covariant._fast.taylor`: :class:`QuadraticForm`, vᵀ∇²L(p)v by second-order Taylor
  mode, against Hessian-vector products (``ParameterSpace.hvp(p, v, riemannian=False)``);
- :func:`is_plain` / :func:`is_transformed`: which tensors may take the autograd
  double-backward paths, against the ``torch.func`` paths that work on any tensor;
- :func:`second_order` (:mod:`covariant._fast.kernels`): the math attention kernel for
  second-order work, against the fused kernels, which only first-order paths can use;
  :func:`composite_layer_norm`: layer norm written out, where torch's forward-mode
  derivative of its kernel is differentiated again.

Nothing outside ``covariant._fast`` touches ``torch._C``, ``torch._ops`` or
``torch.utils._python_dispatch``.

>>> import torch
>>> from covariant._fast import is_plain, is_transformed
>>> is_plain(torch.zeros(2)), is_transformed(torch.zeros(2))
(True, False)
>>> from covariant._fast import QuadraticForm
>>> float(QuadraticForm(lambda p: (p**2).sum(), torch.ones(3))(torch.ones(3)))
6.0
>>> bool(torch.func.vmap(lambda x: torch.tensor(is_transformed(x)))(torch.zeros(2)).all())
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import composite_layer_norm, second_order
from .taylor import QuadraticForm, TaylorUnsupportedError

__all__ = [
    "QuadraticForm",
    "TaylorUnsupportedError",
    "composite_layer_norm",
    "is_plain",
    "is_taylor_recording",
    "is_transformed",
    "second_order",
    "tensor_version",
]


def is_transformed(x: Tensor) -> bool:
    """True when ``x`` is wrapped by a ``torch.func`` transform (vmap, grad, jvp, ...)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def is_taylor_recording() -> bool:
    """True while a Taylor-mode :class:`QuadraticForm` records a loss: code that the record
    cannot represent (a sum over data-parallel ranks) raises
    :class:`TaylorUnsupportedError` then, so that callers fall back to HVPs."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from .taylor.recording import Recorder

    return any(isinstance(m, Recorder) for m in _get_current_dispatch_mode_stack())


def tensor_version(x: Tensor) -> int:
    """The in-place version counter of ``x``: it changes whenever ``x`` is written in place
    (caches keyed on a tensor use it to notice mutation)."""
    return int(x._version)


def is_plain(*xs: Tensor) -> bool:
    """True for ordinary tensors: not tracked by autograd nor wrapped by ``torch.func``.

    Such tensors may take the faster autograd double-backward paths and may be written into
    preallocated outputs.
    """
    return all(not x.requires_grad and not is_transformed(x) for x in xs)
