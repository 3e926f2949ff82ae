r"""Function-preserving attacks on a generalization measure, and the adversary that uses them.

Two kinds (docs/math.md §1, §5; the paper's Figure 1):

- **Symmetry**: a *different point* in the same chart that computes the same function. For a
  network whose hidden activations are positively homogeneous (ReLU, leaky ReLU, identity):
  :func:`layerwise_alpha` (Dinh et al. 2017: layer l's weight ×α_l, its bias ×Π_{k≤l} α_k,
  Π_l α_l = 1) and :func:`per_neuron` (hidden unit j: incoming weights and bias ×s_j,
  outgoing weights ÷s_j). Each returns a new module.
- **Reparametrization**: the *same point* written in another chart, a :class:`ModelChart`
  (charts by parameter name for ``ParameterSpace.reparametrize``, and the point ψ with h(ψ) =
  w): per-layer ``Scale`` (:func:`scale_chart`), ``WeightNorm`` with a chosen ‖v‖
  (:func:`weight_norm_chart`), an elementwise nonlinear chart (:func:`elementwise_chart`).

:func:`attack` applies either kind by name with one strength c (c = 1 is the identity for
"layerwise_alpha", "per_neuron", "scale" and "weight_norm"); :func:`adversary` picks one
strength per model from a finite set to push Kendall's τ(measure, gap) as far as it goes.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
>>> other = layerwise_alpha(net, [8.0, 1 / 8])        # another point, the same function
>>> x = torch.randn(5, 3, dtype=torch.float64)
>>> bool(torch.allclose(net(x), other(x), rtol=1e-12, atol=0))
True
>>> round(float(other[0].weight.norm() / net[0].weight.norm()), 12)
8.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...reparam import Reparametrization, Scale, Sinh, WeightNorm
from ...space import ParameterSpace
from .statistics import kendall_tau

__all__ = [
    "ATTACKS",
    "AdversaryResult",
    "ModelChart",
    "adversary",
    "adversary_search",
    "attack",
    "elementwise_chart",
    "layerwise_alpha",
    "linear_layers",
    "per_neuron",
    "scale_chart",
    "weight_norm_chart",
]

#: Attack names: two symmetries, and the per-model reparametrization (per-layer ``Scale``).
ATTACKS = ("reparametrization", "layerwise_alpha", "per_neuron")

_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of a feed-forward net, in order.

    Raises ``ValueError`` unless the model is a chain of Linear layers and positively
    homogeneous activations (ReLU, LeakyReLU, Identity), e.g.
    ``covariant.zoo.architectures.MLP(..., activation="relu")``: the symmetries below
    preserve the function of such nets only.
    """
    children = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    bad = [type(m).__name__ for m in children if not isinstance(m, (nn.Linear, *_HOMOGENEOUS))]
    linears = [m for m in children if isinstance(m, nn.Linear)]
    if bad or not linears:
        raise ValueError(
            "the rescaling symmetries need an nn.Sequential of Linear layers and positively "
            f"homogeneous activations (ReLU, LeakyReLU, Identity); found {bad or 'no Linear'}"
        )
    return linears


def layerwise_alpha(model: nn.Module, alphas: Sequence[float]) -> nn.Module:
    r"""Dinh et al.'s layer-wise rescaling: the same function at another point.

    Linear layer l (of L) gets W_l ← α_l W_l and b_l ← (Π_{k≤l} α_k) b_l. With positive α and
    a positively homogeneous activation the pre-activations of layer l are scaled by
    Π_{k≤l} α_k, so the output is scaled by Π_l α_l, which must be 1.

    Parameters
    ----------
    model : nn.Module
        A feed-forward ReLU net (:func:`linear_layers`). It is not modified.
    alphas : sequence of float
        One positive factor per Linear layer, with product 1 (relative tolerance 1e-12).

    Returns
    -------
    nn.Module
        A float64 deep copy with rescaled parameters (float64 so that the function is kept
        to ~1e-15, not to the rounding of float32 weights).
    """
    net = copy.deepcopy(model).double()
    layers = linear_layers(net)
    a = [float(x) for x in alphas]
    if len(a) != len(layers):
        raise ValueError(f"layerwise_alpha: {len(layers)} Linear layers, {len(a)} alphas")
    if min(a) <= 0 or abs(math.fsum(math.log(x) for x in a)) > 1e-12:
        raise ValueError(f"layerwise_alpha: alphas must be positive with product 1, got {a}")
    cum = 1.0
    with torch.no_grad():
        for layer, alpha in zip(layers, a, strict=True):
            cum *= alpha
            layer.weight.mul_(alpha)
            if layer.bias is not None:
                layer.bias.mul_(cum)
    return net


def per_neuron(model: nn.Module, scales: Sequence[Tensor | Sequence[float]]) -> nn.Module:
    r"""Per-neuron positive rescaling: the same function at another point.

    For hidden layer l (the output of Linear layer l, l < L−1) with scales s ∈ ℝ^{n_l}_{>0}:
    W_l ← diag(s) W_l, b_l ← s ⊙ b_l, W_{l+1} ← W_{l+1} diag(s)⁻¹.

    Parameters
    ----------
    scales : sequence of tensors
        One positive vector per hidden layer (L − 1 of them), of that layer's width.

    Returns a float64 deep copy, like :func:`layerwise_alpha`.
    """
    net = copy.deepcopy(model).double()
    layers = linear_layers(net)
    if len(scales) != len(layers) - 1:
        raise ValueError(f"per_neuron: {len(layers) - 1} hidden layers, {len(scales)} scales")
    with torch.no_grad():
        for l_in, l_out, s in zip(layers[:-1], layers[1:], scales, strict=True):
            s = torch.as_tensor(s, dtype=l_in.weight.dtype, device=l_in.weight.device)
            if s.shape != (l_in.out_features,) or not bool((s > 0).all()):
                raise ValueError(
                    f"per_neuron: scales must be positive vectors of length "
                    f"{l_in.out_features}, got shape {tuple(s.shape)}"
                )
            l_in.weight.mul_(s[:, None])
            if l_in.bias is not None:
                l_in.bias.mul_(s)
            l_out.weight.div_(s[None, :])
    return net


@dataclass(frozen=True)
class ModelChart:
    r"""A chart of a model's parameters, and which point ψ (with h(ψ) = w) to evaluate at.

    Attributes
    ----------
    charts : mapping of str to Reparametrization
        Parameter names (or glob patterns) to charts, for ``space.reparametrize(charts)``.
    v_scale : float
        For ``WeightNorm`` blocks (a submersion): ψ's direction part is v = v_scale · w, a
        point of the gauge orbit with ‖v‖ = v_scale ‖w‖ (1.0: ``h.inverse(w)``).
    name : str
        A label for reports.
    """

    charts: Mapping[str, Reparametrization] = field(default_factory=dict)
    v_scale: float = 1.0
    name: str = "chart"

    def apply(self, space: ParameterSpace, theta: Tensor) -> tuple[ParameterSpace, Tensor]:
        """The space in this chart and the point ψ that represents ``theta``."""
        new = space.reparametrize(dict(self.charts))
        assert new.chart is not None and new.layout is not None
        psi = new.chart.inverse(theta)
        if self.v_scale != 1.0:
            parts = new.layout.unflatten(psi)
            parts = {k: (v * self.v_scale if k.endswith(".v") else v) for k, v in parts.items()}
            psi = new.layout.flatten(parts)
        return new, psi


def scale_chart(model: nn.Module, c: float) -> ModelChart:
    """Per-layer ``Scale``: the parameters of Linear layer l are θ = c^{(−1)^l} ψ (NTK-style)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    charts = {f"{n}.{p}": Scale(float(c) ** ((-1) ** i))
              for i, n in enumerate(names) for p in ("weight", "bias")}
    return ModelChart(charts, name=f"scale({c:g})")


def weight_norm_chart(model: nn.Module, c: float) -> ModelChart:
    """``WeightNorm`` on every Linear weight, at the point with ‖v‖ = c ‖w‖ per row."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ModelChart({f"{n}.weight": WeightNorm() for n in names}, v_scale=float(c),
                      name=f"weight_norm(|v|={c:g}|w|)")


def elementwise_chart(model: nn.Module, c: float) -> ModelChart:
    """A nonlinear elementwise chart θ = sinh(c ψ)/c on every parameter (c > 0)."""
    return ModelChart({"*": Sinh(float(c))}, name=f"sinh({c:g})")


def attack(
    kind: str, model: nn.Module, strength: float, *, seed: int = 0
) -> tuple[nn.Module, ModelChart | None]:
    r"""Apply one attack of strength c to a model: ``(model', chart)``.

    - ``"layerwise_alpha"``: α = (c, 1, …, 1, 1/c) (first and last Linear layers).
    - ``"per_neuron"``: s_j = c^{u_j} per hidden unit, u_j ~ U(−1, 1) from ``seed``.
    - ``"reparametrization"`` (per-layer ``Scale``, :func:`scale_chart`), ``"weight_norm"``,
      ``"elementwise"``: the model unchanged and a :class:`ModelChart`.

    The symmetries return ``(new_model, None)``; the charts ``(model, chart)``.
    """
    c = float(strength)
    if not c > 0:
        raise ValueError(f"attack: strength must be > 0, got {strength}")
    if kind == "layerwise_alpha":
        n = len(linear_layers(model))
        alphas = [1.0] * n
        alphas[0], alphas[-1] = c, 1.0 / c
        return layerwise_alpha(model, alphas if n > 1 else [1.0]), None
    if kind == "per_neuron":
        gen = torch.Generator().manual_seed(int(seed))
        layers = linear_layers(model)
        scales = [c ** (2 * torch.rand(m.out_features, generator=gen, dtype=torch.float64) - 1)
                  for m in layers[:-1]]
        return per_neuron(model, scales), None
    charts: dict[str, Callable[[nn.Module, float], ModelChart]] = {
        "reparametrization": scale_chart, "weight_norm": weight_norm_chart,
        "elementwise": elementwise_chart}
    if kind not in charts:
        raise ValueError(f"attack: unknown kind {kind!r}; use one of {ATTACKS} or "
                         "'weight_norm', 'elementwise'")
    return model, charts[kind](model, c)


@dataclass
class AdversaryResult:
    """What :func:`adversary` found.

    ``tau_before``: τ(measure, gap) unattacked; ``tau_down`` / ``tau_up``: the greedy searches
    toward −1 and +1; ``tau_after``: the more extreme of the two (farthest from
    ``tau_before``); ``choice``: the chosen strength per model for ``tau_after`` (None: left
    unattacked);
    ``max_rel_change``: max over models and strengths of |μ' − μ| / |μ| (as
    ``covariant.check_invariance`` reports) where the attacked measure is defined;
    ``num_evaluations``: measure evaluations; ``num_undefined``: those that were undefined
    (NaN: e.g. a chart that is degenerate at a model's point), which the adversary never picks.
    """

    tau_before: float
    tau_after: float
    tau_down: float
    tau_up: float
    choice: list[float | None]
    max_rel_change: float
    num_evaluations: int
    num_undefined: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _greedy(values: np.ndarray, gap: np.ndarray, sign: float, max_sweeps: int) -> np.ndarray:
    """Coordinate descent on sign·τ: each model in turn takes its best candidate."""
    n, k = values.shape
    pick = np.zeros(n, dtype=int)

    def tau(p: np.ndarray) -> float:
        t = kendall_tau(values[np.arange(n), p], gap)
        return -math.inf if math.isnan(t) else sign * t

    best = tau(pick)
    for _ in range(max_sweeps):
        changed = False
        for i in range(n):
            keep = pick[i]
            for j in range(k):
                if j == keep:
                    continue
                pick[i] = j
                t = tau(pick)
                if t > best + 1e-15:
                    best, keep, changed = t, j, True
            pick[i] = keep
        if not changed:
            break
    return pick


def adversary_search(
    values: np.ndarray, gap: Sequence[float], *, max_sweeps: int = 20
) -> tuple[float, float, np.ndarray, np.ndarray]:
    r"""Greedy search over a table ``values[i, j]`` (model i under candidate j; column 0 is
    the unattacked value). Returns (τ_down, τ_up, choice_down, choice_up).

    From the unattacked choice, each sweep visits the models in order and moves each to the
    candidate that most lowers (raises) τ given the others; sweeps repeat until none changes
    (at most ``max_sweeps``). A local optimum of a discrete problem: it bounds how far an
    adversary can push τ from below, which suffices to show a measure is attackable.
    """
    v, g = np.asarray(values, dtype=np.float64), np.asarray(gap, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != g.size:
        raise ValueError("adversary_search: values must be (models, candidates) matching gap")
    down, up = _greedy(v, g, -1.0, max_sweeps), _greedy(v, g, 1.0, max_sweeps)
    rows = np.arange(g.size)
    return (kendall_tau(v[rows, down], g), kendall_tau(v[rows, up], g), down, up)


def adversary(
    evaluate: Callable[[int, float], float],
    gap: Sequence[float],
    strengths: Sequence[float],
    baseline: Sequence[float],
    *,
    max_sweeps: int = 20,
) -> AdversaryResult:
    r"""Push Kendall's τ(measure, gap) with one attack strength per model.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(i, c)``: the measure of model i after the attack of strength c (e.g.
        :func:`attack` then a measure of :mod:`.measures`). Called once per model and strength.
    gap : sequence of float
        The generalization gap of each model.
    strengths : sequence of float
        The candidate strengths (the unattacked model is always a candidate too).
    baseline : sequence of float
        The unattacked measure of each model.

    Returns
    -------
    AdversaryResult
        τ before, after (the more extreme of the searches toward −1 and +1,
        :func:`adversary_search`), the choice, and the measure's largest relative change.
    """
    base = np.asarray(baseline, dtype=np.float64)
    n = base.size
    cols = [base] + [np.array([float(evaluate(i, c)) for i in range(n)]) for c in strengths]
    table = np.stack(cols, axis=1)
    scale = np.maximum(np.abs(base), np.finfo(np.float64).tiny)[:, None]
    changes = np.abs(table - base[:, None]) / scale
    undefined = int(np.isnan(table[:, 1:]).sum())
    rel = float(np.nanmax(changes)) if not bool(np.isnan(changes).all()) else math.nan
    before = kendall_tau(base, gap)
    t_down, t_up, down, up = adversary_search(table, gap, max_sweeps=max_sweeps)
    after, pick = (t_down, down) if abs(t_down - before) >= abs(t_up - before) else (t_up, up)
    if math.isnan(after):
        after, pick = before, np.zeros(n, dtype=int)
    cand: list[float | None] = [None, *[float(c) for c in strengths]]
    return AdversaryResult(before, after, t_down, t_up, [cand[j] for j in pick], rel,
                           n * len(strengths), undefined)
