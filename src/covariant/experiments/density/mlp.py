"""Part (c): a Bayesian MLP with a Gaussian prior N(0, λ⁻¹I) on its weights w.

MAP in w; MAP in the weight-norm chart (g, v); Riemannian MAP in (g, v) (closed-form
pseudo-log-determinant with L-BFGS, and the stochastic SLQ/Hutchinson estimator with Adam).
Test accuracy, test NLL and the distance of the solutions mapped to w. The MAP in (g, v)
differs from the MAP in w: the density in (g, v) carries the Jacobian factor (|g|/‖v‖)^{n−1}
per row. The Riemannian MAP subtracts ½ log pdet(JᵀJ), removing exactly that factor, and maps
to the w-MAP. Data: sklearn digits (MNIST-1D, or a labelled synthetic fallback, if digits is
unavailable); synthetic blobs in quick mode.

Example
-------
>>> ds, name = load_classification(True, 0)
>>> ds.X_train.shape[1], ds.num_classes, name.startswith("SYNTHETIC")
(16, 4, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ... import density as cvd
from ... import laplace as cvl
from ...zoo.data import load_digits, load_mnist1d, make_synthetic_classification
from .common import DT, pyplot, save_png
from .wn_prior import LOGV_SCALE, weight_norm_space, wn_point

__all__ = ["load_classification", "part_mlp", "plot_mlp"]


def load_classification(quick: bool, seed: int) -> tuple[Any, str]:
    """The classification data set and its description (which says when it is a fallback)."""
    note = ""
    if quick:  # no sklearn import (seconds) in the smoke run used by the tests
        ds = make_synthetic_classification(400, 16, 4, seed=seed, dtype=DT)
        return ds, "SYNTHETIC (quick mode: Gaussian blobs, 16 features, 4 classes)"
    try:
        ds = load_digits(seed=seed, dtype=DT)
        name = "sklearn digits (8x8, 64 features, 10 classes)"
    except Exception as err:  # pragma: no cover - depends on the environment
        try:
            ds = load_mnist1d(seed=seed).to(DT)
            name = "MNIST-1D"
            note = f"digits unavailable ({type(err).__name__}); used MNIST-1D"
        except Exception as err2:
            ds = make_synthetic_classification(1500, 64, 10, seed=seed, dtype=DT)
            name = "SYNTHETIC FALLBACK (Gaussian blobs, 64 features, 10 classes)"
            note = (f"neither digits nor MNIST-1D could be loaded ({type(err).__name__}, "
                    f"{type(err2).__name__}): the numbers are for synthetic data")
    return ds, name + (f" — {note}" if note else "")


def _evaluate(model: nn.Module, layout: Any, w: Tensor, X: Tensor, y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        f = functional_call(model, layout.unflatten(w), (X,))
        nll = float(nn.functional.cross_entropy(f, y))
        acc = float((f.argmax(1) == y).double().mean())
    return {"test_accuracy": acc, "test_nll": nll}


def _row_norm(layout: Any, w: Tensor) -> float:
    W = layout.unflatten(w)["0.weight"]
    return float(W.norm(dim=1).mean())


Runs = dict[str, tuple[Any, Callable[[Tensor], Tensor], float]]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.time()
    return fn(), time.time() - t0


def _estimates(w_space: Any, w0: Tensor, wn_space: Any, h: Any, psi0: Tensor, steps: int,
               adam_steps: int, progress: bool) -> Runs:
    """The five estimates from the same random initialization (ψ0 = h⁻¹(w0)): each result,
    its map to w, and its time."""
    slq_kw = {"grad_probes": 2, "num_probes": 8, "num_steps": 20}
    runs: Runs = {}
    m, t = _timed(lambda: cvd.map_estimate(w_space, w0, riemannian=False, method="lbfgs",
                                           steps=steps, progress=progress))
    runs["MAP in w"] = (m, lambda q: q, t)
    m, t = _timed(lambda: cvd.map_estimate(wn_space, psi0, riemannian=False, method="lbfgs",
                                           steps=steps, progress=progress))
    runs["MAP in weight-norm chart (g, v)"] = (m, h, t)
    m, t = _timed(lambda: cvd.map_estimate(wn_space, psi0, riemannian=True, method="lbfgs",
                                           steps=steps, logdet_method="closed",
                                           progress=progress))
    runs["Riemannian MAP in (g, v): closed-form log pdet G, L-BFGS"] = (m, h, t)
    m, t = _timed(lambda: cvd.map_estimate(wn_space, psi0, riemannian=True, method="adam",
                                           steps=adam_steps, lr=1e-2, logdet_method="slq",
                                           logdet_kwargs=slq_kw, progress=progress, tol=0.0))
    runs["Riemannian MAP in (g, v): SLQ/Hutchinson gradient, Adam"] = (m, h, t)
    m, t = _timed(lambda: cvd.map_estimate(w_space, w0, riemannian=False, method="adam",
                                           steps=adam_steps, lr=1e-2, progress=progress,
                                           tol=0.0))
    runs["MAP in w: Adam, same budget (optimizer reference)"] = (m, lambda q: q, t)
    return runs


def _table(runs: Runs, model: nn.Module, layout: Any, Xte: Tensor, yte: Tensor,
           gtol: float) -> list[dict[str, Any]]:
    """One row per estimate: test metrics, distance to the MAP in w, and diagnostics."""
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
    return table


def _local_mode_check(runs: Runs, wn_space: Any, h: Any, model: nn.Module, layout: Any,
                      Xte: Tensor, yte: Tensor, steps: int) -> dict[str, Any]:
    """Start at the MAP in w (mapped to (g, v)) and see which estimate moves away."""
    w_ref = runs["MAP in w"][0].point
    psi_star = wn_point(h, w_ref)
    g_c = float(torch.func.grad(cvd.map_objective(wn_space, False))(psi_star).norm())
    g_r = float(torch.func.grad(cvd.map_objective(wn_space, True, logdet_method="closed"))(
        psi_star).norm())
    mc = cvd.map_estimate(wn_space, psi_star, riemannian=False, method="lbfgs", steps=steps)
    mr = cvd.map_estimate(wn_space, psi_star, riemannian=True, method="lbfgs", steps=steps,
                          logdet_method="closed")
    return {
        "grad_norm_at_map_w": {"classic": g_c, "riemannian": g_r,
                               "map_w_itself": runs["MAP in w"][0].grad_norm},
        "rel_move_classic": float((h(mc.point) - w_ref).norm() / w_ref.norm()),
        "rel_move_riemannian": float((h(mr.point) - w_ref).norm() / w_ref.norm()),
        "classic_from_map_w": _evaluate(model, layout, h(mc.point), Xte, yte),
        "riemannian_from_map_w": _evaluate(model, layout, h(mr.point), Xte, yte),
    }


def part_mlp(quick: bool, seed: int, progress: bool) -> dict[str, Any]:
    """The estimates in w and in (g, v), their test metrics, and the local-mode check."""
    ds, data_name = load_classification(quick, seed)
    Xtr, ytr, Xte, yte = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    hidden = 8 if quick else 32
    lam = 1.0
    steps = 300 if quick else 1000
    adam_steps = 20 if quick else 600
    gtol = 1e-4  # stationary for the table: ‖∇‖ <= gtol on objectives of size O(10³)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(Xtr.shape[1], hidden), nn.Tanh(),
                          nn.Linear(hidden, ds.num_classes)).to(DT)
    w_space, w0 = cvl.posterior_space(model, (Xtr, ytr), prior_precision=lam)
    layout = w_space.layout
    wn_space, h = weight_norm_space(w_space, lam)
    psi0 = wn_point(h, w0)
    runs = _estimates(w_space, w0, wn_space, h, psi0, steps, adam_steps, progress)
    table = _table(runs, model, layout, Xte, yte, gtol)
    local = _local_mode_check(runs, wn_space, h, model, layout, Xte, yte, steps)
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


def plot_mlp(r: dict[str, Any], path: Path) -> None:
    """Test accuracy, NLL and distance to the MAP in w per estimate; the local-mode check."""
    plt = pyplot()
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
    save_png(fig, path, plt)
