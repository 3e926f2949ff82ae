r"""``covariant reproduce density``: MAP and Laplace under reparametrization (docs/math.md §7).

Five parts, each written to ``<out_dir>/density_parts/<part>.json`` as soon as it is done (so a
killed run resumes where it stopped) and drawn to ``<out_dir>/density_<part>.png``; the whole
lot is also written to ``<out_dir>/density.json``.

(a) ``lognormal``: x ~ N(0.5, 0.8²), y = eˣ. The MAP of p_Y is e^{μ−σ²} = 0.869358; the
    Riemannian MAP (G_y = 1/y²) is e^{μ} = 1.648721, the image of the Gaussian mode.
(b) ``map2d``: a 2-D density under two nonlinear charts (a cubic shear and polar
    coordinates). The classic MAP in each chart, mapped back to θ, moves; the Riemannian MAP
    stays on the θ-mode.
(c) ``mlp``: a Bayesian MLP with a Gaussian prior N(0, λ⁻¹I) on its weights w, on sklearn
    digits (MNIST-1D, or a labelled synthetic fallback, if digits is unavailable). MAP in w;
    MAP in the weight-norm chart (g, v); Riemannian MAP in the weight-norm chart (closed-form
    pseudo-log-determinant with L-BFGS, and the stochastic SLQ/Hutchinson estimator with
    Adam). Test accuracy, test NLL and the distance of the solutions mapped to w.

    *The prior on (g, v).* Weight norm is a submersion, so the w-prior cannot be pushed to
    (g, v) as a density. We place on every row the product prior g ~ ½·χ_n(√λ |g|)√λ (a
    symmetric χ_n law with n the row length) and v rotation-invariant with
    log‖v‖ ~ N(0, 0.1²). Since g·v/‖v‖ then has a uniform direction and a χ_n/√λ length,
    **its pushforward to w is exactly N(0, λ⁻¹I)**: the same Bayesian model, written in
    (g, v). (It is :func:`covariant.density.lift_log_prob` with the fibre density
    ½ρ(‖v‖), ρ the log-normal law of ‖v‖.) The MAP in (g, v) still differs from the MAP in
    w: the density in (g, v) carries the Jacobian factor (|g|/‖v‖)^{n−1} per row, which
    favours long rows. The Riemannian MAP subtracts ½ log pdet(JᵀJ), removing exactly that
    factor, and maps to the w-MAP. (Weight decay on g and v — independent Gaussians — is a
    different prior on w altogether and has no MAP: its density in (g, v) is largest as
    ‖v‖ → 0; we do not use it.)
(d) ``evidence``: Laplace log evidence in several bijective charts: classic (at the MAP of
    each chart) and invariant (at the Riemannian MAP), for a 2-parameter Bayesian logistic
    regression (with the exact evidence by quadrature) and a 25-parameter MLP regression
    (exact Hessian and GGN).
(e) ``prior``: the prior precision λ chosen by maximizing the evidence, per chart, classic
    and invariant. Logistic regression: refit (the mode is recomputed for every λ, type-II
    maximum likelihood), exact Hessian. MLP: post hoc (the λ = 1 mode of each chart kept, as
    laplace-torch does after training), GGN. The classic evidence picks a different λ in
    every nonlinear chart; the invariant one picks the same λ in all of them.

Modules: :mod:`.common` (float64, charts, figures), :mod:`.lognormal` (a), :mod:`.map2d` (b),
:mod:`.wn_prior` and :mod:`.mlp` (c), :mod:`.evidence` (d), :mod:`.prior` (e),
:mod:`.runner` (checkpoints, resume, summary).

Example
-------
>>> PARTS
('lognormal', 'map2d', 'mlp', 'evidence', 'prior')
>>> from covariant.experiments.density import run
>>> result = run("/tmp/covariant-density", quick=True, progress=False)  # doctest: +SKIP
>>> round(result["parts"]["lognormal"]["riemannian_mode"], 6)          # doctest: +SKIP
1.648721
"""

from __future__ import annotations

from .common import shear_chart as _shear_chart
from .runner import PARTS, run
from .wn_prior import LOGV_SCALE
from .wn_prior import wn_prior_log_prob as _wn_prior_log_prob

__all__ = ["LOGV_SCALE", "PARTS", "_shear_chart", "_wn_prior_log_prob", "run"]
