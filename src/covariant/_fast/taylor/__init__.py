r"""Second-order Taylor mode: vᵀ ∇²L(p) v pushed forward through a recorded loss.

The parts, along what they do:

- :mod:`.recording`: one evaluation of the loss at p recorded as aten operations (private
  torch API: ``TorchDispatchMode``);
- :mod:`.coefficients`: how the rules read and combine Taylor coefficients;
- :mod:`.rules` and :mod:`.nonlinear_rules`: the rule of each kind of operation;
- :mod:`.dispatch`: which rule each aten operation takes;
- :mod:`.quadratic_form`: :class:`QuadraticForm`, the user of all of the above.

Its generic counterpart is the Hessian-vector product ``ParameterSpace.hvp(p, v,
riemannian=False)``; ``tests/_fast/test_taylor.py`` compares the two.

Example
-------
>>> import torch
>>> loss = lambda p: (p**3).sum()
>>> p = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> float(QuadraticForm(loss, p)(torch.tensor([1.0, 1.0], dtype=torch.float64)))  # 6·(1 + 2)
18.0
"""

from __future__ import annotations

from ...errors import TaylorUnsupportedError
from .quadratic_form import QuadraticForm

__all__ = ["QuadraticForm", "TaylorUnsupportedError"]
