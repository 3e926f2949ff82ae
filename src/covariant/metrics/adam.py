r"""The diagonal geometry an Adam / RMSprop / Adagrad state implies.

G = diag(√v̂ + ε) in the chart where the optimizer ran. It is a constant metric there and is
**not** a tensor under reparametrization (docs/math.md §6): pulled back through a chart it is
not what the optimizer would have built in that chart.

Example
-------
>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
>>> opt = torch.optim.Adam([w], lr=0.1)
>>> w.grad = torch.tensor([0.5, 1.0]); opt.step()
>>> G = AdamMetric(opt)
>>> d = G.diagonal(torch.zeros(2))      # √(v/(1−β₂)) + ε = |g| + ε after one step
>>> bool(torch.allclose(d, torch.tensor([0.5, 1.0]), atol=1e-6))
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import SingularMetricError
from .explicit import Diagonal

__all__ = ["AdamMetric"]



_ADAM_KINDS = ("adam", "rmsprop", "adagrad")
_DEFAULT_EPS = {"adam": 1e-8, "rmsprop": 1e-8, "adagrad": 1e-10}


def _infer_kind(optimizer: torch.optim.Optimizer | None, states: Sequence[Mapping]) -> str:
    if optimizer is not None:
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.NAdam):
            return "adam"
        if isinstance(optimizer, torch.optim.RMSprop):
            return "rmsprop"
        if isinstance(optimizer, torch.optim.Adagrad):
            return "adagrad"
    for st in states:
        if "exp_avg_sq" in st:
            return "adam"
        if "square_avg" in st:
            return "rmsprop"
        if "sum" in st:
            return "adagrad"
    raise ValueError(
        "AdamMetric: cannot tell which optimizer made this state (no 'exp_avg_sq', "
        "'square_avg' or 'sum' entry); pass kind='adam', 'rmsprop' or 'adagrad'"
    )


class AdamMetric(Diagonal):
    r"""The diagonal geometry an Adam / RMSprop / Adagrad state implies: G = diag(√v̂ + ε).

    The optimizer's update is lr · G⁻¹ m (Adam: m̂, RMSprop/Adagrad: the gradient), so G is
    the metric of the chart the optimizer runs in:

    - Adam (and AdamW): v̂ = v / (1 − β₂ᵗ), the bias-corrected second moment
      (``max_exp_avg_sq`` with ``amsgrad``); G = √v̂ + ε, exactly PyTorch's denominator.
    - RMSprop: G = √v + ε (``centered``: √(v − ḡ²) + ε); no bias correction.
    - Adagrad: G = √(Σ g²) + ε.

    The diagonal is frozen when the object is built: a constant metric (no Christoffel
    symbols). It is **not** a tensor under reparametrization (docs/math.md §6): Adam run in another
    chart builds its own squared-gradient statistics there, which are not Jᵀ G J. Use it to
    ask how flat a minimum is *for Adam*, in the chart Adam ran in.

    Parameters
    ----------
    state_or_optimizer : torch.optim.Optimizer, state dict, or {param: state}
        An optimizer, its ``state_dict()`` (params in ``param_groups`` order), or its
        ``.state`` mapping (then ``params`` is required).
    params : sequence of Tensor, optional
        The parameters, in the order of the flat point (e.g. ``model.parameters()``).
        Default: the optimizer's parameters in ``param_groups`` order.
    eps : float, optional
        ε; by default each parameter group's ``eps`` (PyTorch's default for ``kind`` with a
        bare ``.state`` mapping, which holds no hyperparameters).
    kind : {"adam", "rmsprop", "adagrad"}, optional
        Inferred from the optimizer type or the state's keys when left out.
    beta2 : float, optional
        β₂ of Adam; by default each parameter group's. Required with a bare ``.state``
        mapping. (With ``amsgrad``, ``max_exp_avg_sq`` is used whenever the state has it.)

    Example
    -------
    >>> import torch, covariant as cv
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> opt = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    >>> for _ in range(3):
    ...     opt.zero_grad(); (w**2).sum().backward(); opt.step()
    >>> G = cv.metrics.AdamMetric(opt)
    >>> v = opt.state[w]["exp_avg_sq"]
    >>> bool(torch.allclose(G.diag, (v / (1 - 0.99**3)).sqrt() + 1e-8))
    True
    """

    def __init__(
        self,
        state_or_optimizer: Any,
        params: Iterable[Tensor] | None = None,
        eps: float | None = None,
        kind: str | None = None,
        *,
        beta2: float | None = None,
    ) -> None:
        entries = _optimizer_entries(state_or_optimizer, params)
        optimizer = (
            state_or_optimizer
            if isinstance(state_or_optimizer, torch.optim.Optimizer)
            else None
        )
        if kind is None:
            kind = _infer_kind(optimizer, [st for st, _ in entries])
        kind = kind.lower()
        if kind not in _ADAM_KINDS:
            raise ValueError(f"AdamMetric: kind must be one of {_ADAM_KINDS}, got {kind!r}")
        parts = []
        for i, (st, group) in enumerate(entries):
            e = float(eps) if eps is not None else float(group.get("eps", _DEFAULT_EPS[kind]))
            parts.append(_denominator(kind, st, group, e, i, beta2).reshape(-1))
        diag = torch.cat(parts).detach().clone()
        if not bool((diag > 0).all()):
            raise SingularMetricError(
                f"AdamMetric: {int((diag <= 0).sum())} diagonal entries are <= 0 (eps = 0 and "
                "no gradient signal yet). Use eps > 0, or damp it: "
                "covariant.metrics.Damped(G, lam, reference=...)."
            )
        super().__init__(diag)
        self.diag = diag
        self.kind = kind

    def __repr__(self) -> str:
        return f"AdamMetric(kind={self.kind!r}, dim={self.diag.numel()})"


def _optimizer_entries(
    x: Any, params: Iterable[Tensor] | None
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(per-parameter state, its param group) pairs, in the order of the flat point."""
    if isinstance(x, torch.optim.Optimizer):
        group_of = {id(p): g for g in x.param_groups for p in g["params"]}
        order = (
            [p for g in x.param_groups for p in g["params"]] if params is None else list(params)
        )
        out = []
        for i, p in enumerate(order):
            if id(p) not in group_of:
                raise ValueError(f"AdamMetric: parameter {i} is not managed by the optimizer")
            out.append((x.state.get(p, {}), group_of[id(p)]))
        return out
    if isinstance(x, Mapping) and "state" in x and "param_groups" in x:
        if params is not None:
            raise ValueError(
                "AdamMetric: a state_dict orders parameters by its param_groups; do not pass "
                "params with it (or pass the optimizer itself)"
            )
        return [
            (x["state"].get(i, {}), g) for g in x["param_groups"] for i in g["params"]
        ]
    if isinstance(x, Mapping):
        if params is None:
            raise ValueError(
                "AdamMetric: with an optimizer's .state mapping, pass params=... (the "
                "parameters in the order of the flat point)"
            )
        return [(x.get(p, {}), {}) for p in params]
    raise TypeError(
        "AdamMetric: expected a torch.optim.Optimizer, its state_dict(), or its .state "
        f"mapping, got {type(x).__name__}"
    )


def _denominator(
    kind: str,
    st: Mapping[str, Any],
    group: Mapping[str, Any],
    eps: float,
    i: int,
    beta2: float | None,
) -> Tensor:
    key = {"adam": "exp_avg_sq", "rmsprop": "square_avg", "adagrad": "sum"}[kind]
    if key not in st:
        raise ValueError(
            f"AdamMetric: parameter {i} has no {key!r} in its {kind} state; run at least one "
            "optimizer step first (or pass the right kind=...)"
        )
    if kind == "adam":
        amsgrad = group.get("amsgrad", True) and "max_exp_avg_sq" in st
        v = st["max_exp_avg_sq"] if amsgrad else st[key]
        if beta2 is None:
            if "betas" not in group:
                raise ValueError(
                    "AdamMetric: the bias correction needs β₂, which a bare .state mapping "
                    "does not hold; pass beta2=... (or the optimizer, or its state_dict())"
                )
            beta2 = float(group["betas"][1])
        step = float(st["step"])
        bc2 = 1 - beta2**step
        return v.sqrt() / math.sqrt(bc2) + eps
    if kind == "rmsprop":
        v = st[key]
        if group.get("centered", False) and "grad_avg" in st:
            v = v - st["grad_avg"] ** 2
        return v.sqrt() + eps
    return st[key].sqrt() + eps


