r"""Experiment: which optimizers are invariant under reparametrization, and to what order
(docs/math.md §6; ``covariant reproduce optimization``).

Parts, each saved to ``optimization.json`` as soon as it is done (a rerun with the same
settings skips finished parts), with figures drawn from the JSON:

(a) **Trajectories** on the 2-D loss of docs/math.md §8 under two nonlinear charts (h = φ⁻¹ of
    docs/math.md §8, and polar coordinates), every run mapped back to θ over the loss contours:
    GD in θ, plain GD in ψ, Riemannian GD in ψ (linear, second-order, geodesic) and the
    gradient flow. → ``optimization_trajectories.png``
(b) **Order of invariance.** Distance at a fixed horizon T between the ψ-run (mapped to θ)
    and the θ-run, against the step size α, with fitted log-log slopes: plain GD in ψ ≈ 0,
    linear ≈ 1, second-order ≈ 2, geodesic exact up to the ODE tolerance.
    → ``optimization_order.png``
(c) **A network.** An MLP on MNIST-1D, full batch: GD in w; GD in the weight-norm chart
    (g, v) (``torch.nn.utils.parametrizations.weight_norm``); Riemannian GD in (g, v) with the
    pulled-back metric; natural gradient (GGN) in both charts. Loss curves, and the distance
    between trajectories mapped to w. → ``optimization_network.png``
(d) **NTK vs standard parametrization.** W = (σ/√n) Ω is linear, so GD on Ω *is* GD on W with
    per-layer learning rate α σ²/n: equal to float64 precision.
(e) **Adam / RMSprop.** Under a per-layer rescaling W_l = c_l Ω_l their trajectories differ
    even as α → 0 (at a fixed horizon), while natural gradient's do not.
    (d) and (e) → ``optimization_ntk_adam.png``
(f) **Natural gradient vs SGD per step**: the best final loss of RiemannianGD("ggn") and of
    SGD over learning-rate sweeps on a small MLP. → ``optimization_ggn_vs_sgd.png``

Example
-------
>>> from covariant.experiments.optimization import run
>>> res = run("/tmp/covariant-optimization", quick=True, progress=False)  # doctest: +SKIP
>>> res["parts"]["b"]["phi"]["linear"]["slope"]                              # doctest: +SKIP
1.08...
>>> FIGURES[0], JSON_NAME
('optimization_trajectories.png', 'optimization.json')

Modules: :mod:`.settings` (settings, results file), :mod:`.charts`, :mod:`.toy` (a, b),
:mod:`.networks` (training helpers), :mod:`.weight_norm` (c), :mod:`.rescaling` (d, e),
:mod:`.ggn_vs_sgd` (f), :mod:`.runner` (checkpoint / resume, figures).
"""

from __future__ import annotations

from ...zoo.problems import ReferenceChart, reference_loss
from .runner import run
from .settings import FIGURES, JSON_NAME

__all__ = ["FIGURES", "JSON_NAME", "ReferenceChart", "reference_loss", "run"]
