r"""``covariant reproduce density``: MAP and Laplace under reparametrization (MATH.md §7).

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
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import density as cvd
from .. import laplace as cvl
from .._progress import progress_bar
from ..errors import require
from ..invariance import Sinh
from ..metrics import Euclidean, Pullback
from ..reparam import (
    Affine,
    Compose,
    Elementwise,
    FromFunctions,
    Log,
    ParameterwiseReparametrization,
    Polar,
    Reparametrization,
    WeightNorm,
)
from ..space import ParameterSpace

__all__ = ["PARTS", "run"]

PARTS = ("lognormal", "map2d", "mlp", "evidence", "prior")
_DT = torch.float64


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=_json_default)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Small problems run much faster on one thread (no pool overhead); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _t(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=_DT)


class Cubic(Elementwise):
    """θ = ψ + c ψ³ elementwise (c > 0): a nonlinear bijection of ℝ (Cardano inverse)."""

    def __init__(self, c: float = 0.3) -> None:
        self.c = float(c)

    def forward(self, psi: Tensor) -> Tensor:
        return psi + self.c * psi**3

    def derivative(self, psi: Tensor) -> Tensor:
        return 1 + 3 * self.c * psi**2

    def _inverse(self, theta: Tensor) -> Tensor:
        # x³ + P x + Q = 0 with P = 1/c, Q = −θ/c has one real root (P > 0)
        P, Q = 1.0 / self.c, -theta / self.c
        s = torch.sqrt(Q**2 / 4 + P**3 / 27)

        def cbrt(z: Tensor) -> Tensor:
            return torch.sign(z) * z.abs() ** (1.0 / 3.0)

        return cbrt(-Q / 2 + s) + cbrt(-Q / 2 - s)

    def __repr__(self) -> str:
        return f"Cubic({self.c:g})"


def _shear_chart() -> Reparametrization:
    """θ = (ψ₀ + ¼ψ₀³, ψ₁ + 0.1ψ₁³ + 0.6 sin ψ₀): a triangular nonlinear bijection of ℝ²."""
    c0, c1 = Cubic(0.25), Cubic(0.1)

    def fwd(psi: Tensor) -> Tensor:
        return torch.stack([c0.forward(psi[0]), c1.forward(psi[1]) + 0.6 * torch.sin(psi[0])])

    def inv(theta: Tensor) -> Tensor:
        a = c0._inverse(theta[0])
        return torch.stack([a, c1._inverse(theta[1] - 0.6 * torch.sin(a))])

    def ladj(psi: Tensor) -> Tensor:
        return torch.log(1 + 0.75 * psi[0] ** 2) + torch.log(1 + 0.3 * psi[1] ** 2)

    return FromFunctions(fwd, inv, log_abs_det_jacobian=ladj)


def _plt() -> Any:
    mpl = require("matplotlib", "plots")
    mpl.use("Agg")
    return require("matplotlib.pyplot", "plots")


# --------------------------------------------------------------------------------------------
# (a) the log-normal
# --------------------------------------------------------------------------------------------

MU, SIGMA = 0.5, 0.8


def _part_lognormal(quick: bool, seed: int) -> dict[str, Any]:
    normal = torch.distributions.Normal(_t(MU), _t(SIGMA))
    x_space = ParameterSpace.from_log_prob(lambda x: normal.log_prob(x).sum())
    y_space = x_space.reparametrize(Log())  # θ = x = log y, ψ = y
    y0 = _t([1.0])
    classic = cvd.map_estimate(y_space, y0, riemannian=False)
    riem = cvd.map_estimate(y_space, y0, riemannian=True)
    x_map = cvd.map_estimate(x_space, _t([0.0]), riemannian=False)
    a_classic, a_riem = math.exp(MU - SIGMA**2), math.exp(MU)
    ys = torch.linspace(0.02, 6.0, 300, dtype=_DT)
    p_y = torch.stack([(-y_space.loss(y[None])).exp() for y in ys])
    q_y = p_y * ys  # density w.r.t. the Riemannian volume dy/y (up to normalization)
    return {
        "mu": MU, "sigma": SIGMA,
        "classic_mode": float(classic.point), "riemannian_mode": float(riem.point),
        "analytic_classic": a_classic, "analytic_riemannian": a_riem,
        "abs_err_classic": abs(float(classic.point) - a_classic),
        "abs_err_riemannian": abs(float(riem.point) - a_riem),
        "x_mode": float(x_map.point), "exp_x_mode": math.exp(float(x_map.point)),
        "converged": classic.converged and riem.converged,
        "plot": {"y": ys.tolist(), "p_y": p_y.tolist(), "q_y": q_y.tolist()},
    }


def _plot_lognormal(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    y, p, q = r["plot"]["y"], r["plot"]["p_y"], r["plot"]["q_y"]
    qmax, pmax = max(q), max(p)
    ax.plot(y, p, label="p_Y(y)  (density w.r.t. dy)")
    ax.plot(y, [v * pmax / qmax for v in q], "--",
            label="q_Y(y) ∝ p_Y(y)·y  (w.r.t. dy/y, rescaled)")
    ax.axvline(r["classic_mode"], color="C0", ls=":",
               label=f"MAP in y: {r['classic_mode']:.6f} (e^(μ−σ²) = {r['analytic_classic']:.6f})")
    ax.axvline(r["riemannian_mode"], color="C1", ls=":",
               label=f"Riemannian MAP: {r['riemannian_mode']:.6f} (e^μ = "
                     f"{r['analytic_riemannian']:.6f})")
    ax.set_xlabel("y = exp(x),  x ~ N(0.5, 0.8²)")
    ax.set_title("(a) Log-normal: the MAP moves, the Riemannian MAP is e^(mode of x)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# (b) a 2-D density under nonlinear charts
# --------------------------------------------------------------------------------------------


def _log_p_2d(theta: Tensor) -> Tensor:
    """A skewed 2-D density: a two-component Gaussian mixture (unnormalized weights fixed)."""
    m1, m2 = _t([1.4, 0.6]), _t([0.2, 1.6])
    P1 = torch.linalg.inv(_t([[0.30, 0.12], [0.12, 0.20]]))
    P2 = torch.linalg.inv(_t([[0.5, -0.1], [-0.1, 0.4]]))
    d1, d2 = theta - m1, theta - m2
    a = -0.5 * d1 @ P1 @ d1 + math.log(0.7) + 0.5 * torch.logdet(P1)
    b = -0.5 * d2 @ P2 @ d2 + math.log(0.3) + 0.5 * torch.logdet(P2)
    return torch.logsumexp(torch.stack([a, b]), 0) - math.log(2 * math.pi)


def _part_map2d(quick: bool, seed: int) -> dict[str, Any]:
    space = ParameterSpace.from_log_prob(_log_p_2d)
    theta_map = cvd.map_estimate(space, _t([1.0, 0.5]), riemannian=False).point
    charts = {"cubic shear": _shear_chart(), "polar": Polar()}
    out: dict[str, Any] = {"theta_map": theta_map.tolist(), "charts": {}}
    for name, h in charts.items():
        s = space.reparametrize(h)
        psi0 = h.inverse(theta_map)
        c = cvd.map_estimate(s, psi0, riemannian=False)
        r = cvd.map_estimate(s, psi0 + 0.05, riemannian=True)
        out["charts"][name] = {
            "classic_psi": c.point.tolist(), "riemannian_psi": r.point.tolist(),
            "classic_in_theta": h(c.point).tolist(), "riemannian_in_theta": h(r.point).tolist(),
            "classic_shift": float((h(c.point) - theta_map).norm()),
            "riemannian_shift": float((h(r.point) - theta_map).norm()),
            "psi_of_theta_map": psi0.tolist(),
            "converged": c.converged and r.converged,
        }
    # contour data: p in θ, and p_Ψ in the shear chart (vectorized over the grid)
    n = 40 if quick else 100
    g0 = torch.linspace(-1.0, 3.0, n, dtype=_DT)
    g1 = torch.linspace(-1.0, 3.2, n, dtype=_DT)
    sh = space.reparametrize(charts["cubic shear"])
    u0 = torch.linspace(-1.3, 1.6, n, dtype=_DT)
    u1 = torch.linspace(-1.8, 2.4, n, dtype=_DT)

    def grid_eval(fn: Callable[[Tensor], Tensor], a: Tensor, b: Tensor) -> list[list[float]]:
        B, A = torch.meshgrid(b, a, indexing="ij")
        pts = torch.stack([A.reshape(-1), B.reshape(-1)], 1)
        with torch.no_grad():
            return torch.func.vmap(fn)(pts).exp().reshape(len(b), len(a)).tolist()

    Z = grid_eval(_log_p_2d, g0, g1)
    Zs = grid_eval(lambda q: -sh._loss(q), u0, u1)
    out["plot"] = {"x": g0.tolist(), "y": g1.tolist(), "z": Z,
                   "u": u0.tolist(), "v": u1.tolist(), "zs": Zs}
    return out


def _plot_map2d(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    P = r["plot"]
    ax = axes[0]
    ax.contour(P["x"], P["y"], P["z"], levels=14, cmap="Greys")
    t = r["theta_map"]
    ax.plot(*t, "k*", ms=14, label="mode of p_Θ (MAP in θ)")
    for (name, c), col in zip(r["charts"].items(), ("C0", "C3"), strict=False):
        ax.plot(*c["classic_in_theta"], "x", color=col, ms=11, mew=2.5,
                label=f"classic MAP in {name} chart, mapped to θ")
        ax.plot(*c["riemannian_in_theta"], "o", color=col, ms=11, mfc="none", mew=2,
                label=f"Riemannian MAP in {name} chart, mapped to θ")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")
    ax.set_title("(b) in θ: classic MAPs move, Riemannian MAPs stay")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.contour(P["u"], P["v"], P["zs"], levels=14, cmap="Blues")
    c = r["charts"]["cubic shear"]
    ax.plot(*c["psi_of_theta_map"], "k*", ms=14, label="h⁻¹(θ-mode)")
    ax.plot(*c["classic_psi"], "x", color="C0", ms=11, mew=2.5, label="mode of p_Ψ (classic MAP)")
    ax.plot(*c["riemannian_psi"], "o", color="C0", ms=11, mfc="none", mew=2,
            label="mode of q_Ψ (Riemannian MAP)")
    ax.set_xlabel("ψ₁")
    ax.set_ylabel("ψ₂")
    ax.set_title("p_Ψ in the cubic-shear chart ψ")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# (c) a Bayesian MLP: MAP in w, in the weight-norm chart, and the Riemannian MAP there
# --------------------------------------------------------------------------------------------

LOGV_SCALE = 0.1  # log‖v‖ ~ N(0, LOGV_SCALE²): the gauge part of the prior on (g, v)


def _load_classification(quick: bool, seed: int) -> tuple[Any, str]:
    note = ""
    if quick:  # no sklearn import (seconds) in the smoke run used by the tests
        from ..zoo.data import make_synthetic_classification

        ds = make_synthetic_classification(400, 16, 4, seed=seed, dtype=_DT)
        return ds, "SYNTHETIC (quick mode: Gaussian blobs, 16 features, 4 classes)"
    try:
        from ..zoo.data import load_digits

        ds = load_digits(seed=seed, dtype=_DT)
        name = "sklearn digits (8x8, 64 features, 10 classes)"
    except Exception as err:  # pragma: no cover - depends on the environment
        try:
            from ..zoo.data import load_mnist1d

            ds = load_mnist1d(seed=seed).to(_DT)
            name = "MNIST-1D"
            note = f"digits unavailable ({type(err).__name__}); used MNIST-1D"
        except Exception as err2:
            from ..zoo.data import make_synthetic_classification

            ds = make_synthetic_classification(1500, 64, 10, seed=seed, dtype=_DT)
            name = "SYNTHETIC FALLBACK (Gaussian blobs, 64 features, 10 classes)"
            note = (f"neither digits nor MNIST-1D could be loaded ({type(err).__name__}, "
                    f"{type(err2).__name__}): the numbers are for synthetic data")
    return ds, name + (f" — {note}" if note else "")


def _log_chi(x: Tensor, n: int) -> Tensor:
    """log of the χ_n density at x > 0."""
    return (n - 1) * torch.log(x) - x**2 / 2 - (n / 2 - 1) * math.log(2) - math.lgamma(n / 2)


def _log_sphere_area(n: int) -> float:
    """log of the area of the unit sphere S^{n−1} ⊂ ℝⁿ."""
    return math.log(2) + (n / 2) * math.log(math.pi) - math.lgamma(n / 2)


def _wn_prior_log_prob(g: Tensor, v_rows: Tensor, lam: float) -> Tensor:
    """log p(g) + log p(v) for weight-norm rows: the (g, v) prior whose pushforward is N(0, λ⁻¹I).

    g ~ ½ χ_n(√λ|g|)√λ (symmetric), v rotation invariant with log‖v‖ ~ N(0, s²):
    p(v) = ρ(‖v‖) / (|S^{n−1}| ‖v‖^{n−1}) with ρ(r) = N(log r; 0, s²)/r.
    """
    n = v_rows.shape[1]
    r = v_rows.norm(dim=1)
    lg = math.log(0.5) + _log_chi(g.abs() * math.sqrt(lam), n) + 0.5 * math.log(lam)
    lr = torch.log(r)
    log_rho = (-0.5 * (lr / LOGV_SCALE) ** 2 - math.log(LOGV_SCALE * math.sqrt(2 * math.pi))
               - lr)
    lv = log_rho - _log_sphere_area(n) - (n - 1) * lr
    return (lg + lv).sum()


def _wn_space(
    w_space: ParameterSpace, lam: float
) -> tuple[ParameterSpace, ParameterwiseReparametrization]:
    """The Bayesian MLP in the weight-norm chart (every ``*.weight``), with the (g, v) prior."""
    layout = w_space.layout
    assert layout is not None
    h = ParameterwiseReparametrization(layout, {"*.weight": WeightNorm()})
    new_layout = h.new_layout
    bayes = cvl._bayes_of(w_space)
    assert bayes is not None
    nll = bayes.nll
    sl = new_layout.slices
    names = list(new_layout.names)
    shapes = dict(zip(new_layout.names, new_layout.shapes, strict=True))

    def log_prob(psi: Tensor) -> Tensor:
        total = -nll(h.forward(psi))
        for name in names:
            if name.endswith(".g"):
                base = name[:-2]
                g = psi[sl[name]]
                v = psi[sl[base + ".v"]].reshape(shapes[base + ".v"])
                total = total + _wn_prior_log_prob(g, v.reshape(v.shape[0], -1), lam)
            elif not name.endswith(".v"):
                total = total - cvl._prior_nll(psi[sl[name]], lam)
        return total

    space = ParameterSpace.from_log_prob(log_prob, Pullback(Euclidean(), h), layout=new_layout)
    space.chart, space.parent = h, w_space
    return space, h


def _wn_point(h: ParameterwiseReparametrization, w: Tensor) -> Tensor:
    """h⁻¹(w) with every ‖v_row‖ at the gauge prior's optimum e^{−s²} (g = ±‖w_row‖)."""
    psi = h.inverse(w).clone()
    layout = h.new_layout
    for name, sl in layout.slices.items():
        if name.endswith(".v"):
            shape = dict(zip(layout.names, layout.shapes, strict=True))[name]
            rows = psi[sl].reshape(shape[0], -1)
            rows = rows / rows.norm(dim=1, keepdim=True) * math.exp(-(LOGV_SCALE**2))
            psi[sl] = rows.reshape(-1)
    return psi


def _evaluate(model: nn.Module, layout: Any, w: Tensor, X: Tensor, y: Tensor) -> dict[str, float]:
    from torch.func import functional_call

    with torch.no_grad():
        f = functional_call(model, layout.unflatten(w), (X,))
        nll = float(nn.functional.cross_entropy(f, y))
        acc = float((f.argmax(1) == y).double().mean())
    return {"test_accuracy": acc, "test_nll": nll}


def _row_norm(layout: Any, w: Tensor) -> float:
    W = layout.unflatten(w)["0.weight"]
    return float(W.norm(dim=1).mean())


def _part_mlp(quick: bool, seed: int, progress: bool) -> dict[str, Any]:
    ds, data_name = _load_classification(quick, seed)
    Xtr, ytr, Xte, yte = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    hidden = 8 if quick else 32
    lam = 1.0
    steps = 300 if quick else 1000
    adam_steps = 20 if quick else 600
    gtol = 1e-4  # stationary for the table: ‖∇‖ <= gtol on objectives of size O(10³)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(Xtr.shape[1], hidden), nn.Tanh(),
                          nn.Linear(hidden, ds.num_classes)).to(_DT)
    w_space, w0 = cvl.posterior_space(model, (Xtr, ytr), prior_precision=lam)
    layout = w_space.layout
    wn_space, h = _wn_space(w_space, lam)
    psi0 = _wn_point(h, w0)
    slq_kw = {"grad_probes": 2, "num_probes": 8, "num_steps": 20}

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.time()
        return fn(), time.time() - t0

    # 1. the three estimates from the same random initialization (ψ0 = h⁻¹(w0))
    runs: dict[str, tuple[Any, Callable[[Tensor], Tensor], float]] = {}
    m, t = timed(lambda: cvd.map_estimate(w_space, w0, riemannian=False, method="lbfgs",
                                          steps=steps, progress=progress))
    runs["MAP in w"] = (m, lambda q: q, t)
    m, t = timed(lambda: cvd.map_estimate(wn_space, psi0, riemannian=False, method="lbfgs",
                                          steps=steps, progress=progress))
    runs["MAP in weight-norm chart (g, v)"] = (m, h, t)
    m, t = timed(lambda: cvd.map_estimate(wn_space, psi0, riemannian=True, method="lbfgs",
                                          steps=steps, logdet_method="closed",
                                          progress=progress))
    runs["Riemannian MAP in (g, v): closed-form log pdet G, L-BFGS"] = (m, h, t)
    m, t = timed(lambda: cvd.map_estimate(wn_space, psi0, riemannian=True, method="adam",
                                          steps=adam_steps, lr=1e-2, logdet_method="slq",
                                          logdet_kwargs=slq_kw, progress=progress, tol=0.0))
    runs["Riemannian MAP in (g, v): SLQ/Hutchinson gradient, Adam"] = (m, h, t)
    m, t = timed(lambda: cvd.map_estimate(w_space, w0, riemannian=False, method="adam",
                                          steps=adam_steps, lr=1e-2, progress=progress,
                                          tol=0.0))
    runs["MAP in w: Adam, same budget (optimizer reference)"] = (m, lambda q: q, t)

    w_ref = runs["MAP in w"][0].point
    table = []
    for name, (res, to_w, t) in runs.items():
        w = to_w(res.point)
        table.append({
            "method": name,
            **_evaluate(model, layout, w, Xte, yte),
            "rel_distance_to_map_w": float((w - w_ref).norm() / w_ref.norm()),
            "mean_row_norm_layer0": _row_norm(layout, w),
            "objective": res.value, "stationary": res.grad_norm <= gtol,
            "num_iters": res.num_iters,
            "grad_norm": res.grad_norm, "time_s": t,
        })

    # 2. local-mode check: start at the MAP in w (mapped to (g, v)) and see who moves away
    psi_star = _wn_point(h, w_ref)
    g_c = float(torch.func.grad(cvd.map_objective(wn_space, False))(psi_star).norm())
    g_r = float(torch.func.grad(cvd.map_objective(wn_space, True, logdet_method="closed"))(
        psi_star).norm())
    mc = cvd.map_estimate(wn_space, psi_star, riemannian=False, method="lbfgs", steps=steps)
    mr = cvd.map_estimate(wn_space, psi_star, riemannian=True, method="lbfgs", steps=steps,
                          logdet_method="closed")
    local = {
        "grad_norm_at_map_w": {"classic": g_c, "riemannian": g_r,
                               "map_w_itself": runs["MAP in w"][0].grad_norm},
        "rel_move_classic": float((h(mc.point) - w_ref).norm() / w_ref.norm()),
        "rel_move_riemannian": float((h(mr.point) - w_ref).norm() / w_ref.norm()),
        "classic_from_map_w": _evaluate(model, layout, h(mc.point), Xte, yte),
        "riemannian_from_map_w": _evaluate(model, layout, h(mr.point), Xte, yte),
    }
    return {
        "data": data_name, "n_train": int(Xtr.shape[0]), "n_test": int(Xte.shape[0]),
        "architecture": f"{Xtr.shape[1]}-{hidden}-{ds.num_classes} tanh MLP",
        "dim_w": int(w0.shape[0]), "dim_psi": int(psi0.shape[0]), "prior_precision": lam,
        "prior_on_g_v": (
            "per weight-norm row (length n): g ~ symmetric chi_n/sqrt(lambda), v rotation "
            f"invariant with log||v|| ~ N(0, {LOGV_SCALE}^2); pushforward to w is exactly "
            "N(0, 1/lambda I). Biases: N(0, 1/lambda) in every chart."
        ),
        "metric": "Euclidean in w, pulled back to (g, v): G = J^T J (rank-deficient, pdet)",
        "table": table,
        "local_mode_check": local,
    }


def _plot_mlp(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = r["table"]
    labels = [
        "MAP w", "MAP (g,v)", "R-MAP (g,v)\nclosed", "R-MAP (g,v)\nSLQ+Adam", "MAP w\nAdam"
    ][: len(rows)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for ax, key, title in zip(
        axes, ("test_accuracy", "test_nll", "rel_distance_to_map_w"),
        ("test accuracy", "test NLL", "‖w − w_MAP‖ / ‖w_MAP‖ (same random init)"), strict=False,
    ):
        ax.bar(range(len(rows)), [row[key] for row in rows],
               color=["C0", "C3", "C2", "C2", "C7"][: len(rows)])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    loc = r["local_mode_check"]
    ax = axes[3]
    vals = [loc["rel_move_classic"], loc["rel_move_riemannian"]]
    ax.bar([0, 1], vals, color=["C3", "C2"])
    ax.set_yscale("log")
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["MAP (g,v)", "R-MAP (g,v)"], fontsize=8)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1e}", ha="center", va="bottom", fontsize=8)
    ax.set_title("started at w_MAP: how far it moves (rel.)", fontsize=9)
    fig.suptitle(f"(c) Bayesian MLP on {r['data'].split(' —')[0]}: Gaussian prior on w")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# (d) evidence tables and (e) prior precision
# --------------------------------------------------------------------------------------------


def _logreg_problem(seed: int) -> tuple[ParameterSpace, Tensor]:
    g = torch.Generator().manual_seed(seed + 11)
    X = torch.randn(16, 1, generator=g, dtype=_DT)
    logits = 3.0 * X[:, 0] - 0.5
    y = (torch.rand(16, generator=g, dtype=_DT) < torch.sigmoid(logits)).long()
    return cvl.posterior_space(_Logistic(), (X, y), prior_precision=1.0)


class _Logistic(nn.Module):
    """Logistic regression as 2-class logits (0, a·x + b): parameters (a, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=_DT))
        self.b = nn.Parameter(torch.zeros((), dtype=_DT))

    def forward(self, X: Tensor) -> Tensor:
        z = self.a * X[:, 0] + self.b
        return torch.stack([torch.zeros_like(z), z], -1)


def _mlp_problem(seed: int) -> tuple[ParameterSpace, Tensor]:
    g = torch.Generator().manual_seed(seed + 23)
    X = torch.linspace(-2, 2, 200, dtype=_DT)[:, None]
    y = torch.sin(1.5 * X) + 0.2 * torch.randn(200, 1, generator=g, dtype=_DT)
    torch.manual_seed(seed + 5)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(_DT)
    return cvl.posterior_space(model, (X, y), likelihood="regression", sigma_noise=0.2,
                               prior_precision=1.0)


def _charts(dim: int, quick: bool, seed: int) -> dict[str, Reparametrization]:
    g = torch.Generator().manual_seed(seed + 101)
    A = torch.eye(dim, dtype=_DT) + 0.4 * torch.randn(dim, dim, generator=g, dtype=_DT) / math.sqrt(
        dim)
    b = 0.2 * torch.randn(dim, generator=g, dtype=_DT)
    charts: dict[str, Reparametrization] = {
        "affine (linear)": Affine(A, b),
        "sinh": Sinh(1.5, 1.0, 0.0),
        "cubic": Cubic(1.0),
        "affine∘sinh": Compose(Affine(A, b), Sinh(0.7, 0.8)),
    }
    if quick:
        charts = {k: charts[k] for k in ("affine (linear)", "sinh")}
    return charts


def _quadrature_log_evidence(space: ParameterSpace, center: Tensor, quick: bool) -> float:
    """log ∫ p(D, θ) dθ on a 2-D grid (θ-MAP ± 10 posterior sd per axis, Simpson-free sum)."""
    H = torch.func.hessian(space._loss)(center)
    sd = torch.sqrt(torch.diagonal(torch.linalg.inv(H)))
    n = 201 if quick else 601
    a = torch.linspace(-10, 10, n, dtype=_DT)
    g0, g1 = center[0] + sd[0] * a, center[1] + sd[1] * a
    T0, T1 = torch.meshgrid(g0, g1, indexing="ij")
    pts = torch.stack([T0.reshape(-1), T1.reshape(-1)], 1)
    vals = -torch.func.vmap(space._loss)(pts)
    cell = float((g0[1] - g0[0]) * (g1[1] - g1[0]))
    return float(torch.logsumexp(vals, 0)) + math.log(cell)


def _evidence_rows(space: ParameterSpace, theta0: Tensor, quick: bool, seed: int,
                   with_ggn: bool) -> dict[str, Any]:
    m0 = cvd.map_estimate(space, theta0, riemannian=False)
    theta_map = m0.point
    charts: dict[str, Reparametrization | None] = {
        "θ (original)": None, **_charts(theta0.shape[0], quick, seed)}
    rows = []
    for name, h in charts.items():
        s = space if h is None else space.reparametrize(h)
        psi = theta_map if h is None else h.inverse(theta_map)
        mc = cvd.map_estimate(s, psi, riemannian=False, steps=500)
        mr = cvd.map_estimate(s, psi, riemannian=True, steps=500)
        row = {
            "chart": name,
            "classic": cvl.laplace(s, mc.point, riemannian=False).log_evidence,
            "invariant": cvl.laplace(s, mr.point, riemannian=True).log_evidence,
            "classic_map_shift": float(((h(mc.point) if h else mc.point) - theta_map).norm()),
            "riemannian_map_shift": float(((h(mr.point) if h else mr.point) - theta_map).norm()),
            "converged": mc.converged and mr.converged,
        }
        if with_ggn:
            row["classic_ggn"] = cvl.laplace(s, mc.point, riemannian=False,
                                             hessian="ggn").log_evidence
            row["invariant_ggn"] = cvl.laplace(s, mr.point, riemannian=True,
                                               hessian="ggn").log_evidence
        rows.append(row)
    inv = [r["invariant"] for r in rows]
    cls = [r["classic"] for r in rows]
    return {
        "dim": int(theta0.shape[0]), "rows": rows,
        "invariant_spread": max(inv) - min(inv), "classic_spread": max(cls) - min(cls),
        "theta_map": theta_map.tolist(),
    }


def _part_evidence(quick: bool, seed: int) -> dict[str, Any]:
    space, theta0 = _logreg_problem(seed)
    out: dict[str, Any] = {"logistic_regression": _evidence_rows(space, theta0, quick, seed,
                                                                  with_ggn=False)}
    tm = _t(out["logistic_regression"]["theta_map"])
    out["logistic_regression"]["exact_log_evidence_quadrature"] = _quadrature_log_evidence(
        space, tm, quick)
    out["logistic_regression"]["model"] = (
        "Bayesian logistic regression p(y=1|x) = sigmoid(a x + b), 16 points, prior N(0, I)")
    if not quick:
        mspace, mtheta0 = _mlp_problem(seed)
        out["mlp_regression"] = _evidence_rows(mspace, mtheta0, quick, seed, with_ggn=True)
        out["mlp_regression"]["model"] = (
            "1-8-1 tanh MLP regression on y = sin(1.5x) + N(0, 0.2^2), 200 points, prior N(0, I)")
    return out


def _plot_evidence(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    models = [k for k in ("logistic_regression", "mlp_regression") if k in r]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.2), squeeze=False)
    for ax, key in zip(axes[0], models, strict=True):
        rows = r[key]["rows"]
        x = range(len(rows))
        ax.plot(x, [row["classic"] for row in rows], "o--", label="classic Laplace (chart MAP)")
        ax.plot(x, [row["invariant"] for row in rows], "s-", label="invariant Laplace (R-MAP)")
        if "exact_log_evidence_quadrature" in r[key]:
            ax.axhline(r[key]["exact_log_evidence_quadrature"], color="k", lw=0.8,
                       label="exact (quadrature)")
        ax.set_xticks(list(x))
        ax.set_xticklabels([row["chart"] for row in rows], rotation=20, fontsize=8)
        ax.set_ylabel("log evidence")
        ax.set_title(f"(d) {key.replace('_', ' ')} (d = {r[key]['dim']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _part_prior(quick: bool, seed: int, progress: bool) -> dict[str, Any]:
    import numpy as np

    # logistic regression: refit (type-II ML, the mode recomputed for every λ), exact Hessian;
    # the MLP: post hoc (the λ = 1 mode kept, as laplace-torch does after training), GGN
    problems = {"logistic_regression": (*_logreg_problem(seed), {
        "method": "refit", "hessian": "exact",
        "grid": [0.03, 0.3, 3.0] if quick else np.logspace(-2, 2, 17).tolist()})}
    if not quick:
        problems["mlp_regression"] = (*_mlp_problem(seed), {
            "method": "posthoc", "hessian": "ggn", "grid": np.logspace(-2, 2, 17).tolist()})
    out: dict[str, Any] = {}
    for pname, (space, theta0, how) in problems.items():
        theta_map = cvd.map_estimate(space, theta0, riemannian=False, steps=500).point
        charts: dict[str, Reparametrization | None] = {
            "θ (original)": None, **_charts(theta0.shape[0], quick, seed)}
        if quick:
            charts.pop("affine (linear)")
        res: dict[str, Any] = {}
        for name, h in progress_bar(charts.items(), enabled=progress, desc=f"prior {pname}"):
            s = space if h is None else space.reparametrize(h)
            psi = theta_map if h is None else h.inverse(theta_map)
            entry = {}
            for riem in (False, True):
                # the expansion point at λ = 1: the chart's MAP (classic) or R-MAP (invariant)
                start = cvd.map_estimate(s, psi, riemannian=riem, steps=500).point
                r = cvl.optimize_prior_precision(
                    s, start, riemannian=riem, method=how["method"], grid=how["grid"],
                    refine=not quick, map_kwargs={"steps": 500}, hessian=how["hessian"])
                entry["invariant" if riem else "classic"] = r.to_dict()
            res[name] = entry
        lam_c = [v["classic"]["prior_precision"] for v in res.values()]
        lam_i = [v["invariant"]["prior_precision"] for v in res.values()]
        out[pname] = {
            "method": how["method"], "hessian": how["hessian"],
            "note": (
                "interior=False marks a maximum at the grid's end or next to a lambda where "
                "the precision is not positive definite (evidence -inf there; the classic "
                "evidence diverges at that boundary), i.e. not a genuine optimum. In nonlinear "
                "charts the classic post-hoc precision (GGN + Hessian of the prior and "
                "log|det J| terms) loses definiteness at small lambda; the invariant one, "
                "J^T (GGN + lambda I) J, never does."
            ),
            "charts": res,
            "classic_lambda_range": [min(lam_c), max(lam_c)],
            "invariant_lambda_range": [min(lam_i), max(lam_i)],
            "classic_lambda_ratio": max(lam_c) / min(lam_c),
            "invariant_lambda_ratio": max(lam_i) / min(lam_i),
        }
    return out


def _plot_prior(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    models = [k for k in ("logistic_regression", "mlp_regression") if k in r]
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.4), squeeze=False)
    for ax, key in zip(axes[0], models, strict=True):
        for i, (name, e) in enumerate(r[key]["charts"].items()):
            col = f"C{i}"
            c, v = e["classic"], e["invariant"]
            ax.plot(c["grid"], c["log_evidences"], "--", color=col, label=f"classic, {name}")
            ax.plot(v["grid"], v["log_evidences"], "-", color=col, lw=2.5 - 0.4 * i, alpha=0.7,
                    label=f"invariant, {name}")
            ax.plot(c["prior_precision"], c["log_evidence"], "x", color=col, ms=9, mew=2)
            ax.plot(v["prior_precision"], v["log_evidence"], "o", color=col, ms=8, mfc="none")
        ax.set_xscale("log")
        best = max(e[k]["log_evidence"] for e in r[key]["charts"].values()
                   for k in ("classic", "invariant"))
        lows = [min(e[k]["log_evidences"]) for e in r[key]["charts"].values()
                for k in ("classic", "invariant")]
        if best - min(lows) > 40:  # keep the maxima visible, not the far tails
            ax.set_ylim(best - 30, best + 3)
        ax.set_xlabel("prior precision λ")
        ax.set_ylabel("Laplace log evidence")
        ax.set_title(f"(e) {key.replace('_', ' ')} ({r[key].get('method', 'refit')}, "
                     f"{r[key].get('hessian', 'exact')}): argmax λ per chart "
                     "(x classic, o invariant)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _summary(parts: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "lognormal" in parts:
        a = parts["lognormal"]
        s["lognormal_modes"] = {"classic": a["classic_mode"], "riemannian": a["riemannian_mode"],
                                "analytic": [a["analytic_classic"], a["analytic_riemannian"]]}
    if "map2d" in parts:
        s["map2d_shifts"] = {k: {"classic": v["classic_shift"],
                                 "riemannian": v["riemannian_shift"]}
                             for k, v in parts["map2d"]["charts"].items()}
    if "mlp" in parts:
        s["mlp"] = [{k: row[k] for k in ("method", "test_accuracy", "test_nll",
                                          "rel_distance_to_map_w")}
                    for row in parts["mlp"]["table"]]
    if "evidence" in parts:
        s["evidence_spread"] = {k: {"classic": v["classic_spread"],
                                    "invariant": v["invariant_spread"]}
                                for k, v in parts["evidence"].items()
                                if isinstance(v, dict) and "classic_spread" in v}
    if "prior" in parts:
        s["prior_lambda_ratio"] = {k: {"classic": v["classic_lambda_ratio"],
                                       "invariant": v["invariant_lambda_ratio"]}
                                   for k, v in parts["prior"].items() if isinstance(v, dict)
                                   and "charts" in v}
    return s


def run(out_dir: str | os.PathLike[str], *, quick: bool = False, seed: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Run parts (a)–(e); write JSON and PNG under ``out_dir``; return the results.

    Parameters
    ----------
    out_dir : path
        Output folder (created). Each finished part is checkpointed to
        ``density_parts/<part>.json``; a rerun with the same ``quick`` and ``seed`` reuses
        them, so a killed run resumes.
    quick : bool
        Smaller problems and fewer charts (well under a minute; used by the tests).
    seed : int
        Seed of data splits, initializations and probes.
    progress : bool
        Progress bars (tqdm, if installed).

    Returns
    -------
    dict
        ``{"config", "parts": {name: result}, "summary", "files"}``, also written to
        ``density.json``.
    """
    out = Path(out_dir)
    ckpt = out / "density_parts"
    ckpt.mkdir(parents=True, exist_ok=True)
    config = {"quick": bool(quick), "seed": int(seed)}
    runners: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict, Path], None]]] = {
        "lognormal": (lambda: _part_lognormal(quick, seed), _plot_lognormal),
        "map2d": (lambda: _part_map2d(quick, seed), _plot_map2d),
        "mlp": (lambda: _part_mlp(quick, seed, progress), _plot_mlp),
        "evidence": (lambda: _part_evidence(quick, seed), _plot_evidence),
        "prior": (lambda: _part_prior(quick, seed, progress), _plot_prior),
    }
    parts: dict[str, Any] = {}
    files: list[str] = []
    timings: dict[str, float] = {}
    for name in progress_bar(PARTS, enabled=progress, desc="density"):
        path = ckpt / f"{name}.json"
        result = None
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("config") == config:
                    result = saved["result"]
                    timings[name] = saved.get("time_s", 0.0)
            except (OSError, ValueError, KeyError):
                result = None
        if result is None:
            t0 = time.time()
            with _threads(1):
                result = runners[name][0]()
            result = json.loads(json.dumps(result, default=_json_default))
            timings[name] = time.time() - t0
            _atomic_json(path, {"config": config, "result": result, "time_s": timings[name]})
        png = out / f"density_{name}.png"
        runners[name][1](result, png)
        files.append(str(png))
        parts[name] = result
    final = {"config": config, "parts": parts, "summary": _summary(parts),
             "timings_s": timings, "files": [*files, str(out / "density.json")]}
    _atomic_json(out / "density.json", final)
    return final
