r"""Validation of the hyperparameters of :class:`~covariant.optim.RiemannianGD`.

Example
-------
>>> _check_options(0.1, 0.0, 0.0, 0.0, False, 1e-3, 1e-6, 200, "auto", "weights")
>>> _check_options(-1.0, 0.0, 0.0, 0.0, False, 0.0, 1e-6, 200, "auto", "weights")
Traceback (most recent call last):
...
ValueError: Invalid learning rate: -1.0
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..metrics import Metric

__all__: list[str] = []


def _check_options(
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    damping: float, cg_tol: float, cg_maxiter: int, cg_preconditioner: str,
    damping_reference: str | Metric,
) -> None:
    """Raise ValueError for an invalid hyperparameter of :class:`RiemannianGD`."""
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"RiemannianGD: damping must be a finite number >= 0, got {damping}")
    if not (cg_tol > 0):
        raise ValueError(f"RiemannianGD: cg_tol must be > 0, got {cg_tol}")
    if int(cg_maxiter) < 1:
        raise ValueError(f"RiemannianGD: cg_maxiter must be >= 1, got {cg_maxiter}")
    if cg_preconditioner not in ("auto", "none"):
        raise ValueError(
            f"RiemannianGD: cg_preconditioner must be 'auto' or 'none', got "
            f"{cg_preconditioner!r}"
        )
    if not (isinstance(damping_reference, Metric) or damping_reference in ("weights",
                                                                             "identity")):
        raise ValueError(
            f"RiemannianGD: damping_reference must be 'weights', 'identity' or a Metric, "
            f"got {damping_reference!r}"
        )


def _sgd_move(param_groups: list[dict[str, Any]], state_of: Any,
              directions: list[Tensor | None]) -> None:
    """Momentum (as ``torch.optim.SGD``) and the update p ← p − α d, in place."""
    i = 0
    for group in param_groups:
        mu, tau = group["momentum"], group["dampening"]
        for p in group["params"]:
            d = directions[i]
            i += 1
            if d is None:
                continue
            if mu != 0:
                state = state_of[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(d).detach()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(mu).add_(d, alpha=1 - tau)
                d = d.add(buf, alpha=mu) if group["nesterov"] else buf
            p.add_(d, alpha=-group["lr"])
