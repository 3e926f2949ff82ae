"""Optional fast paths, and the one home of every use of private torch API.

Everything here has a generic counterpart elsewhere in the package; each fast path is tested
against it. Nothing outside ``covariant._fast`` touches ``torch._C`` or
``torch.utils._python_dispatch``.

>>> import torch
>>> from covariant._fast import is_plain, is_transformed
>>> is_plain(torch.zeros(2)), is_transformed(torch.zeros(2))
(True, False)
>>> bool(torch.func.vmap(lambda x: torch.tensor(is_transformed(x)))(torch.zeros(2)).all())
True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_plain", "is_transformed"]


def is_transformed(x: Tensor) -> bool:
    """True when ``x`` is wrapped by a ``torch.func`` transform (vmap, grad, jvp, ...)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def is_plain(*xs: Tensor) -> bool:
    """True for ordinary tensors: not tracked by autograd nor wrapped by ``torch.func``.

    Such tensors may take the faster autograd double-backward paths and may be written into
    preallocated outputs.
    """
    return all(not x.requires_grad and not is_transformed(x) for x in xs)
