r"""K-FAC natural gradient inside :class:`~covariant.optim.RiemannianGD`: the Kronecker
factors of the module's weights w, refreshed every T steps and averaged, and the closed-form
solve with them.

At step k (counting from 0) with ``k % T == 0`` the factors of
:class:`covariant.metrics.KFAC` (or ``EKFAC``) are taken on that step's batch at the current
weights (undamped) and folded into a running average, factor-wise
(``KroneckerFactored.averaged``):

.. math::

    F_j = d_j\, F_{j-1} + (1 - d_j)\, F^{new}_j, \qquad d_j = \min(1 - 1/j,\ decay)

for the j-th refresh (j = 1, 2, …): the first refreshes are the plain mean of all factors so
far (no bias towards an initial value), later ones an exponential average with weight
``decay`` (Martens & Grosse 2015, §5). ``decay = 0`` keeps only the newest factors. Damping
is added exactly afterwards, K + λI in w (``with_damping``), and the solve is closed form
(per block through the eigendecompositions of A and B).

The factors, the step counter and the refresh counter are the optimizer's state
(:meth:`_KFACState.state_dict`), so a resumed run takes the identical steps.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(3, 2, bias=False).double()
>>> batch = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
>>> state = _KFACState("kfac", update_every=2, decay=0.9)
>>> [state.advance(model, nn.MSELoss(), batch) for _ in range(4)]    # refreshed at 0 and 2
[True, False, True, False]
>>> state.refreshes, state.steps
(2, 4)
>>> F = state.factors                     # mean of two identical factors: the factors
>>> K = metrics.KFAC(model, nn.MSELoss(), [batch]).dense(model.weight.detach().reshape(-1))
>>> bool(torch.allclose(F.dense(), K))
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from .. import metrics
from ..metrics.kronecker import KroneckerBlock, KroneckerFactored
from ..space import ParameterSpace

__all__: list[str] = []

#: Builds the model's space on one batch: (module, loss_fn, batch) ↦ ParameterSpace.
SpaceOf = Callable[[nn.Module, Any, tuple[Tensor, Tensor]], ParameterSpace]

#: Metric names of :class:`~covariant.optim.RiemannianGD` solved with Kronecker factors.
KFAC_METRICS = ("kfac", "ekfac")

#: Default refresh period T of the factors (steps); see :class:`RiemannianGD`.
DEFAULT_UPDATE_EVERY = 10

#: Default weight of the running average of the factors.
DEFAULT_DECAY = 0.95


#: How RiemannianGD damps the K-FAC factors (``kfac_damping``).
KFAC_DAMPINGS = ("exact", "factored")


def check_kfac_options(update_every: int, decay: float, metric_kwargs: dict[str, Any],
                       damping_mode: str = "exact", kind: str = "kfac") -> None:
    """Raise ValueError for invalid K-FAC options of :class:`RiemannianGD`."""
    if damping_mode not in KFAC_DAMPINGS:
        raise ValueError(f"RiemannianGD: kfac_damping must be one of {KFAC_DAMPINGS}, got "
                         f"{damping_mode!r}")
    if damping_mode == "factored" and kind != "kfac":
        raise ValueError("RiemannianGD: kfac_damping='factored' needs metric='kfac' (EK-FAC's "
                         "eigenvalues are not Kronecker products)")
    if isinstance(update_every, bool) or int(update_every) != update_every or update_every < 1:
        raise ValueError(f"RiemannianGD: kfac_update_every must be an integer >= 1, got "
                         f"{update_every!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"RiemannianGD: kfac_decay must be in [0, 1), got {decay!r}")
    if "damping" in metric_kwargs:
        raise ValueError("RiemannianGD: pass the K-FAC damping as damping=..., not in "
                         "metric_kwargs (the factors are stored undamped and λI is added "
                         "exactly at each solve)")


def check_kfac_damping(mode: str, metric_name: str, damping_reference: Any) -> None:
    """Raise ValueError unless ``kfac_damping=mode`` fits the optimizer's metric and damping
    reference (factored damping damps K-FAC's factors in w)."""
    if mode != "exact" and (metric_name not in ("kfac", "ekfac")
                            or damping_reference != "weights"):
        raise ValueError("RiemannianGD: kfac_damping='factored' needs metric='kfac' and "
                         "damping_reference='weights' (it damps the factors in w)")


class _KFACState:
    """The running-average factors of one optimizer, its step and refresh counters.

    Parameters
    ----------
    kind : {"kfac", "ekfac"}
    update_every : int
        T: the factors are refreshed at steps 0, T, 2T, …
    decay : float
        Weight of the old average at a refresh (see the module docstring).
    metric_kwargs : dict, optional
        Options of ``KFAC.from_space`` (``fisher_type``, ``kfac_approx``, ``separate_bias``,
        ``mc_samples``, ``seed``, ...), without ``damping``. ``solve_mode="pinv"`` makes the
        optimizer's solve the pseudo-inverse (:attr:`pinv`).
    damping_mode : {"exact", "factored"}
        How :meth:`damped` adds the damping (see there).
    """

    def __init__(self, kind: str, update_every: int = DEFAULT_UPDATE_EVERY,
                 decay: float = DEFAULT_DECAY, metric_kwargs: dict[str, Any] | None = None,
                 damping_mode: str = "exact") -> None:
        self.kind = kind
        self.update_every = int(update_every)
        self.decay = float(decay)
        self.metric_kwargs = dict(metric_kwargs or {})
        check_kfac_options(self.update_every, self.decay, self.metric_kwargs, damping_mode, kind)
        self.damping_mode = damping_mode
        #: solve with the pseudo-inverse of a singular K (``solve_mode="pinv"``)
        self.pinv = self.metric_kwargs.get("solve_mode", "raise") == "pinv"
        self.steps = 0
        self.refreshes = 0
        self.factors: KroneckerFactored | None = None  # undamped, on the module's weights

    def due(self) -> bool:
        """True when the step about to be taken refreshes the factors."""
        return self.factors is None or self.steps % self.update_every == 0

    def advance(self, module: nn.Module, loss_fn: Any, batch: tuple[Tensor, Tensor],
                space_of: SpaceOf | None = None) -> bool:
        """Count one step; refresh the factors on ``batch`` first when due. True if refreshed.
        ``space_of`` builds the model's space on the batch (default
        ``ParameterSpace.from_module``; data-parallel steps pass a space whose products and
        factors are reduced over the ranks)."""
        refresh = self.due()
        if refresh:
            self.refresh(module, loss_fn, batch, space_of)
        self.steps += 1
        return refresh

    def refresh(self, module: nn.Module, loss_fn: Any, batch: tuple[Tensor, Tensor],
                space_of: SpaceOf | None = None) -> None:
        """Fold the factors of ``module`` at its current weights on ``batch`` into the average."""
        if space_of is None:
            space, w = ParameterSpace.from_module(module, loss_fn, batch)
        else:
            space = space_of(module, loss_fn, batch)
            assert space.layout is not None
            w = space.layout.flatten(dict(module.named_parameters())).detach()
        cls = metrics.EKFAC if self.kind == "ekfac" else metrics.KFAC
        with torch.enable_grad():
            new = cls.from_space(space, damping=0.0, **self.metric_kwargs).factors(w.detach())
        j = self.refreshes + 1
        d = min(1.0 - 1.0 / j, self.decay)
        self.factors = new if self.factors is None or d == 0.0 else self.factors.averaged(new, d)
        self.refreshes = j

    def damped(self, lam: float) -> KroneckerFactored:
        """K + λI (``damping_mode="exact"``) or K-FAC's factored Tikhonov damping (``"factored"``,
        :meth:`~covariant.metrics.kronecker.KroneckerFactored.with_factored_damping`), as a new
        ``KroneckerFactored``; the stored factors stay undamped."""
        assert self.factors is not None
        if lam <= 0:
            return self.factors
        if self.damping_mode == "factored":
            return self.factors.with_factored_damping(lam)
        return self.factors.with_damping(lam)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters and factors as plain data and tensors (``torch.save``-able)."""
        return {"steps": self.steps, "refreshes": self.refreshes,
                "factors": None if self.factors is None else _factors_to_dict(self.factors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.refreshes = int(state["refreshes"])
        raw = state["factors"]
        self.factors = None if raw is None else _factors_from_dict(raw)


def _factors_to_dict(F: KroneckerFactored) -> dict[str, Any]:
    blocks = [{f.name: getattr(b, f.name) for f in fields(b)} for b in F.blocks]
    return {"dim": int(F.dim), "blocks": blocks, "rest_index": F.rest_index,
            "rest_diagonal": F.rest_diagonal, "damping": F.damping}


def _factors_from_dict(raw: dict[str, Any]) -> KroneckerFactored:
    blocks = [KroneckerBlock(**b) for b in raw["blocks"]]
    return KroneckerFactored(blocks, int(raw["dim"]), rest_index=raw["rest_index"],
                                     rest_diagonal=raw["rest_diagonal"],
                                     damping=raw["damping"])
