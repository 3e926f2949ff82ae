r"""The registry of generalization measures: ``MEASURES[name](model, data, ctx) -> MeasureValue``.

``data = (X, y)`` is a training subset (X is converted to float64); the model is copied and
converted to float64; ``ctx`` is a :class:`MeasureContext` (seed, chart, ε, damping, ...).
Every measure reports ``value``, ``stderr`` (0.0 when exact), ``seconds`` and ``info``.

Four kinds (``MEASURES[name].kind``):

- ``"classic"``: tr ∇²L, λ_max(∇²L), log det(∇²L + εI), ‖∇²L‖_F, in the coordinates the
  model is evaluated in (:mod:`.measures_spectral`, group "classic").
- ``"chart_invariant"``: the same spectral measures of E = G⁻¹Hess with the Euclidean metric of
  w carried along: equal to the classic ones in w, invariant under reparametrization.
- ``"function_metric"``: E with G = GGN or Fisher, damped by λ·diag(1/w²) (invariant), and
  the effective dimension tr(GGN (GGN + α diag(1/w²))⁻¹), the informative variant; invariant
  under reparametrization and under positive diagonal symmetries (the derivation and the
  choice of damping: :mod:`.measures_spectral`).
- ``"baseline"``: adaptive sharpness (average, worst case), Fisher–Rao norm, σ′_mag, L2
  norm, distance to initialization, path norm (:mod:`.measures_baselines`).

``MEASURES[name].invariant_under`` lists the attacks of :func:`.attacks.attack` under which
the measure is *exactly* unchanged (float64 rounding): "reparametrization" (per-layer Scale),
"weight_norm", "elementwise", "layerwise_alpha", "per_neuron". The tests check every entry,
and that the classic measures move.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
>>> data = (torch.randn(20, 3), torch.randint(0, 3, (20,)))
>>> ctx = MeasureContext()
>>> hess, inv = MEASURES["hess_trace"](net, data, ctx), MEASURES["inv_trace"](net, data, ctx)
>>> hess.value == inv.value, MEASURES["inv_trace"].kind     # equal in the weights' chart
(True, 'chart_invariant')
>>> round(MEASURES["l2_norm"](net, data, ctx).value, 6) == round(float(torch.cat(
...     [p.detach().double().reshape(-1) for p in net.parameters()]).norm()), 6)
True
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import measures_baselines as baselines
from .attacks import attack
from .measures_common import Data, MeasureContext, MeasureValue
from .measures_spectral import effective_dimension, spectral_group

__all__ = [
    "ALL_ATTACKS",
    "DEFAULT_STRENGTHS",
    "KINDS",
    "MEASURES",
    "GeneralizationMeasure",
    "MeasureContext",
    "MeasureValue",
    "default_names",
    "evaluate",
    "evaluate_attacked",
    "invariance_table",
]

KINDS = ("classic", "chart_invariant", "function_metric", "baseline")
#: Every attack name of :func:`.attacks.attack`: three charts, two symmetries.
ALL_ATTACKS = ("reparametrization", "weight_norm", "elementwise", "layerwise_alpha",
               "per_neuron")
_CHARTS = ("reparametrization", "weight_norm", "elementwise")
#: Default strengths of :func:`invariance_table` (strong enough to move a classic measure
#: more than 10× under per-layer Scale and both symmetries, on the tests' MLP).
DEFAULT_STRENGTHS = {"reparametrization": 10.0, "weight_norm": 30.0, "elementwise": 3.0,
                     "layerwise_alpha": 30.0, "per_neuron": 100.0}

Fn = Callable[[nn.Module, Data, MeasureContext], tuple[float, float, dict[str, Any]]]


@dataclass(frozen=True)
class GeneralizationMeasure:
    """One registered measure: call it as ``measure(model, data, ctx)``."""

    name: str
    kind: str
    fn: Fn
    description: str
    invariant_under: tuple[str, ...] = ()

    def __call__(self, model: nn.Module, data: Data,
                 ctx: MeasureContext | None = None) -> MeasureValue:
        ctx = MeasureContext() if ctx is None else ctx
        t0 = time.perf_counter()
        value, stderr, info = self.fn(model, data, ctx)
        info = dict(info)
        seconds = info.pop("seconds", None)
        elapsed = time.perf_counter() - t0
        if seconds is not None and "group" in info:
            info["shared"] = info["group"]  # one spectrum serves the whole group
        return MeasureValue(float(value), float(stderr),
                            float(elapsed if seconds is None else seconds), info)


def _spectral(group: str, measure: str) -> Fn:
    def fn(model: nn.Module, data: Data, ctx: MeasureContext) -> tuple[float, float, dict]:
        return spectral_group(model, data, ctx, group)[measure]

    return fn


_SPECTRAL_TEXT = {
    "trace": "tr E", "max_eig": "λ_max(E)", "logdet": "log|det(E + εI)|",
    "frobenius": "√tr E²",
}


def _build() -> dict[str, GeneralizationMeasure]:
    reg: dict[str, GeneralizationMeasure] = {}
    groups = (("hess", "classic", "classic", "E = ∇²L in the evaluated coordinates", ()),
              ("inv", "chart_invariant", "chart_invariant",
               "E = G⁻¹Hess, G = I of w carried along", _CHARTS),
              ("ggn", "ggn", "function_metric", "E = (GGN + λ diag(1/w²))⁻¹ Hess", ALL_ATTACKS),
              ("fisher", "fisher", "function_metric", "E = (Fisher + λ diag(1/w²))⁻¹ Hess",
               ALL_ATTACKS))
    for prefix, group, kind, text, inv in groups:
        for m, what in _SPECTRAL_TEXT.items():
            if m == "logdet" and kind == "function_metric":
                what = "log|det E| (null eigenvalues dropped)"
            name = f"{prefix}_{m}"
            reg[name] = GeneralizationMeasure(name, kind, _spectral(group, m),
                                              f"{what}; {text}", tuple(inv))
    reg["ggn_effdim"] = GeneralizationMeasure(
        "ggn_effdim", "function_metric", lambda m, d, c: effective_dimension(m, d, c),
        "tr(GGN (GGN + α diag(1/w²))⁻¹): effective dimension, scale-invariant prior",
        ALL_ATTACKS)
    base: Sequence[tuple[str, Fn, str, tuple[str, ...]]] = (
        ("adaptive_sharpness_avg", baselines.adaptive_sharpness_avg,
         "E[L(θ + ρ|θ|z)] − L(θ) (Andriushchenko et al. 2023)",
         ("reparametrization", "layerwise_alpha", "per_neuron")),
        ("adaptive_sharpness_worst", baselines.adaptive_sharpness_worst,
         "max_{|δ| ≤ ρ|θ|} L(θ + δ) − L(θ) (Andriushchenko et al. 2023)",
         ("reparametrization", "layerwise_alpha", "per_neuron")),
        ("fisher_rao_norm", baselines.fisher_rao_norm, "√(θᵀFθ) (Liang et al. 2019)",
         ("reparametrization", "weight_norm", "layerwise_alpha", "per_neuron")),
        ("sigma_mag", baselines.sigma_mag, "1/σ′² magnitude-aware PAC-Bayes (Jiang eq. 61)",
         ()),
        ("l2_norm", baselines.l2_norm, "‖θ‖₂", ()),
        ("distance_to_init", baselines.distance_to_init, "‖θ − θ₀‖₂", ()),
        ("path_norm", baselines.path_norm, "√(Σ_paths Π w²) (Neyshabur et al. 2015)",
         ALL_ATTACKS),
    )
    for name, fn, text, inv in base:
        reg[name] = GeneralizationMeasure(name, "baseline", fn, text, inv)
    return reg


#: name → :class:`GeneralizationMeasure`.
MEASURES: dict[str, GeneralizationMeasure] = _build()


def default_names(ctx: MeasureContext) -> list[str]:
    """Every measure that applies: all of them ("distance_to_init" only with ``ctx.init``)."""
    return [n for n in MEASURES if n != "distance_to_init" or ctx.init is not None]


def evaluate(model: nn.Module, data: Data, ctx: MeasureContext | None = None,
             names: Sequence[str] | None = None) -> dict[str, MeasureValue]:
    """Every measure in ``names`` (default: all; "distance_to_init" only with ``ctx.init``)
    of one model; the spectral groups are computed once and shared through ``ctx.cache``."""
    ctx = MeasureContext() if ctx is None else ctx
    names = default_names(ctx) if names is None else names
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise KeyError(f"unknown measures {unknown}; known: {sorted(MEASURES)}")
    return {n: MEASURES[n](model, data, ctx) for n in names}


def evaluate_attacked(name: str, model: nn.Module, data: Data, ctx: MeasureContext,
                      kind: str, strength: float, *, seed: int = 0) -> MeasureValue:
    """``MEASURES[name]`` after :func:`.attacks.attack` ``(kind, model, strength, seed=seed)``:
    a symmetry evaluates the transformed model, a chart evaluates ``model`` in that chart
    (``ctx`` with its ``chart`` replaced). The ``evaluate`` callable of
    :func:`.attacks.adversary` is ``lambda i, c: evaluate_attacked(name, models[i], data,
    ctx, kind, c, seed=i).value``."""
    attacked, chart = attack(kind, model, strength, seed=seed)
    return MEASURES[name](attacked, data, dataclasses.replace(ctx, chart=chart))


def invariance_table(
    model: nn.Module,
    data: Data,
    ctx: MeasureContext | None = None,
    names: Sequence[str] | None = None,
    strengths: dict[str, float] | None = None,
    *,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Each measure at one model, unattacked and after each attack of ``ALL_ATTACKS``: which
    measure survives which attack, measured.

    Returns ``{name: {"value": μ, "attacked": {attack: μ'}, "rel_change": {attack:
    |μ' − μ| / |μ|}}}``. ``strengths`` maps attack names to strengths (default
    ``DEFAULT_STRENGTHS``; an attack left out is skipped).
    """
    ctx = MeasureContext() if ctx is None else ctx
    strengths = DEFAULT_STRENGTHS if strengths is None else strengths
    base = evaluate(model, data, ctx, names)
    table: dict[str, dict[str, Any]] = {
        n: {"value": v.value, "attacked": {}, "rel_change": {}} for n, v in base.items()}
    for kind in ALL_ATTACKS:
        if kind not in strengths:
            continue
        for n, row in table.items():
            v = evaluate_attacked(n, model, data, ctx, kind, strengths[kind], seed=seed).value
            row["attacked"][kind] = v
            row["rel_change"][kind] = abs(v - row["value"]) / max(abs(row["value"]), 1e-300)
    return table
